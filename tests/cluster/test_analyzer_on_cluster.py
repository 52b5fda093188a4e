"""The whole flow on a real API server: kubectl-style update → canary at admission → analyzer
steps it to 50 % against the real Prometheus → promoted.

The webhook and the analyzer run here as processes; Prometheus scrapes local Istio-style traffic.
On a cluster without nodes (a bare API server) nothing would ever make pods ready, so the test
plays the Deployment controller and marks Deployments rolled out, the way kwok does; on a cluster
with nodes it leaves readiness to the cluster.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from tests.integration.test_analyzer_flow import seed_spec
from tests.seed import IMAGE_NEW, podinfo
from tests.support.mesh import DeploymentController, IstioExporter, Recorder, free_port
from tests.support.prometheus import PrometheusServer

pytestmark = pytest.mark.cluster
DEADLINE = 180.0


@pytest.fixture
def traffic(namespace: str, tmp_path: Path) -> Iterator[PrometheusServer]:
    exporter = IstioExporter().start()
    exporter.set(namespace, "podinfo-canary")
    prometheus = (
        PrometheusServer(tmp_path / "prometheus").scrape(f"127.0.0.1:{exporter.port}").start()
    )
    yield prometheus
    prometheus.stop()
    exporter.stop()


def _canary(api: client.ApiClient, namespace: str) -> dict[str, Any]:
    return client.CustomObjectsApi(api).get_namespaced_custom_object(
        "perch.dev", "v1alpha1", namespace, "canaries", "podinfo"
    )


def test_seed_canary_is_promoted_on_a_real_api_server(
    api: client.ApiClient, namespace: str, traffic: PrometheusServer, tmp_path: Path
) -> None:
    loadtester = Recorder().start()
    bare = not client.CoreV1Api(api).list_node().items
    controller = DeploymentController(api, namespace).start() if bare else None
    apps = client.AppsV1Api(api)
    dep = podinfo(
        namespace=namespace, uid=None, defaulted=False, spec=seed_spec(loadtester=loadtester.url)
    )
    dep["metadata"]["labels"] = {"app": "podinfo"}
    apps.create_namespaced_deployment(namespace, dep)
    live = api.sanitize_for_serialization(apps.read_namespaced_deployment("podinfo", namespace))
    live["spec"]["template"]["spec"]["containers"][0]["image"] = IMAGE_NEW
    apps.replace_namespaced_deployment("podinfo", namespace, live)
    assert _canary(api, namespace)["status"]["phase"] == "Progressing"

    log = (tmp_path / "analyzer.log").open("wb")
    analyzer = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("perch-analyzer")),
            "--no-leader-elect",
            "--prometheus-url",
            traffic.url,
            "--namespace",
            namespace,
            "--metrics-bind",
            f"127.0.0.1:{free_port()}",
        ],
        env={**os.environ, "KUBECONFIG": os.environ["PERCH_TEST_KUBECONFIG"]},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + DEADLINE
        while _canary(api, namespace)["status"]["phase"] not in ("Succeeded", "Failed"):
            assert time.monotonic() < deadline, (tmp_path / "analyzer.log").read_text()[-4000:]
            time.sleep(0.5)
        assert _canary(api, namespace)["status"]["phase"] == "Succeeded"
        primary = apps.read_namespaced_deployment("podinfo", namespace)
        assert primary.spec.template.spec.containers[0].image == IMAGE_NEW
    finally:
        analyzer.send_signal(signal.SIGTERM)
        analyzer.wait(30)
        loadtester.stop()
        if controller is not None:
            controller.stop()
