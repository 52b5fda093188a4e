"""Every row of the webhook's decision table, through the real server and the API stand-in.

perch-webhook runs as a real gunicorn process over TLS with certificates from perch-certs; it talks
to the stateful Kubernetes API stand-in over HTTP with the real `kubernetes` client. The test plays
the API server: it posts the AdmissionReview, applies the returned JSONPatch with `jsonpatch`, and
stores the result. Every object that ends up in the stand-in is validated against its schema.
"""

from __future__ import annotations

import base64
import copy
import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import jsonpatch
import pytest
from kubernetes import client

from perch.revision import template_revision
from tests.seed import IMAGE_NEW, SEED_SPEC_CURRENT, SEED_SPEC_EARLY, admission_review, podinfo
from tests.standin import StandIn
from tests.support.webhook_server import PERCH_APP, Server, start_server
from tests.validation import validate

IMAGE_NEWER = "ghcr.io/stefanprodan/podinfo:6.7.2"
STABLE_REV = template_revision(podinfo()["spec"]["template"])
NEW_REV = template_revision(podinfo(image=IMAGE_NEW)["spec"]["template"])
NEWER_REV = template_revision(podinfo(image=IMAGE_NEWER)["spec"]["template"])
GITOPS_PREFIXES = ("argocd.argoproj.io/", "kustomize.toolkit.fluxcd.io/")
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
        self.core = client.CoreV1Api(self.api)
        self.apps = client.AppsV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)

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

    def create(self, dep: dict[str, Any], *, dry_run: bool = False) -> dict[str, Any]:
        dep = copy.deepcopy(dep)
        for key in ("uid", "resourceVersion", "generation"):
            dep["metadata"].pop(key, None)
        review = admission_review(
            operation="CREATE", obj=dep, dry_run=dry_run, uid=str(uuid.uuid4())
        )
        response = self.admit(review)
        if response["allowed"] and not dry_run:
            stored = self.apps.api_client.sanitize_for_serialization(self.patched(dep, response))
            self.apps.create_namespaced_deployment(self.ns, stored)
        return response

    def get(self, name: str = "podinfo") -> dict[str, Any] | None:
        key = ("deployments", self.ns, name)
        return self.standin.objects("deployments").get(key)

    def update(
        self, change, *, dry_run: bool = False, name: str = "podinfo"
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Apply `change` to the stored Deployment through admission; returns (response, stored)."""
        old = self.get(name)
        assert old is not None
        new = copy.deepcopy(old)
        change(new)
        review = admission_review(
            operation="UPDATE", obj=new, old=old, dry_run=dry_run, uid=str(uuid.uuid4())
        )
        response = self.admit(review)
        stored = old
        if response["allowed"] and not dry_run:
            result = self.patched(new, response)
            stored = self.apps.api_client.sanitize_for_serialization(
                self.apps.replace_namespaced_deployment(name, self.ns, result)
            )
            stored = self.get(name)
        return response, stored  # type: ignore[return-value]

    def obj(self, plural: str, name: str) -> dict[str, Any] | None:
        return self.standin.objects(plural).get((plural, self.ns, name))

    def canary(self) -> dict[str, Any]:
        found = self.obj("canaries", "podinfo")
        assert found is not None
        return found

    def set_canary_status(self, **fields: Any) -> None:
        current = self.canary()
        status = {**(current.get("status") or {}), **fields}
        self.custom.patch_namespaced_custom_object_status(
            "perch.dev", "v1alpha1", self.ns, "canaries", "podinfo", {"status": status}
        )

    def objects(self) -> dict[tuple[str, str | None, str], dict[str, Any]]:
        """Every object in this test's namespace (other tests' background work stays out)."""
        return {k: v for k, v in self.standin.objects().items() if k[1] == self.ns}

    def writes(self) -> list[Any]:
        return [c for c in self.standin.writes() if c.namespace == self.ns]


_counter = iter(range(10_000))


@pytest.fixture
def cluster(standin_module: StandIn, webhook: Server) -> Cluster:
    ns = f"t{next(_counter)}-{uuid.uuid4().hex[:6]}"
    client.CoreV1Api(standin_module.api_client()).create_namespace({"metadata": {"name": ns}})
    return Cluster(standin_module, webhook, ns)


def seed(cluster: Cluster, *, spec: str = SEED_SPEC_EARLY, hpa: bool = True) -> dict[str, Any]:
    """podinfo created opted in (with its HPA), as `kubectl apply` of the seed would."""
    if hpa:
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
                    "metrics": [
                        {
                            "type": "Resource",
                            "resource": {
                                "name": "cpu",
                                "target": {"type": "Utilization", "averageUtilization": 99},
                            },
                        }
                    ],
                },
            },
        )
    response = cluster.create(podinfo(namespace=cluster.ns, spec=spec, uid=None))
    assert response["allowed"], response
    # The adopter gives the objects made during the CREATE their owner in the background; wait
    # for it, so that what a test counts afterwards is its own doing.
    wait_for(
        lambda: all(
            obj.get("metadata", {}).get("ownerReferences")
            for (plural, _, _), obj in cluster.objects().items()
            if plural in ("canaries", "services", "virtualservices", "httproutes")
        ),
        "the objects made during the CREATE to be adopted",
    )
    return response


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


def validate_all(cluster: Cluster) -> None:
    for (_plural, ns, _), obj in cluster.objects().items():
        if ns == cluster.ns:
            validate(obj)


# --- CREATE --------------------------------------------------------------------------------


def test_create_sets_up_canary_object_and_routes_then_adopts_them(cluster: Cluster):
    response = seed(cluster)
    # The seed is written in Flagger's early form; kubectl shows how Perch reads it.
    assert response["warnings"] == [
        "perch: perch.dev/spec: canaryAnalysis is Flagger's early name for analysis and is read as analysis"
    ]
    stored = cluster.get()
    assert stored["metadata"]["annotations"]["perch.dev/revision"] == STABLE_REV

    canary = cluster.canary()
    assert canary["status"]["phase"] == "Initialized"
    assert canary["status"]["canaryWeight"] == 0
    assert canary["status"]["lastAppliedRevision"] == STABLE_REV
    vs = cluster.obj("virtualservices", "podinfo")
    assert vs is not None
    route = vs["spec"]["http"][0]["route"]
    assert [(r["destination"]["host"], r["weight"]) for r in route] == [
        ("podinfo", 100),
        ("podinfo-canary", 0),
    ]
    assert vs["spec"]["hosts"] == ["podinfo", "app.example.com"]
    assert vs["spec"]["gateways"] == ["public-gateway.istio-system.svc.cluster.local", "mesh"]
    assert cluster.obj("services", "podinfo-canary") is not None
    assert cluster.obj("deployments", "podinfo-canary") is None

    uid = stored["metadata"]["uid"]
    for plural, name in (
        ("canaries", "podinfo"),
        ("virtualservices", "podinfo"),
        ("services", "podinfo-canary"),
    ):
        wait_for(
            lambda p=plural, n=name: (
                (cluster.obj(p, n) or {}).get("metadata", {}).get("ownerReferences")
            ),
            f"{plural}/{name} to be adopted",
        )
        owners = cluster.obj(plural, name)["metadata"]["ownerReferences"]
        assert owners == [
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "name": "podinfo",
                "uid": uid,
                "controller": True,
            }
        ]
        assert (
            cluster.obj(plural, name)["metadata"]["labels"]["app.kubernetes.io/managed-by"]
            == "perch"
        )
    validate_all(cluster)


def test_create_rejected_later_leaves_nothing_behind(cluster: Cluster):
    # Admission answered, but a later admission plugin refused: the Deployment never appears.
    dep = podinfo(namespace=cluster.ns, uid=None)
    review = admission_review(operation="CREATE", obj=dep, uid=str(uuid.uuid4()))
    assert cluster.admit(review)["allowed"]
    assert cluster.obj("canaries", "podinfo") is not None
    wait_for(lambda: cluster.objects() == {}, "the objects made for it to be removed")


# --- new revision --------------------------------------------------------------------------


def test_new_revision_is_held_back_and_becomes_a_canary(cluster: Cluster):
    seed(cluster)
    primary_uid = cluster.get()["metadata"]["uid"]
    response, stored = cluster.update(set_image(IMAGE_NEW))

    assert response["allowed"]
    assert response["warnings"][0] == (
        f"perch: canary started for revision {NEW_REV}; watch with kubectl get canary podinfo -n {cluster.ns} -w"
    )
    # The primary keeps serving the stable template.
    assert stored["spec"]["template"]["spec"]["containers"][0]["image"] != IMAGE_NEW
    assert template_revision(stored["spec"]["template"]) == STABLE_REV
    assert stored["metadata"]["annotations"]["perch.dev/canary-revision"] == NEW_REV

    canary_dep = cluster.obj("deployments", "podinfo-canary")
    assert canary_dep is not None
    assert canary_dep["spec"]["template"]["spec"]["containers"][0]["image"] == IMAGE_NEW
    assert canary_dep["spec"]["selector"]["matchLabels"] == {
        "app": "podinfo-canary",
        "perch.dev/track": "canary",
    }
    tpl_labels = canary_dep["spec"]["template"]["metadata"]["labels"]
    assert tpl_labels == {"app": "podinfo-canary", "perch.dev/track": "canary"}
    assert canary_dep["metadata"]["labels"]["perch.dev/track"] == "canary"
    assert canary_dep["metadata"]["annotations"]["perch.dev/revision"] == NEW_REV

    svc = cluster.obj("services", "podinfo-canary")
    assert svc["spec"]["selector"] == {"app": "podinfo-canary", "perch.dev/track": "canary"}
    assert svc["spec"]["ports"][0]["port"] == 9898
    hpa = cluster.obj("horizontalpodautoscalers", "podinfo-canary")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "podinfo-canary"
    assert hpa["spec"]["minReplicas"] == 2

    status = cluster.canary()["status"]
    assert (status["phase"], status["canaryRevision"], status["canaryWeight"]) == (
        "Progressing",
        NEW_REV,
        0,
    )
    assert cluster.canary()["spec"]["revision"] == NEW_REV

    for obj in (canary_dep, svc, hpa):
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/managed-by"] == "perch"
        assert not [k for k in labels if k.startswith(GITOPS_PREFIXES)], labels
        assert obj["metadata"]["ownerReferences"][0]["uid"] == primary_uid
    validate_all(cluster)


def test_same_revision_again_changes_nothing(cluster: Cluster):
    seed(cluster)
    cluster.update(set_image(IMAGE_NEW))
    before = cluster.objects()
    writes = len(cluster.writes())

    # A GitOps re-apply: git holds the new image, the live primary the old one.
    response, _ = cluster.update(set_image(IMAGE_NEW))
    assert response["allowed"]
    assert "already under analysis" in response["warnings"][0]
    # Only the test's own write of the (unchanged) primary happened.
    new_writes = [
        c for c in cluster.writes()[writes:] if c.resource != "deployments" or c.name != "podinfo"
    ]
    assert new_writes == []
    after = cluster.objects()
    for key in before:
        if key[0] != "deployments" or key[2] != "podinfo":
            assert after[key] == before[key], key


def test_newer_revision_during_analysis_replaces_the_canary(cluster: Cluster):
    seed(cluster)
    cluster.update(set_image(IMAGE_NEW))
    cluster.set_canary_status(canaryWeight=20, failedChecks=2)
    response, stored = cluster.update(set_image(IMAGE_NEWER))

    assert f"replaces {NEW_REV}" in response["warnings"][0]
    canary_dep = cluster.obj("deployments", "podinfo-canary")
    assert canary_dep["spec"]["template"]["spec"]["containers"][0]["image"] == IMAGE_NEWER
    status = cluster.canary()["status"]
    assert status["canaryRevision"] == NEWER_REV
    assert (status["canaryWeight"], status["failedChecks"], status["analysisRestarts"]) == (0, 0, 1)
    assert stored["metadata"]["annotations"]["perch.dev/canary-revision"] == NEWER_REV
    assert template_revision(stored["spec"]["template"]) == STABLE_REV
    validate_all(cluster)


def test_failed_revision_reapplied_keeps_primary_and_makes_no_canary(cluster: Cluster):
    seed(cluster)
    cluster.update(set_image(IMAGE_NEW))
    cluster.set_canary_status(phase="Failed", failedRevision=NEW_REV, canaryWeight=0)
    writes = len(cluster.writes())
    response, stored = cluster.update(set_image(IMAGE_NEW))
    assert response["allowed"]
    assert "failed its canary analysis" in response["warnings"][0]
    assert "perch.dev/action=retry" in response["warnings"][0]
    assert template_revision(stored["spec"]["template"]) == STABLE_REV
    assert [
        c for c in cluster.writes()[writes:] if c.name != "podinfo" or c.resource != "deployments"
    ] == []


def test_restart_and_scale_pass_through_untouched(cluster: Cluster):
    seed(cluster)
    writes = len(cluster.writes())

    def restart(dep):
        dep["spec"]["template"]["metadata"]["annotations"]["kubectl.kubernetes.io/restartedAt"] = (
            "2026-11-26T12:00:00Z"
        )

    def scale(dep):
        dep["spec"]["replicas"] = 7

    for change in (restart, scale):
        response, stored = cluster.update(change)
        assert response["allowed"] and "patch" not in response and "warnings" not in response, (
            response
        )
    assert stored["spec"]["replicas"] == 7
    assert stored["spec"]["template"]["metadata"]["annotations"][
        "kubectl.kubernetes.io/restartedAt"
    ]
    assert cluster.obj("deployments", "podinfo-canary") is None
    assert len([c for c in cluster.writes()[writes:] if c.resource != "deployments"]) == 0


def test_opt_out_hands_back(cluster: Cluster):
    seed(cluster)
    cluster.update(set_image(IMAGE_NEW))
    cluster.set_canary_status(canaryWeight=30)
    vs = cluster.obj("virtualservices", "podinfo")
    vs["spec"]["http"][0]["route"][0]["weight"] = 70
    vs["spec"]["http"][0]["route"][1]["weight"] = 30
    cluster.custom.replace_namespaced_custom_object(
        "networking.istio.io", "v1", cluster.ns, "virtualservices", "podinfo", vs
    )

    def opt_out(dep):
        del dep["metadata"]["annotations"]["perch.dev/enabled"]
        dep["spec"]["template"]["spec"]["containers"][0]["image"] = IMAGE_NEWER

    response, stored = cluster.update(opt_out)
    assert response["allowed"] and "opted out" in response["warnings"][0]
    assert stored["spec"]["template"]["spec"]["containers"][0]["image"] == IMAGE_NEWER
    route = cluster.obj("virtualservices", "podinfo")["spec"]["http"][0]["route"]
    assert [r["weight"] for r in route] == [100, 0]
    for plural in ("deployments", "services", "horizontalpodautoscalers"):
        assert cluster.obj(plural, "podinfo-canary") is None, plural
    assert cluster.canary()["status"]["phase"] == "Terminated"


def test_skip_analysis_rolls_out_directly(cluster: Cluster):
    seed(cluster, spec=SEED_SPEC_CURRENT + "skipAnalysis: true\n")
    response, stored = cluster.update(set_image(IMAGE_NEW))
    assert response["allowed"] and "skipAnalysis" in response["warnings"][0]
    assert stored["spec"]["template"]["spec"]["containers"][0]["image"] == IMAGE_NEW
    assert stored["metadata"]["annotations"]["perch.dev/revision"] == NEW_REV
    assert cluster.obj("deployments", "podinfo-canary") is None


def test_promotion_mark_lets_the_template_through(cluster: Cluster):
    seed(cluster)
    cluster.update(set_image(IMAGE_NEW))
    cluster.set_canary_status(phase="Promoting", canaryWeight=50)

    def promote(dep):
        dep["spec"]["template"]["spec"]["containers"][0]["image"] = IMAGE_NEW
        dep["metadata"]["annotations"]["perch.dev/promoted-revision"] = NEW_REV

    response, stored = cluster.update(promote)
    assert response["allowed"]
    assert stored["spec"]["template"]["spec"]["containers"][0]["image"] == IMAGE_NEW
    assert stored["metadata"]["annotations"]["perch.dev/revision"] == NEW_REV
    assert "perch.dev/canary-revision" not in stored["metadata"]["annotations"]


def test_dry_run_answers_the_same_and_changes_nothing(cluster: Cluster):
    seed(cluster)
    before = cluster.objects()
    writes = len(cluster.writes())
    dry, _ = cluster.update(set_image(IMAGE_NEW), dry_run=True)
    assert cluster.objects() == before
    assert cluster.writes()[writes:] == []
    wet, _ = cluster.update(set_image(IMAGE_NEW))
    assert (dry["allowed"], dry["patch"], dry["warnings"]) == (
        wet["allowed"],
        wet["patch"],
        wet["warnings"],
    )
    assert cluster.obj("deployments", "podinfo-canary") is not None


def test_dry_run_create_creates_nothing(cluster: Cluster):
    before = cluster.objects()
    response = cluster.create(podinfo(namespace=cluster.ns, uid=None), dry_run=True)
    assert response["allowed"] and "patch" in response
    time.sleep(0.2)
    assert cluster.objects() == before


def test_invalid_spec_is_denied_naming_the_field_and_nothing_is_created(cluster: Cluster):
    before = cluster.objects()
    bad = SEED_SPEC_CURRENT.replace("stepWeight: 5", "stepWeight: 80")
    response = cluster.create(podinfo(namespace=cluster.ns, uid=None, spec=bad))
    assert not response["allowed"]
    message = response["status"]["message"]
    assert "perch.dev/spec" in message and "analysis.stepWeight" in message
    assert cluster.objects() == before


def test_invalid_spec_on_update_is_denied(cluster: Cluster):
    seed(cluster)

    def bad(dep):
        dep["metadata"]["annotations"]["perch.dev/spec"] = SEED_SPEC_CURRENT.replace(
            "url: http://flagger-loadtester.test/", "url: flagger-loadtester"
        )
        dep["spec"]["template"]["spec"]["containers"][0]["image"] = IMAGE_NEW

    response, _ = cluster.update(bad)
    assert not response["allowed"]
    assert "analysis.webhooks[0].url" in response["status"]["message"]
    assert cluster.obj("deployments", "podinfo-canary") is None


def test_route_owned_by_someone_else_is_not_overwritten(cluster: Cluster):
    theirs = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "podinfo", "namespace": cluster.ns},
        "spec": {"hosts": ["podinfo"], "http": [{"route": [{"destination": {"host": "podinfo"}}]}]},
    }
    cluster.custom.create_namespaced_custom_object(
        "networking.istio.io", "v1", cluster.ns, "virtualservices", theirs
    )
    before = cluster.obj("virtualservices", "podinfo")
    response = cluster.create(podinfo(namespace=cluster.ns, uid=None))
    assert not response["allowed"]
    assert f"VirtualService {cluster.ns}/podinfo" in response["status"]["message"]
    assert "not managed by Perch" in response["status"]["message"]
    assert cluster.obj("virtualservices", "podinfo") == before
    assert cluster.obj("canaries", "podinfo") is None


def test_gatewayapi_provider_creates_an_httproute(cluster: Cluster):
    spec = """\
provider: gatewayapi
service:
  port: 9898
  hosts: [app.example.com]
  gatewayRefs:
  - name: public
    namespace: istio-system
analysis:
  interval: 30s
  metrics:
  - name: request-success-rate
    thresholdRange: {min: 99}
"""
    seed(cluster, spec=spec, hpa=False)
    route = cluster.obj("httproutes", "podinfo")
    assert route is not None
    refs = route["spec"]["rules"][0]["backendRefs"]
    assert [(r["name"], r["weight"]) for r in refs] == [("podinfo", 100), ("podinfo-canary", 0)]
    assert route["spec"]["parentRefs"] == [{"name": "public", "namespace": "istio-system"}]
    assert cluster.obj("virtualservices", "podinfo") is None
    validate_all(cluster)


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


def test_racing_updates_end_consistent(cluster: Cluster):
    seed(cluster)
    old = cluster.get()
    answers: list[dict[str, Any]] = []

    def send(image: str) -> None:
        new = copy.deepcopy(old)
        set_image(image)(new)
        review = admission_review(operation="UPDATE", obj=new, old=old, uid=str(uuid.uuid4()))
        answers.append(cluster.admit(review))

    threads = [threading.Thread(target=send, args=(img,)) for img in (IMAGE_NEW, IMAGE_NEWER)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(a["allowed"] for a in answers), answers
    canary = cluster.canary()
    revision = canary["status"]["canaryRevision"]
    assert revision in (NEW_REV, NEWER_REV)
    assert canary["spec"]["revision"] == revision
    # The canary Deployment runs the revision the Canary object records: no mixed state.
    canary_dep = cluster.obj("deployments", "podinfo-canary")
    assert canary_dep["metadata"]["annotations"]["perch.dev/revision"] == revision
    assert template_revision(canary["spec"]["template"]) == revision


def test_malformed_review_is_400(cluster: Cluster):
    response = cluster.webhook.post(
        b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"uid": "x"}}'
    )
    assert response.status_code == 400
    assert "request.kind is missing" in response.json()["error"]


def test_early_and_current_seed_forms_build_the_same_routes(
    cluster: Cluster, standin_module: StandIn, webhook: Server
):
    seed(cluster, spec=SEED_SPEC_EARLY)
    early = cluster.obj("virtualservices", "podinfo")["spec"]
    other = Cluster(standin_module, webhook, f"cur-{uuid.uuid4().hex[:6]}")
    other.core.create_namespace({"metadata": {"name": other.ns}})
    seed(other, spec=SEED_SPEC_CURRENT)
    assert other.obj("virtualservices", "podinfo")["spec"] == early
