"""The cluster tier: Perch against a real Kubernetes control plane.

The session starts (or takes, from PERCH_TEST_KUBECONFIG) a real API server with its controllers
(tests/support/controlplane.py), installs Perch from the chart (CRDs, ServiceAccounts, RBAC),
runs ``perch-webhook`` as a process with the webhook's ServiceAccount token and registers it with
a URL clientConfig, and feeds a real Prometheus with Istio-shaped traffic. On a control plane with
no nodes the kubelet stand-in makes pods run and become ready. Each test gets its own namespace;
tests that need the analyzer start ``perch-analyzer`` as a process with its ServiceAccount.

Without a control plane every test here is skipped, and the reason says how to get one
(tests/conftest.py); with PERCH_REQUIRE_CLUSTER=1, as in CI, a skip is a failure.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from perch.kube import load_api_client
from tests.support import controlplane, secrets
from tests.support.install import install, register_webhook, wait_registered
from tests.support.kubelet import FakeKubelet
from tests.support.mesh import IstioExporter
from tests.support.prometheus import PrometheusServer, missing_binaries
from tests.support.release import Perch, Release
from tests.support.webhook_server import PERCH_APP, Server, start_server

# Where the API server reaches the webhook process: this host, unless the cluster runs elsewhere
# (kind: the Docker bridge's address, e.g. 172.18.0.1).
HOST = os.environ.get("PERCH_TEST_WEBHOOK_HOST", "127.0.0.1")


@pytest.fixture(scope="session")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[controlplane.ControlPlane]:
    session = controlplane.start(tmp_path_factory.mktemp("kube"))
    try:
        yield session.plane
    finally:
        session.stop()


@pytest.fixture(scope="session")
def api(plane: controlplane.ControlPlane) -> client.ApiClient:
    return load_api_client(str(plane.kubeconfig))


@pytest.fixture(scope="session")
def kubelet(api: client.ApiClient) -> Iterator[FakeKubelet | None]:
    nodes = client.CoreV1Api(api).list_node().items
    if any(n.metadata.name != "perch-test-node" for n in nodes):
        yield None  # a cluster with nodes of its own runs pods for real
        return
    fake = FakeKubelet(api).start()
    yield fake
    fake.stop()


@pytest.fixture(scope="session")
def installed(
    api: client.ApiClient,
    plane: controlplane.ControlPlane,
    tmp_path_factory: pytest.TempPathFactory,
):  # type: ignore[no-untyped-def]
    # analyzer.mode=deployment: the analyzer gets a ServiceAccount of its own, so the audit log
    # tells its calls from the webhook's (the sidecar mode binds both roles to one account).
    return install(
        api,
        admin_kubeconfig=plane.kubeconfig,
        directory=tmp_path_factory.mktemp("identities"),
        values={"analyzer": {"mode": "deployment"}},
    )


@pytest.fixture(scope="session")
def webhook(
    api: client.ApiClient,
    installed,
    tmp_path_factory: pytest.TempPathFactory,  # type: ignore[no-untyped-def]
) -> Iterator[tuple[Server, str]]:
    server = start_server(
        tmp_path_factory.mktemp("webhook"),
        app=PERCH_APP,
        env={
            "KUBECONFIG": str(installed.webhook.kubeconfig),
            "PERCH_LOG_LEVEL": "debug",
            "PERCH_ADOPT_TIMEOUT_SECONDS": "5",
        },
        bind_host=HOST,
    )
    secrets.log_file(server.log_path)
    key = server.certs.key.read_text()
    secrets.remember(*[line for line in key.splitlines() if "-----" not in line])
    name = f"zz-perch-test-{uuid.uuid4().hex[:6]}.perch.dev"
    register_webhook(
        api,
        namespace=installed.release.namespace,
        host=HOST,
        port=server.port,
        ca=server.certs.ca,
        name=name,
    )
    adm = client.AdmissionregistrationV1Api(api)
    try:
        wait_registered(api)
        yield server, name
    finally:
        adm.delete_mutating_webhook_configuration(name)
        server.terminate()


@pytest.fixture(scope="session")
def mesh(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[IstioExporter, PrometheusServer]]:
    why = missing_binaries()
    if why is not None:
        pytest.skip(why)
    exporter = IstioExporter().start()
    prometheus = PrometheusServer(tmp_path_factory.mktemp("prometheus"), scrape_interval="1s")
    prometheus.scrape(f"127.0.0.1:{exporter.port}").start()
    yield exporter, prometheus
    prometheus.stop()
    exporter.stop()


@pytest.fixture(scope="session")
def perch(
    plane: controlplane.ControlPlane,
    api: client.ApiClient,
    kubelet: FakeKubelet | None,
    installed,  # type: ignore[no-untyped-def]
    webhook: tuple[Server, str],
    mesh: tuple[IstioExporter, PrometheusServer],
) -> Perch:
    return Perch(
        plane=plane,
        api=api,
        installed=installed,
        webhook=webhook[0],
        webhook_config=webhook[1],
        exporter=mesh[0],
        prometheus=mesh[1],
        kubelet=kubelet,
    )


def _scratch_namespace(api: client.ApiClient, prefix: str) -> Iterator[str]:
    ns = f"{prefix}-{uuid.uuid4().hex[:6]}"
    core = client.CoreV1Api(api)
    core.create_namespace({"metadata": {"name": ns}})
    yield ns
    try:
        core.delete_namespace(ns)
    except ApiException as exc:
        if exc.status != 404:
            raise


@pytest.fixture
def namespace(api: client.ApiClient, perch: Perch) -> Iterator[str]:
    yield from _scratch_namespace(api, "t")


@pytest.fixture
def other_namespace(api: client.ApiClient, perch: Perch) -> Iterator[str]:
    """A second namespace, the platform team's: it holds what apps reference by namespace
    (AlertProviders, MetricTemplates)."""
    yield from _scratch_namespace(api, "team")


@pytest.fixture
def release(perch: Perch, namespace: str, tmp_path: Path) -> Iterator[Release]:
    app = Release(perch=perch, namespace=namespace, tmp=tmp_path)
    yield app
    app.close()
