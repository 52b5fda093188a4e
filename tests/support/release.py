"""One application's releases on a real control plane, driven the way its users drive them.

``Perch`` is what a test session has running: the control plane, Perch installed from the chart
(CRDs, ServiceAccounts, RBAC), ``perch-webhook`` as a process registered by URL, the Istio-shaped
metrics source feeding a real Prometheus, and the kubelet stand-in. ``Release`` is one test's
application in its own namespace: it deploys the seed with kubectl (client-side apply, server-side
apply, set image, replace), runs ``perch-analyzer`` as a process with the chart's ServiceAccount,
and reads back what a user would look at: the Canary object, its Events, the Deployments, and the
weights the route took (from a watch, so that every weight it ever had is seen).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import requests
import yaml
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from perch.revision import template_revision
from perch.routers import RouteTarget, router_for
from perch.speccache import cached_parse_spec
from tests.seed import IMAGE_NEW, SEED_SPEC_EARLY, podinfo
from tests.support import secrets
from tests.support.controlplane import ControlPlane
from tests.support.install import Installed
from tests.support.kubelet import FakeKubelet
from tests.support.mesh import IstioExporter, Recorder, free_port
from tests.support.prometheus import PrometheusServer
from tests.support.webhook_server import Server

REPO = Path(__file__).resolve().parents[2]
# Generous bounds for a busy 2-core machine; deadlines for a broken run, never measurements.
DEADLINE = 180.0
GROUP, VERSION = "perch.dev", "v1alpha1"

Method = Literal["set-image", "replace", "apply", "server-side", "patch"]


def seed_spec(*, loadtester: str, metric_interval: str = "5s", threshold: int = 10) -> str:
    """The seed spec as the article wrote it (its early form), with 1 s steps and local stand-ins."""
    return (
        SEED_SPEC_EARLY.replace(
            "interval: 30s\n  threshold: 10", f"interval: 1s\n  threshold: {threshold}"
        )
        .replace("interval: 30s", f"interval: {metric_interval}")
        .replace("http://flagger-loadtester.test/", loadtester)
        .replace("autoscaling/v2beta1", "autoscaling/v2")
    )


@dataclass
class Perch:
    plane: ControlPlane
    api: client.ApiClient
    installed: Installed
    webhook: Server
    webhook_config: str
    exporter: IstioExporter
    prometheus: PrometheusServer
    kubelet: FakeKubelet | None


@dataclass
class Analyzer:
    process: subprocess.Popen[bytes]
    log: Path
    metrics_port: int

    def metrics(self) -> str:
        return requests.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@dataclass
class Release:
    perch: Perch
    namespace: str
    tmp: Path
    name: str = "podinfo"
    loadtester: Recorder = field(default_factory=lambda: Recorder().start())
    analyzers: list[Analyzer] = field(default_factory=list)
    weights_seen: list[tuple[int, int]] = field(default_factory=list)
    # Every version of the route object the watch saw (its spec changes), in order.
    routes_seen: list[dict[str, Any]] = field(default_factory=list)
    # The primary's pod template revisions, in the order the API server stored them.
    primary_revisions_seen: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _manifest: dict[str, Any] | None = None

    # --- reading what a user reads -------------------------------------------------------------

    @property
    def api(self) -> client.ApiClient:
        return self.perch.api

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> str:
        return self.perch.plane.kubectl(
            "-n", self.namespace, *args, input=input, check=check
        ).stdout

    def deployment(self, name: str | None = None) -> dict[str, Any] | None:
        try:
            found = client.AppsV1Api(self.api).read_namespaced_deployment(
                name or self.name, self.namespace
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return self.api.sanitize_for_serialization(found)  # type: ignore[no-any-return]

    def primary(self) -> dict[str, Any]:
        found = self.deployment()
        assert found is not None, f"Deployment {self.namespace}/{self.name} is missing"
        return found

    def image(self, name: str | None = None) -> str:
        dep = self.deployment(name)
        assert dep is not None, f"Deployment {name or self.name} is missing"
        return str(dep["spec"]["template"]["spec"]["containers"][0]["image"])

    def canary(self) -> dict[str, Any] | None:
        try:
            return client.CustomObjectsApi(self.api).get_namespaced_custom_object(  # type: ignore[no-any-return]
                GROUP, VERSION, self.namespace, "canaries", self.name
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def status(self) -> dict[str, Any]:
        return (self.canary() or {}).get("status") or {}

    def phase(self) -> str:
        return str(self.status().get("phase") or "")

    def events(self) -> list[str]:
        """The messages of the Canary's Events, oldest first (as kubectl describe lists them),
        each as many times as it happened: a repeat updates the Event's count (analyzer.events)
        and is listed where its last occurrence falls."""
        return [e["message"] for e in self.event_objects() for _ in range(int(e.get("count") or 1))]

    def wait_events(self, *messages: str, deadline: float = 30.0) -> list[str]:
        """The events once all of `messages` are among them (events follow the status write
        that decided them, so they can arrive a moment after the phase)."""
        return list(
            self.wait_for(
                lambda: (found := self.events()) and all(m in found for m in messages) and found,
                f"events {messages}",
                deadline=deadline,
            )
        )

    def event_objects(self) -> list[dict[str, Any]]:
        found = client.CoreV1Api(self.api).list_namespaced_event(
            self.namespace, field_selector="involvedObject.kind=Canary"
        )
        raw = [self.api.sanitize_for_serialization(e) for e in found.items]
        return sorted(raw, key=lambda e: int(e["metadata"]["resourceVersion"]))

    def route_resource(self) -> tuple[str, str, str]:
        """(group, version, plural) of the object that carries the weights, by provider."""
        primary = self.deployment()
        text = getattr(self, "_spec", None)
        if primary is not None:
            text = (primary["metadata"].get("annotations") or {}).get("perch.dev/spec")
        provider = cached_parse_spec(text).provider if text else "istio"
        if provider == "gatewayapi":
            return "gateway.networking.k8s.io", "v1", "httproutes"
        return "networking.istio.io", "v1", "virtualservices"

    def route(self) -> dict[str, Any] | None:
        try:
            return client.CustomObjectsApi(
                self.api
            ).get_namespaced_custom_object(  # type: ignore[no-any-return]
                *self.route_resource()[:2], self.namespace, self.route_resource()[2], self.name
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def weights(self, route: dict[str, Any] | None = None) -> tuple[int, int] | None:
        route = route if route is not None else self.route()
        if route is None:
            return None
        spec = cached_parse_spec(self.primary()["metadata"]["annotations"].get("perch.dev/spec"))
        target = RouteTarget(name=self.name, namespace=self.namespace)
        return router_for(spec.provider).weights(route, target, spec)

    # --- traffic --------------------------------------------------------------------------------

    def flow(
        self, workload: str, *, error_ratio: float = 0.0, latency_seconds: float = 0.02
    ) -> None:
        """Live traffic for the workload; returns once Prometheus can compute a rate over it."""
        self.perch.exporter.set(
            self.namespace, workload, error_ratio=error_ratio, latency_seconds=latency_seconds
        )
        query = (
            "sum(rate(istio_request_duration_seconds_bucket{"
            f'destination_workload_namespace="{self.namespace}",'
            f'destination_workload="{workload}"}}[5s]))'
        )
        url = f"{self.perch.prometheus.url}/api/v1/query"

        def has_rate() -> bool:
            answer = requests.get(url, params={"query": query}, timeout=5)
            return bool(answer.ok and answer.json()["data"]["result"])

        self.wait_for(has_rate, f"Prometheus to have a rate for {workload}", deadline=60)

    # --- deploying ------------------------------------------------------------------------------

    def manifest(self, *, image: str, spec: str | None) -> str:
        """The HPA and the Deployment, as the user keeps them in git."""
        hpa = {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": {
                "scaleTargetRef": {
                    "apiVersion": "apps/v1",
                    "kind": "Deployment",
                    "name": self.name,
                },
                "minReplicas": 2,
                "maxReplicas": 4,
                "metrics": [
                    {
                        "type": "Resource",
                        "resource": {
                            "name": "cpu",
                            "target": {"type": "Utilization", "averageUtilization": 99},
                        },
                    }
                ],
            },
        }
        dep = podinfo(namespace=self.namespace, uid=None, defaulted=False, spec=spec, image=image)
        dep["metadata"]["name"] = self.name
        return yaml.safe_dump_all([hpa, dep], sort_keys=False)

    def create(self, spec: str | None, *, method: Method = "apply", image: str = "") -> None:
        """The first deploy: kubectl apply (client- or server-side) of the HPA and Deployment."""
        from tests.seed import IMAGE_STABLE

        text = self.manifest(image=image or IMAGE_STABLE, spec=spec)
        if method == "server-side":
            self.kubectl("apply", "--server-side", "--field-manager=helm", "-f", "-", input=text)
        else:
            self.kubectl("apply", "-f", "-", input=text)
        self._spec = spec
        self.wait_for(self._primary_rolled_out, "the primary to roll out", deadline=60)

    def release(self, image: str = IMAGE_NEW, *, method: Method = "set-image") -> str:
        """A new version, sent as each tool sends it; returns what kubectl printed."""
        if method == "set-image":
            return self.kubectl("set", "image", f"deployment/{self.name}", f"podinfod={image}")
        if method == "apply":
            return self.kubectl(
                "apply", "-f", "-", input=self.manifest(image=image, spec=self._spec)
            )
        if method == "server-side":
            return self.kubectl(
                "apply",
                "--server-side",
                "--field-manager=helm",
                "-f",
                "-",
                input=self.manifest(image=image, spec=self._spec),
            )
        if method == "patch":
            body = {
                "spec": {
                    "template": {"spec": {"containers": [{"name": "podinfod", "image": image}]}}
                }
            }
            return self.kubectl("patch", "deployment", self.name, "-p", json.dumps(body))
        # kubectl replace: a PUT of the whole object with its resourceVersion. The Deployment
        # controller writes the status in between, so a user retries on a conflict.
        for _ in range(20):
            live = self.primary()
            live.pop("status", None)
            live["spec"]["template"]["spec"]["containers"][0]["image"] = image
            done = self.perch.plane.kubectl(
                "-n", self.namespace, "replace", "-f", "-", input=json.dumps(live), check=False
            )
            if done.returncode == 0:
                return done.stdout + done.stderr
            if "the object has been modified" not in done.stderr:
                raise AssertionError(f"kubectl replace failed: {done.stderr}")
        raise AssertionError("kubectl replace kept conflicting")

    def _primary_rolled_out(self) -> bool:
        dep = self.deployment()
        return dep is not None and rolled_out(dep)

    # --- the analyzer ---------------------------------------------------------------------------

    def start_analyzer(
        self,
        *extra: str,
        env: dict[str, str] | None = None,
        prometheus: str | None = None,
        namespaces: tuple[str, ...] = (),
    ) -> Analyzer:
        port = free_port()
        log = self.tmp / f"analyzer-{len(self.analyzers)}.log"
        watched = [arg for ns in (self.namespace, *namespaces) for arg in ("--namespace", ns)]
        process = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("perch-analyzer")),
                "--prometheus-url",
                prometheus or self.perch.prometheus.url,
                "--prometheus-timeout",
                "2",
                *watched,
                "--metrics-bind",
                f"127.0.0.1:{port}",
                "--resync-seconds",
                "2",
                *(extra or ("--no-leader-elect",)),
            ],
            env={
                **os.environ,
                "KUBECONFIG": str(self.perch.installed.analyzer.kubeconfig),
                **(env or {}),
            },
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        analyzer = Analyzer(process, log, port)
        secrets.log_file(log)
        self.analyzers.append(analyzer)
        return analyzer

    def logs(self) -> str:
        return "\n".join(a.log.read_text(errors="replace") for a in self.analyzers)

    def log_lines(self) -> list[dict[str, Any]]:
        lines = []
        for raw in self.logs().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                lines.append(json.loads(raw))
        return lines

    # --- waiting --------------------------------------------------------------------------------

    def wait_for(
        self, predicate: Callable[[], Any], what: str, *, deadline: float = DEADLINE
    ) -> Any:
        end = time.monotonic() + deadline
        while True:
            value = predicate()
            if value:
                return value
            for a in self.analyzers:
                # -9, -15: killed or stopped by the test; 137: a crash point (analyzer/faults.py).
                if a.process.poll() not in (None, -9, -15, 0, 137):
                    raise AssertionError(
                        f"perch-analyzer exited with {a.process.returncode}:\n{self.logs()[-6000:]}"
                    )
            if time.monotonic() > end:
                raise AssertionError(
                    f"timed out after {deadline:g}s waiting for {what}\n"
                    f"status {self.status()}\nevents {self.events()}\n"
                    f"analyzer log:\n{self.logs()[-6000:]}\n"
                    f"webhook log:\n{self.perch.webhook.log()[-3000:]}"
                )
            time.sleep(0.1)

    def wait_phase(self, *phases: str, deadline: float = DEADLINE) -> str:
        return str(
            self.wait_for(
                lambda: self.phase() if self.phase() in phases else "",
                f"phase {' or '.join(phases)}",
                deadline=deadline,
            )
        )

    # --- the route's history --------------------------------------------------------------------

    def watch_weights(self) -> None:
        """Record every weight the route takes from now on (a watch sees each stored change)."""
        ready = threading.Event()

        group, version, plural = self.route_resource()

        def run() -> None:
            custom = client.CustomObjectsApi(self.api)
            rv = ""
            while not self._stop.is_set():
                try:
                    listed = custom.list_namespaced_custom_object(
                        group, version, self.namespace, plural
                    )
                    rv = listed["metadata"]["resourceVersion"]
                    for item in listed["items"]:
                        self._saw(item)
                    ready.set()
                    for event in watch.Watch().stream(
                        custom.list_namespaced_custom_object,
                        group,
                        version,
                        self.namespace,
                        plural,
                        resource_version=rv,
                        timeout_seconds=30,
                    ):
                        if self._stop.is_set():
                            return
                        if event["type"] in ("ADDED", "MODIFIED"):
                            self._saw(event["object"])
                except Exception:
                    time.sleep(0.2)

        threading.Thread(target=run, daemon=True, name=f"weights-{self.namespace}").start()
        ready.wait(30)

    def watch_primary(self) -> None:
        """Record every template revision the primary is stored with from now on."""
        ready = threading.Event()

        def run() -> None:
            apps = client.AppsV1Api(self.api)
            selector = f"metadata.name={self.name}"
            while not self._stop.is_set():
                try:
                    listed = apps.list_namespaced_deployment(
                        self.namespace, field_selector=selector
                    )
                    for item in listed.items:
                        self._saw_primary(self.api.sanitize_for_serialization(item))
                    ready.set()
                    for event in watch.Watch().stream(
                        apps.list_namespaced_deployment,
                        self.namespace,
                        field_selector=selector,
                        resource_version=listed.metadata.resource_version,
                        timeout_seconds=30,
                    ):
                        if self._stop.is_set():
                            return
                        if event["type"] in ("ADDED", "MODIFIED"):
                            self._saw_primary(event["raw_object"])
                except Exception:
                    time.sleep(0.2)

        threading.Thread(target=run, daemon=True, name=f"primary-{self.namespace}").start()
        ready.wait(30)

    def _saw_primary(self, dep: dict[str, Any]) -> None:
        revision = template_revision(dep["spec"]["template"])
        if not self.primary_revisions_seen or self.primary_revisions_seen[-1] != revision:
            self.primary_revisions_seen.append(revision)

    def _saw(self, route: dict[str, Any]) -> None:
        if route["metadata"]["name"] != self.name:
            return
        if not self.routes_seen or self.routes_seen[-1].get("spec") != route.get("spec"):
            self.routes_seen.append(route)
        with contextlib.suppress(Exception):
            got = self.weights(route)
            if got is not None and (not self.weights_seen or self.weights_seen[-1] != got):
                self.weights_seen.append(got)

    def close(self) -> None:
        self._stop.set()
        for a in self.analyzers:
            a.stop()
        self.loadtester.stop()
        self.perch.exporter.forget(self.namespace)


def rolled_out(dep: dict[str, Any]) -> bool:
    """`kubectl rollout status` says it finished."""
    spec, status, meta = dep.get("spec") or {}, dep.get("status") or {}, dep["metadata"]
    want = int(spec.get("replicas", 1))
    return (
        int(status.get("observedGeneration") or 0) >= int(meta.get("generation") or 0)
        and int(status.get("updatedReplicas") or 0) == want
        and int(status.get("availableReplicas") or 0) == want
        and int(status.get("replicas") or 0) == want
    )


def template_image(template: dict[str, Any]) -> str:
    return str(copy.deepcopy(template)["spec"]["containers"][0]["image"])


@contextlib.contextmanager
def ignoring_conflicts() -> Iterator[None]:
    try:
        yield
    except ApiException as exc:
        if exc.status != 409:
            raise
