"""The analyzer's judgement of live metrics and gates, on the API stand-in.

What these tests show does not depend on the API server's behaviour: halts on latency and on no
data, gates that fail or time out, a dead Prometheus, and the analyzer's own /metrics. The real
Prometheus scrapes live Istio-style metrics and perch-analyzer runs as a process; the stand-in
only holds the objects. Everything that depends on Kubernetes itself (promotion through the
webhook, rollback, restarts and kills, leader election, kubectl perch, an update refused after
admission) runs on a real control plane in tests/cluster/.
"""

from __future__ import annotations

import copy
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from kubernetes import client

from perch.resources import Kube
from tests.seed import IMAGE_NEW, SEED_SPEC_EARLY, admission_review, podinfo
from tests.standin import StandIn
from tests.support.mesh import DeploymentController, IstioExporter, Recorder, free_port
from tests.support.prometheus import PrometheusServer, missing_binaries
from webhook.handler import PerchAdmitter

pytestmark = pytest.mark.skipif(missing_binaries() is not None, reason=str(missing_binaries()))

REPO = Path(__file__).resolve().parents[2]
DEADLINE = 120.0


def seed_spec(*, loadtester: str, metric_interval: str = "5s", threshold: int = 10) -> str:
    """The seed spec, as the article wrote it, with 1 s steps and local stand-ins."""
    return (
        SEED_SPEC_EARLY.replace(
            "interval: 30s\n  threshold: 10", f"interval: 1s\n  threshold: {threshold}"
        )
        .replace("interval: 30s", f"interval: {metric_interval}")
        .replace("http://flagger-loadtester.test/", loadtester)
        .replace("autoscaling/v2beta1", "autoscaling/v2")
    )


@pytest.fixture(scope="module")
def exporter() -> Iterator[IstioExporter]:
    running = IstioExporter().start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def prometheus(
    exporter: IstioExporter, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PrometheusServer]:
    server = PrometheusServer(tmp_path_factory.mktemp("prometheus"), scrape_interval="1s")
    server.scrape(f"127.0.0.1:{exporter.port}").start()
    yield server
    server.stop()


@dataclass
class Rollout:
    """One canary's world: its namespace in the stand-in, its traffic, its analyzer."""

    standin: StandIn
    namespace: str
    exporter: IstioExporter
    prometheus: PrometheusServer
    loadtester: Recorder
    slack: Recorder
    tmp: Path
    analyzers: list[subprocess.Popen[bytes]]

    @property
    def api(self) -> client.ApiClient:
        return self.standin.api_client()

    def flow(
        self, workload: str, *, error_ratio: float = 0.0, latency_seconds: float = 0.02
    ) -> None:
        """Live traffic for the workload; returns once Prometheus can compute a rate over it."""
        self.exporter.set(
            self.namespace, workload, error_ratio=error_ratio, latency_seconds=latency_seconds
        )
        query = (
            f'sum(rate(istio_request_duration_seconds_bucket{{destination_workload_namespace="{self.namespace}",'
            f'destination_workload="{workload}"}}[5s]))'
        )

        def has_rate() -> bool:
            answer = requests.get(
                f"{self.prometheus.url}/api/v1/query", params={"query": query}, timeout=5
            )
            return bool(answer.ok and answer.json()["data"]["result"])

        self.wait_for(has_rate, f"Prometheus to have a rate for {workload}", deadline=60)

    def deploy(self, spec: str) -> None:
        """kubectl apply of the seed (HPA + Deployment), then kubectl set image: a canary starts."""
        client.AutoscalingV2Api(self.api).create_namespaced_horizontal_pod_autoscaler(
            self.namespace,
            {
                "metadata": {"name": "podinfo"},
                "spec": {
                    "scaleTargetRef": {
                        "apiVersion": "apps/v1",
                        "kind": "Deployment",
                        "name": "podinfo",
                    },
                    "minReplicas": 2,
                    "maxReplicas": 4,
                },
            },
        )
        admitter = PerchAdmitter(Kube(self.api), adopt_timeout=5)
        apps = client.AppsV1Api(self.api)
        dep = podinfo(namespace=self.namespace, uid=None, spec=spec)
        for key in ("resourceVersion", "generation"):
            dep["metadata"].pop(key, None)
        dep = self._admit(admitter, "CREATE", dep, None)
        apps.create_namespaced_deployment(self.namespace, dep)
        # The Deployment controller writes status meanwhile: retry on a stale resourceVersion,
        # as kubectl does.
        for _ in range(10):
            live = self.get("deployments", "podinfo")
            new = copy.deepcopy(live)
            new["spec"]["template"]["spec"]["containers"][0]["image"] = IMAGE_NEW
            new = self._admit(admitter, "UPDATE", new, live)
            try:
                apps.replace_namespaced_deployment("podinfo", self.namespace, new)
                return
            except client.exceptions.ApiException as exc:
                if exc.status != 409:
                    raise
        pytest.fail("could not update the Deployment")

    @staticmethod
    def _admit(
        admitter: PerchAdmitter, op: str, obj: dict[str, Any], old: dict[str, Any] | None
    ) -> dict[str, Any]:
        import base64
        import json

        import jsonpatch

        review = admission_review(operation=op, obj=obj, old=old, uid=str(uuid.uuid4()))
        answer = admitter.admit(review).review["response"]
        assert answer["allowed"], answer
        if "patch" in answer:
            obj = jsonpatch.apply_patch(obj, json.loads(base64.b64decode(answer["patch"])))
        return obj

    def get(self, plural: str, name: str) -> dict[str, Any]:
        found = self.standin.objects(plural).get((plural, self.namespace, name))
        assert found is not None, f"{plural}/{name} missing"
        return found

    def status(self) -> dict[str, Any]:
        return self.get("canaries", "podinfo").get("status") or {}

    def events(self) -> list[str]:
        found = [
            (o.get("metadata", {}).get("resourceVersion", ""), o.get("message", ""))
            for (_, ns, _), o in self.standin.objects("events").items()
            if ns == self.namespace
        ]
        return [m for _, m in sorted(found, key=lambda x: int(x[0] or 0))]

    def start_analyzer(
        self, *extra: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        kubeconfig = self.standin.kubeconfig(self.tmp / f"kubeconfig-{uuid.uuid4().hex[:6]}")
        script = Path(sys.executable).with_name("perch-analyzer")
        log = (self.tmp / f"analyzer-{len(self.analyzers)}.log").open("wb")
        process = subprocess.Popen(
            [
                str(script),
                "--prometheus-url",
                self.prometheus.url,
                "--prometheus-timeout",
                "2",
                "--namespace",
                self.namespace,
                "--metrics-bind",
                f"127.0.0.1:{free_port()}",
                "--resync-seconds",
                "2",
                *extra,
            ],
            env={
                **os.environ,
                "KUBECONFIG": str(kubeconfig),
                "PERCH_SLACK_URL": self.slack.url,
                **(env or {}),
            },
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        self.analyzers.append(process)
        return process

    def logs(self) -> str:
        return "\n".join(
            p.read_text(errors="replace") for p in sorted(self.tmp.glob("analyzer-*.log"))
        )

    def wait_for(self, predicate, what: str, deadline: float = DEADLINE) -> None:
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            if predicate():
                return
            for p in self.analyzers:
                if p.poll() not in (None, -9, -15, 0):
                    pytest.fail(
                        f"perch-analyzer exited with {p.returncode}:\n{self.logs()[-5000:]}"
                    )
            time.sleep(0.1)
        pytest.fail(
            f"timed out waiting for {what}; status {self.status()}\nevents {self.events()}\n{self.logs()[-5000:]}"
        )


@pytest.fixture
def rollout(
    standin: StandIn, exporter: IstioExporter, prometheus: PrometheusServer, tmp_path: Path
) -> Iterator[Rollout]:
    exporter.clear()
    namespace = f"test-{uuid.uuid4().hex[:5]}"
    client.CoreV1Api(standin.api_client()).create_namespace({"metadata": {"name": namespace}})
    controller = DeploymentController(standin.api_client(), namespace).start()
    loadtester, slack = Recorder().start(), Recorder().start()
    world = Rollout(standin, namespace, exporter, prometheus, loadtester, slack, tmp_path, [])
    yield world
    for p in world.analyzers:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
    controller.stop()
    loadtester.stop()
    slack.stop()


def weights_advanced(events: list[str], name: str) -> list[int]:
    return [
        int(m.group(1))
        for e in events
        if (m := re.fullmatch(rf"Advance {name} canary weight (\d+)", e))
    ]


def test_slow_canary_halts_on_latency(rollout: Rollout) -> None:
    # p99 interpolated within Istio's 1 s to 2.5 s bucket: "request duration 2.485s > 500ms".
    rollout.flow("podinfo-canary", latency_seconds=1.515)
    rollout.deploy(seed_spec(loadtester=rollout.loadtester.url, threshold=3))
    rollout.start_analyzer("--no-leader-elect")
    rollout.wait_for(lambda: rollout.status().get("phase") == "Failed", "rollback")
    name = f"podinfo.{rollout.namespace}"
    assert any(
        re.fullmatch(
            rf"Halt {re.escape(name)} advancement request duration \d+\.\d{{3}}s > 500ms", e
        )
        for e in rollout.events()
    ), rollout.events()


def test_no_data_halts_and_says_so(rollout: Rollout) -> None:
    # No traffic at all for the canary: "no data" is its own outcome and fails the check.
    rollout.deploy(seed_spec(loadtester=rollout.loadtester.url, threshold=2))
    rollout.start_analyzer("--no-leader-elect")
    rollout.wait_for(lambda: rollout.status().get("phase") == "Failed", "rollback")
    assert any("no data for metric request-success-rate" in e for e in rollout.events())


def test_gate_answering_500_counts_as_failed_check(rollout: Rollout) -> None:
    rollout.flow("podinfo-canary")
    rollout.loadtester.status = 500
    rollout.deploy(seed_spec(loadtester=rollout.loadtester.url, threshold=2))
    rollout.start_analyzer("--no-leader-elect")
    rollout.wait_for(lambda: rollout.status().get("phase") == "Failed", "rollback")
    assert any("load-test" in e for e in rollout.events()), rollout.events()


def test_gate_timing_out_counts_as_failed_check(rollout: Rollout) -> None:
    rollout.flow("podinfo-canary")
    rollout.loadtester.delay = 3.0
    spec = seed_spec(loadtester=rollout.loadtester.url, threshold=2).replace(
        "timeout: 5s", "timeout: 1s"
    )
    rollout.deploy(spec)
    rollout.start_analyzer("--no-leader-elect")
    rollout.wait_for(lambda: rollout.status().get("phase") == "Failed", "rollback")
    assert any("load-test" in e for e in rollout.events()), rollout.events()


def test_prometheus_killed_mid_analysis_halts_and_never_promotes(
    rollout: Rollout, exporter: IstioExporter, tmp_path: Path
) -> None:
    # A Prometheus of its own, so that killing it leaves the other tests theirs.
    own = PrometheusServer(tmp_path / "own-prometheus", scrape_interval="1s")
    own.scrape(f"127.0.0.1:{exporter.port}").start()
    rollout.prometheus = own
    try:
        rollout.flow("podinfo-canary")
        rollout.deploy(seed_spec(loadtester=rollout.loadtester.url, threshold=3))
        rollout.start_analyzer("--no-leader-elect")
        rollout.wait_for(lambda: rollout.status().get("canaryWeight", 0) >= 10, "weight 10")
        own.kill()
        rollout.wait_for(lambda: rollout.status().get("phase") == "Failed", "rollback")
        # The rollback's event is recorded after its status is committed (see
        # docs/analyzer.md, "Commit protocol"): wait for it rather than read at once.
        rollback = f"Rolling back podinfo.{rollout.namespace} failed checks threshold reached 3"
        rollout.wait_for(lambda: rollback in rollout.events(), "the rollback event")
    finally:
        own.stop()
    events = rollout.events()
    assert any("Prometheus query failed" in e for e in events), events
    primary = rollout.get("deployments", "podinfo")
    assert primary["spec"]["template"]["spec"]["containers"][0]["image"] != IMAGE_NEW


def test_metrics_endpoint_reports_canary_state(rollout: Rollout) -> None:
    rollout.flow("podinfo-canary")
    rollout.deploy(seed_spec(loadtester=rollout.loadtester.url))
    port = free_port()
    rollout.start_analyzer("--no-leader-elect", "--metrics-bind", f"127.0.0.1:{port}")
    rollout.wait_for(lambda: rollout.status().get("phase") == "Succeeded", "promotion")

    def scrape() -> str:
        return requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text

    rollout.wait_for(lambda: 'perch_canary_status{name="podinfo"' in scrape(), "metrics")
    text = scrape()
    assert re.search(
        rf'perch_canary_status{{name="podinfo",namespace="{rollout.namespace}"}} 1\.0', text
    ), text
    assert "perch_canary_weight" in text
    assert re.search(rf'perch_canary_total{{namespace="{rollout.namespace}"}} 1\.0', text), text
    assert "perch_analyzer_prometheus_queries_total" in text
    assert "perch_analyzer_tick_lag_seconds" in text
    assert 'perch_analyzer_ticks_dropped_total{reason="late"}' in text
    assert "perch_analyzer_ticks_total" in text
    assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
    assert requests.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200
