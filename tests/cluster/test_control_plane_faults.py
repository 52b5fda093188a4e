"""The control plane itself failing under Perch: the API server restarted mid-analysis, and the
webhook unreachable.

These run on a control plane of their own (restarting the session's would disturb every other
test), with Perch installed on it as the session installs it. Clients reach the API server through
a relay (tests/support/relay.py) that keeps one address across the restart, as a cluster's API
endpoint does; the API server reaches the webhook through another relay, which a test unplugs to
take the webhook down.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from kubernetes import client

from perch.kube import load_api_client
from tests.seed import IMAGE_NEW
from tests.support import controlplane
from tests.support.install import install, register_webhook
from tests.support.kubelet import FakeKubelet
from tests.support.mesh import IstioExporter
from tests.support.prometheus import PrometheusServer
from tests.support.relay import Cable
from tests.support.release import Perch, Release, seed_spec
from tests.support.webhook_server import PERCH_APP, start_server

PLAIN = """\
apiVersion: apps/v1
kind: Deployment
metadata: {{name: plain, namespace: {namespace}}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: plain}}}}
  template:
    metadata: {{labels: {{app: plain}}}}
    spec: {{containers: [{{name: web, image: "nginx:1"}}]}}
"""


def _port(server: str) -> int:
    return int(server.rsplit(":", 1)[1])


class Stack:
    """A private control plane with Perch on it, and the relays a test pulls."""

    def __init__(self, tmp: Path, mesh: tuple[IstioExporter, PrometheusServer]) -> None:
        self.session = controlplane.start(tmp / "kube")
        plane = self.session.plane
        self.api_relay = Cable(_port(controlplane.server_of(plane.kubeconfig)))
        # Everyone (admin, webhook, analyzer, kubelet, kubectl) goes through the relay.
        relayed = tmp / "admin.kubeconfig"
        relayed.write_text(plane.kubeconfig.read_text())
        controlplane.repoint(relayed, server=self.api_relay.url)
        self.plane = replace(plane, kubeconfig=relayed)
        self.api = load_api_client(str(relayed))
        self.kubelet = FakeKubelet(self.api).start()
        self.installed = install(
            self.api,
            admin_kubeconfig=relayed,
            directory=tmp,
            values={"analyzer": {"mode": "deployment"}},
        )
        self.webhook = start_server(
            tmp / "webhook",
            app=PERCH_APP,
            env={"KUBECONFIG": str(self.installed.webhook.kubeconfig)},
        )
        self.webhook_relay = Cable(self.webhook.port)
        config = register_webhook(
            self.api,
            namespace=self.installed.release.namespace,
            host="127.0.0.1",
            port=self.webhook_relay.port,
            ca=self.webhook.certs.ca,
            name="zz-perch-faults.perch.dev",
            timeout_seconds=5,
        )
        self.perch = Perch(
            plane=self.plane,
            api=self.api,
            installed=self.installed,
            webhook=self.webhook,
            webhook_config=config["metadata"]["name"],
            exporter=mesh[0],
            prometheus=mesh[1],
            kubelet=self.kubelet,
        )

    def restart_api_server(self) -> None:
        """kube-down, kube-up on the same folder (etcd keeps its data); the relay follows the
        API server to wherever kube-up put it."""
        self.api_relay.unplug()
        self.session.plane.restart()
        self.api_relay.plug(_port(controlplane.server_of(self.session.plane.kubeconfig)))

    def close(self) -> None:
        self.webhook.terminate()
        self.webhook_relay.close()
        self.kubelet.stop()
        self.api_relay.close()
        self.session.stop()


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, mesh: tuple[IstioExporter, PrometheusServer]
) -> Iterator[Stack]:
    if controlplane.assets() is None:
        pytest.skip("needs kube-up/kube-down to start (and restart) a control plane of its own")
    built = Stack(tmp_path_factory.mktemp("faults"), mesh)
    yield built
    built.close()


@pytest.fixture
def app(stack: Stack, tmp_path: Path) -> Iterator[Release]:
    ns = f"f-{uuid.uuid4().hex[:6]}"
    client.CoreV1Api(stack.api).create_namespace({"metadata": {"name": ns}})
    release = Release(perch=stack.perch, namespace=ns, tmp=tmp_path)
    release.flow("podinfo-canary")
    yield release
    release.close()


def test_an_api_server_restart_mid_analysis_loses_no_step(stack: Stack, app: Release) -> None:
    app.create(seed_spec(loadtester=app.loadtester.url))
    app.watch_weights()
    app.watch_primary()
    app.release(IMAGE_NEW)
    app.start_analyzer()
    app.wait_for(lambda: app.status().get("canaryWeight", 0) >= 15, "weight 15")
    stack.restart_api_server()
    # The webhook answers again at once: a dry-run release gets Perch's answer.
    dry = app.perch.plane.kubectl(
        "-n", app.namespace, "set", "image", "deployment/podinfo",
        "podinfod=ghcr.io/stefanprodan/podinfo:6.7.2", "--dry-run=server",
    )  # fmt: skip
    assert "perch: revision" in dry.stderr and "replaces" in dry.stderr, dry.stderr
    # The analyzer's watches recover and the release finishes: no step repeated or skipped.
    app.wait_phase("Succeeded", "Failed")
    assert app.phase() == "Succeeded", app.events()
    steps = [(100 - w, w) for w in range(5, 55, 5)]
    assert app.weights_seen == [(100, 0), *steps, (100, 0)]
    assert len(app.primary_revisions_seen) == 2
    assert app.image() == IMAGE_NEW


def test_with_the_webhook_down_only_releases_of_opted_in_apps_wait(
    stack: Stack, app: Release
) -> None:
    app.create(seed_spec(loadtester=app.loadtester.url))
    plain = PLAIN.format(namespace=app.namespace)
    stack.webhook_relay.unplug()
    try:
        # A release of an opted-in Deployment is refused, saying which webhook failed.
        refused = app.perch.plane.kubectl(
            "-n", app.namespace, "set", "image", "deployment/podinfo", f"podinfod={IMAGE_NEW}",
            check=False,
        )  # fmt: skip
        assert refused.returncode != 0
        assert 'failed calling webhook "deployments.perch.dev"' in refused.stderr, refused.stderr
        assert app.deployment("podinfo-canary") is None
        # Everything else is admitted: another Deployment created and released, the opted-in
        # one scaled and labelled (matchConditions keep the API server from calling Perch).
        app.kubectl("apply", "-f", "-", input=plain)
        app.kubectl("set", "image", "deployment/plain", "web=nginx:2")
        app.kubectl("scale", "deployment/podinfo", "--replicas=3")
        app.kubectl("label", "deployment/podinfo", "tier=frontend")
        assert app.image("plain") == "nginx:2"
    finally:
        stack.webhook_relay.plug()
    # Back up: the same release goes through Perch again.
    done = app.perch.plane.kubectl(
        "-n", app.namespace, "set", "image", "deployment/podinfo", f"podinfod={IMAGE_NEW}"
    )
    assert "perch: canary started" in done.stderr
