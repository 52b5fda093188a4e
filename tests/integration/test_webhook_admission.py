"""What a real API server cannot be made to do, against perch-webhook and the API stand-in.

Admission as users meet it (kubectl through a real API server, matchConditions, admission plugins
after Perch, reinvocation, dry-run, garbage collection, racing updates) is shown on the real
control plane in tests/cluster/test_admission.py. What stays here needs a server that misbehaves on
purpose: the API failing in the middle of setting up a canary (the stand-in injects a 500), and
an AdmissionReview no API server would send.

perch-webhook runs as a real gunicorn process over TLS with certificates from perch-certs; it talks
to the stateful Kubernetes API stand-in over HTTP with the real `kubernetes` client. The test plays
the API server: it posts the AdmissionReview, applies the returned JSONPatch with `jsonpatch`, and
stores the result.
"""

from __future__ import annotations

import base64
import copy
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import jsonpatch
import pytest
from kubernetes import client

from perch.revision import template_revision
from tests.seed import IMAGE_NEW, admission_review, podinfo
from tests.standin import StandIn
from tests.support.webhook_server import PERCH_APP, Server, start_server

STABLE_REV = template_revision(podinfo()["spec"]["template"])
NEW_REV = template_revision(podinfo(image=IMAGE_NEW)["spec"]["template"])
DEADLINE = 30.0


@pytest.fixture(scope="module")
def standin_module() -> Iterator[StandIn]:
    with StandIn() as server:
        yield server
    assert not server.crashes()


@pytest.fixture(scope="module")
def webhook(standin_module: StandIn, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("perch-webhook")
    kubeconfig = standin_module.kubeconfig(tmp / "kubeconfig")
    server = start_server(
        tmp,
        app=PERCH_APP,
        env={"KUBECONFIG": str(kubeconfig), "PERCH_ADOPT_TIMEOUT_SECONDS": "3"},
    )
    yield server
    server.terminate()


class Cluster:
    """Plays the API server for one namespace: admission through Perch, then storage."""

    def __init__(self, standin: StandIn, webhook: Server, namespace: str):
        self.standin = standin
        self.webhook = webhook
        self.ns = namespace
        self.api = standin.api_client()
        self.apps = client.AppsV1Api(self.api)

    def admit(self, review: dict[str, Any]) -> dict[str, Any]:
        response = self.webhook.post(json.dumps(review).encode())
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["response"]["uid"] == review["request"]["uid"]
        return body["response"]

    @staticmethod
    def patched(obj: dict[str, Any], response: dict[str, Any]) -> dict[str, Any]:
        if "patch" not in response:
            return copy.deepcopy(obj)
        assert response["patchType"] == "JSONPatch"
        ops = json.loads(base64.b64decode(response["patch"]))
        return jsonpatch.apply_patch(obj, ops)

    def create(self, dep: dict[str, Any]) -> dict[str, Any]:
        dep = copy.deepcopy(dep)
        for key in ("uid", "resourceVersion", "generation"):
            dep["metadata"].pop(key, None)
        response = self.admit(admission_review(operation="CREATE", obj=dep, uid=str(uuid.uuid4())))
        if response["allowed"]:
            stored = self.apps.api_client.sanitize_for_serialization(self.patched(dep, response))
            self.apps.create_namespaced_deployment(self.ns, stored)
        return response

    def get(self, name: str = "podinfo") -> dict[str, Any] | None:
        return self.standin.objects("deployments").get(("deployments", self.ns, name))

    def update(self, change, *, name: str = "podinfo") -> tuple[dict[str, Any], dict[str, Any]]:
        """Apply `change` to the stored Deployment through admission; returns (response, stored)."""
        old = self.get(name)
        assert old is not None
        new = copy.deepcopy(old)
        change(new)
        review = admission_review(operation="UPDATE", obj=new, old=old, uid=str(uuid.uuid4()))
        response = self.admit(review)
        stored = old
        if response["allowed"]:
            self.apps.replace_namespaced_deployment(name, self.ns, self.patched(new, response))
            stored = self.get(name)
        return response, stored  # type: ignore[return-value]

    def obj(self, plural: str, name: str) -> dict[str, Any] | None:
        return self.standin.objects(plural).get((plural, self.ns, name))

    def canary(self) -> dict[str, Any]:
        found = self.obj("canaries", "podinfo")
        assert found is not None
        return found

    def objects(self) -> dict[tuple[str, str | None, str], dict[str, Any]]:
        """Every object in this test's namespace (other tests' background work stays out)."""
        return {k: v for k, v in self.standin.objects().items() if k[1] == self.ns}


_counter = iter(range(10_000))


@pytest.fixture
def cluster(standin_module: StandIn, webhook: Server) -> Cluster:
    ns = f"t{next(_counter)}-{uuid.uuid4().hex[:6]}"
    client.CoreV1Api(standin_module.api_client()).create_namespace({"metadata": {"name": ns}})
    return Cluster(standin_module, webhook, ns)


def seed(cluster: Cluster) -> None:
    """podinfo created opted in (with its HPA), as `kubectl apply` of the seed would."""
    client.AutoscalingV2Api(cluster.api).create_namespaced_horizontal_pod_autoscaler(
        cluster.ns,
        {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": "podinfo", "namespace": cluster.ns},
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
    response = cluster.create(podinfo(namespace=cluster.ns, uid=None))
    assert response["allowed"], response
    # The adopter gives the objects made during the CREATE their owner in the background; wait
    # for it, so that what a test counts afterwards is its own doing.
    wait_for(
        lambda: all(
            obj.get("metadata", {}).get("ownerReferences")
            for (plural, _, _), obj in cluster.objects().items()
            if plural in ("canaries", "services", "virtualservices")
        ),
        "the objects made during the CREATE to be adopted",
    )


def set_image(image: str):
    def change(dep: dict[str, Any]) -> None:
        dep["spec"]["template"]["spec"]["containers"][0]["image"] = image

    return change


def wait_for(predicate, what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def test_api_failure_denies_with_a_clear_message_and_the_retry_works(cluster: Cluster):
    seed(cluster)
    cluster.standin.fail("create", "deployments", status=500, times=1)
    response, stored = cluster.update(set_image(IMAGE_NEW))
    assert not response["allowed"]
    assert "could not set up the canary" in response["status"]["message"]
    assert "retry" in response["status"]["message"]
    assert template_revision(stored["spec"]["template"]) == STABLE_REV
    # The retry (kubectl apply again) completes the canary.
    response, _ = cluster.update(set_image(IMAGE_NEW))
    assert response["allowed"]
    assert cluster.obj("deployments", "podinfo-canary") is not None
    assert cluster.canary()["status"]["canaryRevision"] == NEW_REV


def test_malformed_review_is_400(cluster: Cluster):
    response = cluster.webhook.post(
        b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"uid": "x"}}'
    )
    assert response.status_code == 400
    assert "request.kind is missing" in response.json()["error"]


def test_a_spawn_reads_in_one_round_trip_and_writes_after_its_commit_in_one_more(
    cluster: Cluster,
):
    """Through a slow API server a spawn costs three round trips, not ten: the objects it reads
    (Canary object, routes, canary Deployment, Service and HPA, the primary's HPA) side by side;
    then the Canary object's spec, the decision's compare-and-swap, alone; then, once that held,
    the Canary's status, the canary Deployment and its HPA side by side."""
    seed(cluster)
    for verb in ("get", "create", "update", "patch"):
        cluster.standin.slow(verb, 0.3)
    try:
        first = len(cluster.standin.calls())
        response, _ = cluster.update(set_image(IMAGE_NEW))
        calls = [c for c in cluster.standin.calls()[first:] if c.namespace == cluster.ns]
    finally:
        for verb in ("get", "create", "update", "patch"):
            cluster.standin.slow(verb, 0.0)
    assert response["allowed"], response
    assert cluster.obj("deployments", "podinfo-canary") is not None
    assert cluster.obj("horizontalpodautoscalers", "podinfo-canary") is not None
    assert cluster.canary()["status"]["canaryRevision"] == NEW_REV

    def overlapping(group: list[Any]) -> bool:
        return max(c.arrived for c in group) < min(c.answered for c in group)

    shown = [(c.verb, c.resource, c.name, round(c.arrived, 2), round(c.answered, 2)) for c in calls]
    reads = [c for c in calls if c.verb == "get"]
    assert len(reads) >= 6 and overlapping(reads), shown
    (commit,) = [c for c in calls if (c.verb, c.resource) == ("update", "canaries")]
    after = [
        c
        for c in calls
        if (c.verb, c.resource) in {("patch", "canaries/status"), ("create", "deployments")}
        or (c.verb, c.resource) == ("create", "horizontalpodautoscalers")
    ]
    assert len(after) == 3, shown
    assert commit.arrived >= max(c.answered for c in reads), shown
    assert min(c.arrived for c in after) >= commit.answered, shown
    assert overlapping(after), shown
