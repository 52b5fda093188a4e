"""The cluster tier: a real API server named by PERCH_TEST_KUBECONFIG (kind, or any cluster).

Without it every test here is skipped, and pytest's summary says why.
"""

from __future__ import annotations

import base64
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from perch.kube import load_api_client
from tests.support.webhook_server import PERCH_APP, REPO, Server, start_server
from tests.validation import SHARED_SCHEMAS
from webhook.registration import registration

KUBECONFIG_ENV = "PERCH_TEST_KUBECONFIG"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get(KUBECONFIG_ENV):
        return
    skip = pytest.mark.skip(
        reason=f"cluster tier: set {KUBECONFIG_ENV} to the kubeconfig of a real API server (kind)"
    )
    for item in items:
        if "tests/cluster/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(skip)


HOST = os.environ.get("PERCH_TEST_WEBHOOK_HOST", "127.0.0.1")
CRD_FILES = [
    REPO / "charts" / "perch" / "crds" / "canaries.perch.dev.yaml",
    SHARED_SCHEMAS / "istio-1.30.3-virtualservices.networking.istio.io.yaml",
    SHARED_SCHEMAS / "istio-1.30.3-destinationrules.networking.istio.io.yaml",
]
DEADLINE = 60.0


@pytest.fixture(scope="module")
def api() -> client.ApiClient:
    return load_api_client(os.environ["PERCH_TEST_KUBECONFIG"])


@pytest.fixture(scope="module")
def crds(api: client.ApiClient) -> None:
    ext = client.ApiextensionsV1Api(api)
    for path in CRD_FILES:
        crd = yaml.safe_load(Path(path).read_text())
        try:
            ext.create_custom_resource_definition(crd)
        except ApiException as exc:
            if exc.status != 409:
                raise
    for path in CRD_FILES:
        name = yaml.safe_load(Path(path).read_text())["metadata"]["name"]
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            conditions = ext.read_custom_resource_definition(name).status.conditions or []
            if any(c.type == "Established" and c.status == "True" for c in conditions):
                break
            time.sleep(0.2)


@pytest.fixture(scope="module")
def webhook(
    api: client.ApiClient, crds: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("cluster-webhook")
    server = start_server(
        tmp, app=PERCH_APP, env={"KUBECONFIG": os.environ["PERCH_TEST_KUBECONFIG"]}, bind_host=HOST
    )
    name = f"zz-perch-test-{uuid.uuid4().hex[:6]}.perch.dev"
    config = registration(
        namespace="perch",
        url=f"https://{HOST}:{server.port}/mutate",
        ca_bundle=base64.b64encode(server.certs.ca.read_bytes()).decode(),
        name=name,
        timeout_seconds=10,
    )
    adm = client.AdmissionregistrationV1Api(api)
    adm.create_mutating_webhook_configuration(config)
    time.sleep(2)  # the API server picks up new webhook configurations asynchronously
    yield server
    adm.delete_mutating_webhook_configuration(name)
    server.terminate()


@pytest.fixture
def namespace(api: client.ApiClient, webhook: Server) -> Iterator[str]:
    ns = f"perch-test-{uuid.uuid4().hex[:6]}"
    core = client.CoreV1Api(api)
    core.create_namespace({"metadata": {"name": ns}})
    yield ns
    core.delete_namespace(ns)
