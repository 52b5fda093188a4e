"""perch-webhook registered for real with an API server: kubectl-style updates become canaries.

The webhook runs here as a process; the MutatingWebhookConfiguration points at it by URL, so the
API server must be able to reach PERCH_TEST_WEBHOOK_HOST (default 127.0.0.1, right for an API
server on this host; for kind use the address of the Docker bridge, e.g. 172.18.0.1).
"""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from perch.revision import template_revision
from tests.seed import IMAGE_NEW, podinfo

pytestmark = pytest.mark.cluster


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
