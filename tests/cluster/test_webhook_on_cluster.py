"""perch-webhook registered for real with an API server: kubectl-style updates become canaries.

The webhook runs here as a process; the MutatingWebhookConfiguration points at it by URL, so the
API server must be able to reach PERCH_TEST_WEBHOOK_HOST (default 127.0.0.1, right for an API
server on this host; for kind use the address of the Docker bridge, e.g. 172.18.0.1).
"""

from __future__ import annotations

import base64
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from perch.kube import load_api_client
from perch.revision import template_revision
from tests.seed import IMAGE_NEW, podinfo
from tests.support.webhook_server import PERCH_APP, REPO, Server, start_server
from tests.validation import SHARED_SCHEMAS
from webhook.registration import registration

pytestmark = pytest.mark.cluster

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


def _raw(api: client.ApiClient, obj: Any) -> dict[str, Any]:
    return api.sanitize_for_serialization(obj)  # type: ignore[no-any-return]


def test_set_image_becomes_a_canary_and_dry_run_creates_nothing(
    api: client.ApiClient, namespace: str
) -> None:
    apps = client.AppsV1Api(api)
    custom = client.CustomObjectsApi(api)
    dep = podinfo(namespace=namespace, uid=None, defaulted=False)
    dep["metadata"]["labels"] = {"app": "podinfo"}
    apps.create_namespaced_deployment(namespace, dep)
    canary = custom.get_namespaced_custom_object(
        "perch.dev", "v1alpha1", namespace, "canaries", "podinfo"
    )
    assert canary["status"]["phase"] == "Initialized"

    # kubectl apply --dry-run=server of a new image: the same answer, nothing created.
    live = _raw(api, apps.read_namespaced_deployment("podinfo", namespace))
    live["spec"]["template"]["spec"]["containers"][0]["image"] = IMAGE_NEW
    dry = _raw(api, apps.replace_namespaced_deployment("podinfo", namespace, live, dry_run="All"))
    assert dry["spec"]["template"]["spec"]["containers"][0]["image"] != IMAGE_NEW
    with pytest.raises(ApiException) as missing:
        apps.read_namespaced_deployment("podinfo-canary", namespace)
    assert missing.value.status == 404

    # kubectl set image: the primary keeps the stable template, the canary gets the new one.
    live = _raw(api, apps.read_namespaced_deployment("podinfo", namespace))
    stable = template_revision(live["spec"]["template"])
    live["spec"]["template"]["spec"]["containers"][0]["image"] = IMAGE_NEW
    stored = _raw(api, apps.replace_namespaced_deployment("podinfo", namespace, live))
    assert template_revision(stored["spec"]["template"]) == stable
    assert stored["spec"]["template"]["spec"]["containers"][0]["image"] != IMAGE_NEW
    canary_dep = _raw(api, apps.read_namespaced_deployment("podinfo-canary", namespace))
    assert canary_dep["spec"]["template"]["spec"]["containers"][0]["image"] == IMAGE_NEW
    assert canary_dep["metadata"]["ownerReferences"][0]["uid"] == stored["metadata"]["uid"]
    status = custom.get_namespaced_custom_object(
        "perch.dev", "v1alpha1", namespace, "canaries", "podinfo"
    )["status"]
    assert status["phase"] == "Progressing"
    assert (
        status["canaryRevision"] == stored["metadata"]["annotations"]["perch.dev/canary-revision"]
    )
