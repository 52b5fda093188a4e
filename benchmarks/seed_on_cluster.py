"""The seed's release timeline on a real control plane: time to canary and promotion overhead.

    .venv/bin/python benchmarks/seed_on_cluster.py [--runs 3] [--interval 1]

Starts a control plane from ../shared/kube (or PERCH_KUBE_ASSETS; or uses PERCH_TEST_KUBECONFIG),
installs Perch as the cluster tier does (chart CRDs and RBAC, ServiceAccount tokens), runs
perch-webhook registered by URL and perch-analyzer as processes, feeds a real Prometheus with
healthy Istio-shaped traffic, and releases the seed (early form, stepWeight 5 to maxWeight 50) with
``kubectl set image``. Everything is timed from watches (the moment the API server's watch
delivers each change to this process):

- update → canary: from just before ``kubectl set image`` starts to the canary Deployment's
  ADDED event (kubectl's own start-up, ~70 ms, included);
- update → first weight: to the VirtualService at 95/5;
- promotion overhead: (first weight -> Succeeded) minus what the design needs. The design: the
  first weight at tick 1, 50 % at tick 10, one more judged interval at 50 %, then the copy into
  the primary (10 intervals after the first weight); the primary's rollout (measured: from the copy
  reaching the primary to the primary rolled out); the route back to the primary as soon as the
  rollout is seen; one interval for in-flight requests to drain; Succeeded. So
  needed = 11 intervals + the rollout, and everything beyond is overhead.

Prints one line per run and a JSON summary; results go to benchmarks/seed_on_cluster.last.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kubernetes import client, watch  # noqa: E402

from perch.kube import load_api_client  # noqa: E402
from perch.revision import template_revision  # noqa: E402
from tests.seed import IMAGE_NEW  # noqa: E402
from tests.support import controlplane  # noqa: E402
from tests.support.install import install, register_webhook, wait_registered  # noqa: E402
from tests.support.kubelet import FakeKubelet  # noqa: E402
from tests.support.mesh import IstioExporter  # noqa: E402
from tests.support.prometheus import PrometheusServer  # noqa: E402
from tests.support.release import Perch, Release, rolled_out, seed_spec  # noqa: E402
from tests.support.webhook_server import PERCH_APP, start_server  # noqa: E402


class Timeline:
    """When each change of interest reached this process, from watches started before the
    release."""

    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        self.api, self.namespace = api, namespace
        self.marks: dict[str, float] = {}
        self.stop = threading.Event()
        self.lock = threading.Lock()

    def mark(self, what: str) -> None:
        with self.lock:
            self.marks.setdefault(what, time.monotonic())

    def start(self) -> None:
        apps, custom = client.AppsV1Api(self.api), client.CustomObjectsApi(self.api)
        streams = [
            (self._deployment, apps.list_namespaced_deployment, (self.namespace,)),
            (
                self._route,
                custom.list_namespaced_custom_object,
                ("networking.istio.io", "v1", self.namespace, "virtualservices"),
            ),
            (
                self._canary,
                custom.list_namespaced_custom_object,
                ("perch.dev", "v1alpha1", self.namespace, "canaries"),
            ),
        ]
        for handle, call, args in streams:
            threading.Thread(target=self._follow, args=(handle, call, args), daemon=True).start()

    def _follow(self, handle: Any, call: Any, args: tuple[Any, ...]) -> None:
        while not self.stop.is_set():
            try:
                for event in watch.Watch().stream(call, *args, timeout_seconds=30):
                    obj = event.get("raw_object") or event.get("object")
                    if isinstance(obj, dict):
                        handle(event["type"], obj)
                    if self.stop.is_set():
                        return
            except Exception:
                time.sleep(0.1)

    def _deployment(self, kind: str, dep: dict[str, Any]) -> None:
        name = dep["metadata"]["name"]
        if name == "podinfo-canary" and kind == "ADDED":
            self.mark("canary-created")
        copied = (
            name == "podinfo"
            and "released" in self.marks
            and template_revision(dep["spec"]["template"]) == self.marks_revision()
        )
        if copied:
            self.mark("copied")
            if rolled_out(dep):
                self.mark("primary-rolled-out")

    def marks_revision(self) -> str:
        return getattr(self, "revision", "")

    def _route(self, kind: str, route: dict[str, Any]) -> None:
        weights = [d.get("weight", 0) for d in route["spec"]["http"][0]["route"]]
        if weights[1] == 5:
            self.mark("first-weight")
        if weights[1] == 50:
            self.mark("max-weight")
        if weights[1] == 0 and "max-weight" in self.marks:
            self.mark("routed-back")

    def _canary(self, kind: str, canary: dict[str, Any]) -> None:
        status = canary.get("status") or {}
        phase = status.get("phase")
        if phase == "Progressing" and status.get("canaryRevision"):
            self.revision = status["canaryRevision"]
        if phase in ("Promoting", "Finalising", "Succeeded", "Failed"):
            self.mark(phase)


def one_run(perch: Perch, tmp: Path, interval: float) -> dict[str, Any]:
    namespace = f"bench-{uuid.uuid4().hex[:6]}"
    client.CoreV1Api(perch.api).create_namespace({"metadata": {"name": namespace}})
    app = Release(perch=perch, namespace=namespace, tmp=tmp)
    try:
        app.flow("podinfo-canary")
        spec = seed_spec(loadtester=app.loadtester.url).replace(
            "interval: 1s\n  threshold", f"interval: {interval:g}s\n  threshold"
        )
        app.create(spec)
        app.start_analyzer()
        timeline = Timeline(perch.api, namespace)
        timeline.start()
        time.sleep(1)  # the watches are established
        timeline.mark("released")
        app.release(IMAGE_NEW)
        app.wait_phase("Succeeded", "Failed", deadline=60 + 20 * interval)
        deadline = time.monotonic() + 10
        while "Succeeded" not in timeline.marks and time.monotonic() < deadline:
            time.sleep(0.05)
        timeline.stop.set()
        m = timeline.marks
        t0 = m["released"]
        rollout = m["primary-rolled-out"] - m["copied"]
        needed = 11 * interval + rollout
        took = m["Succeeded"] - m["first-weight"]
        return {
            "phase": app.phase(),
            "update_to_canary_s": round(m["canary-created"] - t0, 3),
            "update_to_first_weight_s": round(m["first-weight"] - t0, 3),
            "first_weight_to_copy_s": round(m["copied"] - m["first-weight"], 3),
            "primary_rollout_s": round(rollout, 3),
            "rolled_out_to_routed_back_s": round(m["routed-back"] - m["primary-rolled-out"], 3),
            "routed_back_to_succeeded_s": round(m["Succeeded"] - m["routed-back"], 3),
            "first_weight_to_succeeded_s": round(took, 3),
            "needed_s": round(needed, 3),
            "overhead_s": round(took - needed, 3),
        }
    finally:
        app.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--interval", type=float, default=1.0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="perch-bench-"))
    session = controlplane.start(work / "kube")
    exporter = IstioExporter().start()
    prometheus = PrometheusServer(work / "prometheus", scrape_interval="1s")
    prometheus.scrape(f"127.0.0.1:{exporter.port}").start()
    kubelet = None
    server = None
    try:
        plane = session.plane
        api = load_api_client(str(plane.kubeconfig))
        kubelet = FakeKubelet(api).start() if plane.local else None
        installed = install(
            api,
            admin_kubeconfig=plane.kubeconfig,
            directory=work,
            values={"analyzer": {"mode": "deployment"}},
        )
        server = start_server(
            work / "webhook", app=PERCH_APP, env={"KUBECONFIG": str(installed.webhook.kubeconfig)}
        )
        config = register_webhook(
            api,
            namespace=installed.release.namespace,
            host="127.0.0.1",
            port=server.port,
            ca=server.certs.ca,
            name="zz-perch-bench.perch.dev",
        )
        wait_registered(api)
        perch = Perch(
            plane, api, installed, server, config["metadata"]["name"], exporter, prometheus, kubelet
        )
        results = []
        for run in range(args.runs):
            (work / f"run-{run}").mkdir()
            result = one_run(perch, work / f"run-{run}", args.interval)
            results.append(result)
            print(json.dumps(result), flush=True)
        summary = {
            "interval_s": args.interval,
            "runs": results,
            "update_to_canary_median_s": statistics.median(
                r["update_to_canary_s"] for r in results
            ),
            "overhead_median_s": statistics.median(r["overhead_s"] for r in results),
            "overhead_max_s": max(r["overhead_s"] for r in results),
        }
        print(json.dumps(summary, indent=2))
        (REPO / "benchmarks" / "seed_on_cluster.last.json").write_text(
            json.dumps(summary, indent=2) + "\n"
        )
        return 0
    finally:
        if server is not None:
            server.terminate()
        if kubelet is not None:
            kubelet.stop()
        prometheus.stop()
        exporter.stop()
        session.stop()


if __name__ == "__main__":
    sys.exit(main())
