"""What a cluster with Istio would provide around the analyzer, run locally for the tests.

- IstioExporter: Istio's request metrics for chosen workloads, served for the real Prometheus to
  scrape, with traffic generated live (healthy, failing with 500s, or slow).
- DeploymentController: plays the Deployment controller and kubelet on the API stand-in: every
  Deployment whose spec changed gets a status that says it rolled out (or, for chosen names,
  that it never becomes ready).
- Recorder: a local HTTP server standing in for a load tester, Slack, or a generic webhook.
"""

from __future__ import annotations

import contextlib
import json
import random
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from kubernetes import client
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

ISTIO_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Behaviour:
    error_ratio: float = 0.0
    latency_seconds: float = 0.02


class IstioExporter:
    """istio_requests_total and istio_request_duration_seconds for each workload, live."""

    def __init__(self, *, requests_per_tick: int = 20, tick_seconds: float = 0.1):
        self.port = free_port()
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "istio_requests",
            "requests",
            ["reporter", "destination_workload_namespace", "destination_workload", "response_code"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "istio_request_duration_seconds",
            "latency",
            ["reporter", "destination_workload_namespace", "destination_workload"],
            buckets=ISTIO_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.behaviour: dict[tuple[str, str], Behaviour] = {}
        self.requests_per_tick = requests_per_tick
        self.tick_seconds = tick_seconds
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._server: Any = None

    def set(
        self,
        namespace: str,
        workload: str,
        *,
        error_ratio: float = 0.0,
        latency_seconds: float = 0.02,
    ) -> None:
        with self._lock:
            self.behaviour[(namespace, workload)] = Behaviour(error_ratio, latency_seconds)

    def clear(self) -> None:
        with self._lock:
            self.behaviour.clear()

    def forget(self, namespace: str) -> None:
        """Stop generating traffic for the workloads of one namespace (a finished test's)."""
        with self._lock:
            for key in [k for k in self.behaviour if k[0] == namespace]:
                del self.behaviour[key]

    def start(self) -> IstioExporter:
        self._server, _ = start_http_server(self.port, addr="127.0.0.1", registry=self.registry)
        threading.Thread(target=self._run, daemon=True, name="istio-exporter").start()
        return self

    def _run(self) -> None:
        rng = random.Random(7)
        while not self._stop.is_set():
            with self._lock:
                flows = dict(self.behaviour)
            for (namespace, workload), b in flows.items():
                labels = ("destination", namespace, workload)
                for _ in range(self.requests_per_tick):
                    code = "500" if rng.random() < b.error_ratio else "200"
                    self.requests.labels(*labels, code).inc()
                    self.duration.labels(*labels).observe(b.latency_seconds * rng.uniform(0.9, 1.0))
            self._stop.wait(self.tick_seconds)

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()


class DeploymentController:
    """Marks Deployments rolled out, as the Deployment controller and kubelet would."""

    def __init__(
        self, api: client.ApiClient, namespace: str, *, never_ready: set[str] | None = None
    ):
        self.apps = client.AppsV1Api(api)
        self.namespace = namespace
        self.never_ready = never_ready if never_ready is not None else set()
        self._stop = threading.Event()

    def start(self) -> DeploymentController:
        threading.Thread(target=self._run, daemon=True, name="deployment-controller").start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            # A test helper keeps going; the test asserts the outcomes.
            with contextlib.suppress(Exception):
                self._reconcile()
            self._stop.wait(0.1)

    def _reconcile(self) -> None:
        raw = self.apps.api_client.sanitize_for_serialization(
            self.apps.list_namespaced_deployment(self.namespace)
        )
        for dep in raw.get("items", []):
            meta, spec, status = dep["metadata"], dep.get("spec", {}), dep.get("status") or {}
            replicas = spec.get("replicas", 1)
            ready = 0 if meta["name"] in self.never_ready else replicas
            want = {
                "observedGeneration": meta.get("generation", 1),
                "replicas": replicas,
                "updatedReplicas": replicas,
                "readyReplicas": ready,
                "availableReplicas": ready,
            }
            if all(status.get(k) == v for k, v in want.items()):
                continue
            self.apps.patch_namespaced_deployment_status(
                meta["name"],
                self.namespace,
                {"status": want},
                _content_type="application/merge-patch+json",
            )

    def stop(self) -> None:
        self._stop.set()


@dataclass
class Recorder:
    """A local HTTP endpoint that records every POST and answers as told."""

    status: int = 200
    delay: float = 0.0
    received: list[dict[str, Any]] = field(default_factory=list)
    port: int = 0

    def start(self) -> Recorder:
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                try:
                    payload = json.loads(body)
                except ValueError:
                    payload = {"raw": body.decode(errors="replace")}
                recorder.received.append({"path": self.path, "body": payload})
                if recorder.delay:
                    time.sleep(recorder.delay)
                self.send_response(recorder.status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: object) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def stop(self) -> None:
        self._server.shutdown()
