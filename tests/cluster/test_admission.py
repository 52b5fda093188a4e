"""Admission through a real API server: every row of the webhook's decision table, as users meet it.

Each test sends its requests the way users send them (kubectl apply, set image, scale, annotate,
rollout restart, --dry-run=server; the Python client for API-level things), and the real API
server calls perch-webhook, registered by URL with the chart's matchConditions. So what is shown
here is what only a real server does: defaulting before admission, matchConditions deciding what
is sent at all, strategic-merge and three-way patches, admission plugins that run after Perch
answered, reinvocation when another webhook edits the template, server-side dry-run, schema and
CEL validation of the routes, and garbage collection through ownerReferences.

No analyzer runs here: where a test needs the analyzer's state (a rollback, a promotion handoff,
traffic already shifted), it writes that state as the analyzer does, through the status
subresource. What a real server cannot be made to do (an API failure injected mid-admission) stays
in tests/integration/test_webhook_admission.py.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from subprocess import CompletedProcess
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from perch.revision import template_revision
from tests.seed import IMAGE_NEW, IMAGE_STABLE, SEED_SPEC_CURRENT, SEED_SPEC_EARLY
from tests.support.admission import (
    MutatorServer,
    ObjectLog,
    admission_counts,
    denying_policy,
    kubectl,
    registered_mutator,
    snapshot,
    start_mutator,
    total,
    wait_settled,
    warnings_of,
    with_image,
)
from tests.support.kubelet import wait_for
from tests.support.release import Release
from tests.support.template_mutator import MUTATOR_ANNOTATION, MUTATOR_VALUE
from tests.support.webhook_server import Server

pytestmark = pytest.mark.cluster

IMAGE_NEWER = "ghcr.io/stefanprodan/podinfo:6.7.2"
GROUP, VERSION = "perch.dev", "v1alpha1"
CANARY_NAME = "podinfo-canary"
MANAGED_BY = "app.kubernetes.io/managed-by"
GITOPS_PREFIXES = ("argocd.argoproj.io/", "kustomize.toolkit.fluxcd.io/")
_HPA_REF = """\
autoscalerRef:
  apiVersion: autoscaling/v2
  kind: HorizontalPodAutoscaler
  name: podinfo
"""
assert _HPA_REF in SEED_SPEC_CURRENT
# The seed's current form with its HPA, and without (for tests that want no autoscaler around).
SPEC = SEED_SPEC_CURRENT
SPEC_NO_HPA = SEED_SPEC_CURRENT.replace(_HPA_REF, "")
GATEWAY_SPEC = """\
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
DENY_LABEL = "policy.example.com/deny"
DENY_MESSAGE = "Deployments labelled policy.example.com/deny are not admitted here"
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mutator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MutatorServer]:
    server = start_mutator(tmp_path_factory.mktemp("mutator"))
    yield server
    server.server.terminate()


@pytest.fixture
def perch_server(webhook: tuple[Server, str]) -> Server:
    return webhook[0]


# --- helpers ----------------------------------------------------------------------------------


def deployment_manifest(
    release: Release,
    *,
    image: str = IMAGE_STABLE,
    spec: str | None = SPEC,
    labels: dict[str, str] | None = None,
) -> str:
    """The Deployment alone, as the user keeps it in git."""
    docs = list(yaml.safe_load_all(release.manifest(image=image, spec=spec)))
    dep = next(d for d in docs if d["kind"] == "Deployment")
    dep["metadata"]["labels"].update(labels or {})
    return yaml.safe_dump(dep, sort_keys=False)


def deploy(
    release: Release, *, spec: str = SPEC, hpa: bool = True, route: str = "virtualservices"
) -> CompletedProcess[str]:
    """The first `kubectl apply` (with the HPA the spec names, when `hpa`); returns what kubectl
    printed once the primary has rolled out and Perch's objects have their owner."""
    text = (
        release.manifest(image=IMAGE_STABLE, spec=spec)
        if hpa
        else deployment_manifest(release, spec=spec)
    )
    done = kubectl(release, "apply", "-f", "-", input=text)
    wait_settled(release)
    wait_adopted(release, route=route)
    return done


def custom_object(release: Release, plural: str, name: str) -> dict[str, Any] | None:
    group, version = {
        "canaries": (GROUP, VERSION),
        "virtualservices": ("networking.istio.io", "v1"),
        "httproutes": ("gateway.networking.k8s.io", "v1"),
    }[plural]
    try:
        return client.CustomObjectsApi(release.api).get_namespaced_custom_object(  # type: ignore[no-any-return]
            group, version, release.namespace, plural, name
        )
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def service(release: Release, name: str = CANARY_NAME) -> dict[str, Any] | None:
    return _read(release, client.CoreV1Api(release.api).read_namespaced_service, name)


def hpa(release: Release, name: str = CANARY_NAME) -> dict[str, Any] | None:
    api = client.AutoscalingV2Api(release.api)
    return _read(release, api.read_namespaced_horizontal_pod_autoscaler, name)


def _read(release: Release, read: Callable[[str, str], Any], name: str) -> dict[str, Any] | None:
    try:
        return release.api.sanitize_for_serialization(read(name, release.namespace))  # type: ignore[no-any-return]
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def perch_objects(release: Release, *, route: str = "virtualservices") -> dict[str, Any]:
    """Every object Perch makes for podinfo, None where it does not exist."""
    return {
        "Canary": custom_object(release, "canaries", release.name),
        "route": custom_object(release, route, release.name),
        "Service": service(release),
        "Deployment": release.deployment(CANARY_NAME),
        "HorizontalPodAutoscaler": hpa(release),
    }


def wait_adopted(release: Release, *, route: str = "virtualservices") -> None:
    """The adopter gives the objects made during the CREATE their owner in the background."""

    def adopted() -> bool:
        objs = perch_objects(release, route=route)
        made = [objs["Canary"], objs["route"], objs["Service"]]
        return all(o is not None and o["metadata"].get("ownerReferences") for o in made)

    wait_for(adopted, what="the objects made during the CREATE to be adopted", deadline=30)


def resource_versions(release: Release) -> dict[str, str | None]:
    return {
        kind: (obj["metadata"]["resourceVersion"] if obj else None)
        for kind, obj in perch_objects(release).items()
    }


def revision_for(release: Release, image: str) -> str:
    """The revision of the primary's template with `image`: what a release of it is called."""
    return template_revision(with_image(release.primary()["spec"]["template"], image))


def annotations_of(obj: dict[str, Any]) -> dict[str, str]:
    return obj["metadata"].get("annotations") or {}


def container_image(template: dict[str, Any]) -> str:
    return str(template["spec"]["containers"][0]["image"])


def set_image(
    release: Release, image: str, *extra: str, check: bool = True
) -> CompletedProcess[str]:
    return kubectl(
        release, "set", "image", "deployment/podinfo", f"podinfod={image}", *extra, check=check
    )


def set_canary_status(release: Release, **fields: Any) -> None:
    """What the analyzer records, written as it writes it: through the status subresource."""
    kubectl(
        release,
        "patch",
        "canary",
        release.name,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": fields}),
    )


def started_warning(release: Release, revision: str) -> str:
    return (
        f"perch: canary started for revision {revision}; "
        f"watch with kubectl get canary podinfo -n {release.namespace} -w"
    )


def perch_warnings(done: CompletedProcess[str]) -> list[str]:
    return [w for w in warnings_of(done) if w.startswith("perch:")]


def only_namespace_defaults(release: Release) -> bool:
    """The namespace holds only what the controllers make for every namespace."""
    kinds = {kind for kind, _ in snapshot(release.perch.plane, release.namespace)}
    return kinds <= {"ConfigMap", "ServiceAccount"}


# --- CREATE -----------------------------------------------------------------------------------


def test_create_refused_by_a_later_admission_plugin_leaves_nothing_behind(
    release: Release, api: client.ApiClient
) -> None:
    ns = release.namespace
    canaries = ObjectLog(api, ns, GROUP, VERSION, "canaries")
    with denying_policy(
        api, name=f"deny-{ns}", namespace=ns, label=DENY_LABEL, message=DENY_MESSAGE
    ):
        canaries.start()
        try:
            done = kubectl(
                release,
                "apply",
                "-f",
                "-",
                input=deployment_manifest(release, spec=SPEC_NO_HPA, labels={DENY_LABEL: "x"}),
                check=False,
            )
            assert done.returncode != 0
            assert "ValidatingAdmissionPolicy" in done.stderr and DENY_MESSAGE in done.stderr
            assert release.deployment() is None
            # Perch answered before the policy refused: it had set up the Canary object (and the
            # canary Service and the route) for a Deployment that never came to be.
            wait_for(
                lambda: ("ADDED", "podinfo") in canaries.seen(),
                what="the Canary object made at admission",
            )
            # Once the adopter's timeout passed without the Deployment, all of it is gone.
            wait_for(
                lambda: not any(perch_objects(release).values()),
                what="the objects made for the refused CREATE to be removed",
                deadline=60,
            )
            assert ("DELETED", "podinfo") in canaries.seen()
            assert only_namespace_defaults(release)
        finally:
            canaries.stop()


def test_update_refused_by_a_later_admission_plugin_keeps_the_primary(
    release: Release, api: client.ApiClient
) -> None:
    ns = release.namespace
    deploy(release, spec=SPEC_NO_HPA, hpa=False)
    before = release.primary()
    new_rev = revision_for(release, IMAGE_NEW)
    with denying_policy(
        api, name=f"deny-{ns}", namespace=ns, label=DENY_LABEL, message=DENY_MESSAGE
    ):
        done = kubectl(
            release,
            "apply",
            "-f",
            "-",
            input=deployment_manifest(
                release, image=IMAGE_NEW, spec=SPEC_NO_HPA, labels={DENY_LABEL: "x"}
            ),
            check=False,
        )
    # The user sees both: Perch set up a canary for the revision, and the request was refused.
    assert done.returncode != 0
    assert started_warning(release, new_rev) in warnings_of(done)
    assert "ValidatingAdmissionPolicy" in done.stderr and DENY_MESSAGE in done.stderr
    after = release.primary()
    assert after["spec"]["template"] == before["spec"]["template"]
    assert after["metadata"]["generation"] == before["metadata"]["generation"]
    assert DENY_LABEL not in after["metadata"]["labels"]
    # The primary never points at the refused revision: that is how the analyzer tells the
    # canary made for it is an orphan.
    assert "perch.dev/canary-revision" not in annotations_of(after)
    assert (
        annotations_of(after)["perch.dev/revision"] == annotations_of(before)["perch.dev/revision"]
    )


# --- what is never sent -----------------------------------------------------------------------


def test_changes_perch_does_not_care_about_are_never_sent_to_it(
    release: Release, perch_server: Server
) -> None:
    deploy(release, spec=SPEC_NO_HPA, hpa=False)
    plain = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "plain", "labels": {"app": "plain"}},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "plain"}},
            "template": {
                "metadata": {"labels": {"app": "plain"}},
                "spec": {"containers": [{"name": "web", "image": IMAGE_STABLE}]},
            },
        },
    }
    sent = admission_counts(perch_server)

    # A Deployment that is not opted in: created, released, scaled, relabelled, annotated.
    kubectl(release, "apply", "-f", "-", input=json.dumps(plain))
    kubectl(release, "set", "image", "deployment/plain", f"web={IMAGE_NEW}")
    kubectl(release, "scale", "deployment/plain", "--replicas=2")
    kubectl(release, "label", "deployment/plain", "team=payments")
    kubectl(release, "annotate", "deployment/plain", "example.com/owner=payments")
    # The opted-in podinfo: scaled (the scale subresource, and a patch of spec.replicas as a GitOps
    # tool sends it), relabelled and annotated, its template untouched.
    kubectl(release, "scale", "deployment/podinfo", "--replicas=3")
    kubectl(release, "patch", "deployment/podinfo", "-p", '{"spec": {"replicas": 4}}')
    kubectl(release, "label", "deployment/podinfo", "team=payments")
    kubectl(release, "annotate", "deployment/podinfo", "example.com/owner=payments")

    assert admission_counts(perch_server) == sent, "the API server sent Perch a request"
    # Every change went through.
    plain_now = release.deployment("plain")
    assert plain_now is not None
    assert container_image(plain_now["spec"]["template"]) == IMAGE_NEW
    assert plain_now["spec"]["replicas"] == 2
    assert plain_now["metadata"]["labels"]["team"] == "payments"
    assert annotations_of(plain_now)["example.com/owner"] == "payments"
    primary = release.primary()
    assert primary["spec"]["replicas"] == 4
    assert primary["metadata"]["labels"]["team"] == "payments"
    assert annotations_of(primary)["example.com/owner"] == "payments"
    assert release.deployment(CANARY_NAME) is None

    # The counter does count what is sent: a release of podinfo reaches Perch.
    set_image(release, IMAGE_NEW)
    now = admission_counts(perch_server)
    assert total(now) > total(sent)
    assert now.get("canary-started", 0) > sent.get("canary-started", 0)


def test_rollout_restart_passes_through_as_a_restart(
    release: Release, perch_server: Server
) -> None:
    deploy(release, spec=SPEC_NO_HPA, hpa=False)
    before = release.primary()
    sent = admission_counts(perch_server)

    done = kubectl(release, "rollout", "restart", "deployment/podinfo")

    assert perch_warnings(done) == []
    after = release.primary()
    template = after["spec"]["template"]
    assert TIMESTAMP.fullmatch(
        template["metadata"]["annotations"]["kubectl.kubernetes.io/restartedAt"]
    )
    assert container_image(template) == IMAGE_STABLE
    assert after["metadata"]["generation"] == before["metadata"]["generation"] + 1
    assert (
        annotations_of(after)["perch.dev/revision"] == annotations_of(before)["perch.dev/revision"]
    )
    assert "perch.dev/canary-revision" not in annotations_of(after)
    assert release.deployment(CANARY_NAME) is None
    assert release.phase() == "Initialized"
    # Perch was asked (the template changed) and judged it a restart, not a release.
    counts = admission_counts(perch_server)
    assert counts.get("restart", 0) > sent.get("restart", 0)
    assert {k: v for k, v in counts.items() if k != "restart"} == {
        k: v for k, v in sent.items() if k != "restart"
    }
    # The restart rolls out on the primary itself.
    wait_settled(release)


# --- releases ---------------------------------------------------------------------------------


def test_new_image_becomes_a_canary_reapplied_changes_nothing_newer_replaces_it(
    release: Release,
) -> None:
    deploy(release)
    primary = release.primary()
    stable = template_revision(primary["spec"]["template"])
    new_rev, newer_rev = revision_for(release, IMAGE_NEW), revision_for(release, IMAGE_NEWER)

    done = set_image(release, IMAGE_NEW)

    assert perch_warnings(done)[0] == started_warning(release, new_rev)
    primary = release.primary()
    assert template_revision(primary["spec"]["template"]) == stable
    assert container_image(primary["spec"]["template"]) == IMAGE_STABLE
    assert annotations_of(primary)["perch.dev/revision"] == stable
    assert annotations_of(primary)["perch.dev/canary-revision"] == new_rev
    canary_dep = release.deployment(CANARY_NAME)
    assert canary_dep is not None
    assert container_image(canary_dep["spec"]["template"]) == IMAGE_NEW
    assert canary_dep["spec"]["selector"]["matchLabels"] == {
        "app": "podinfo-canary",
        "perch.dev/track": "canary",
    }
    assert canary_dep["metadata"]["ownerReferences"][0]["uid"] == primary["metadata"]["uid"]
    assert annotations_of(canary_dep)["perch.dev/revision"] == new_rev
    assert hpa(release) is not None
    # The canary's pods run and become Ready (the kubelet stand-in plays the node).
    wait_settled(release, CANARY_NAME)
    pods = client.CoreV1Api(release.api).list_namespaced_pod(
        release.namespace, label_selector="app=podinfo-canary"
    )
    assert len(pods.items) == 2
    assert all(
        any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])
        for p in pods.items
    )
    canary = release.canary()
    assert canary is not None
    assert canary["spec"]["revision"] == new_rev
    assert (canary["status"]["phase"], canary["status"]["canaryRevision"]) == (
        "Progressing",
        new_rev,
    )

    # A GitOps re-apply of git (which holds the new image): nothing of Perch's is written.
    unchanged = resource_versions(release)
    done = kubectl(release, "apply", "-f", "-", input=release.manifest(image=IMAGE_NEW, spec=SPEC))
    warning = perch_warnings(done)[0]
    assert warning.startswith(f"perch: revision {new_rev} is already under analysis"), warning
    assert resource_versions(release) == unchanged
    assert template_revision(release.primary()["spec"]["template"]) == stable

    # A newer image during the analysis replaces the canary's template and restarts it.
    done = set_image(release, IMAGE_NEWER)
    warning = perch_warnings(done)[0]
    assert warning.startswith(f"perch: revision {newer_rev} replaces {new_rev} under analysis")
    canary_dep = release.deployment(CANARY_NAME)
    assert canary_dep is not None
    assert container_image(canary_dep["spec"]["template"]) == IMAGE_NEWER
    canary = release.canary()
    assert canary is not None
    assert canary["spec"]["revision"] == newer_rev
    status = canary["status"]
    assert (status["phase"], status["canaryRevision"], status["analysisRestarts"]) == (
        "Progressing",
        newer_rev,
        1,
    )
    primary = release.primary()
    assert template_revision(primary["spec"]["template"]) == stable
    assert annotations_of(primary)["perch.dev/canary-revision"] == newer_rev


def test_failed_revision_reapplied_is_held_back_without_a_new_canary(release: Release) -> None:
    deploy(release, spec=SPEC_NO_HPA, hpa=False)
    stable = template_revision(release.primary()["spec"]["template"])
    new_rev = revision_for(release, IMAGE_NEW)
    set_image(release, IMAGE_NEW)
    wait_settled(release, CANARY_NAME)
    # The analyzer rolled it back.
    set_canary_status(release, phase="Failed", failedRevision=new_rev, canaryWeight=0)
    unchanged = resource_versions(release)

    # git still holds the failed image; the GitOps tool applies it again.
    done = kubectl(
        release,
        "apply",
        "-f",
        "-",
        input=deployment_manifest(release, image=IMAGE_NEW, spec=SPEC_NO_HPA),
    )

    assert perch_warnings(done) == [
        f"perch: revision {new_rev} failed its canary analysis; podinfo keeps revision {stable}. "
        f"To try it again: kubectl annotate deployment podinfo -n {release.namespace} "
        "perch.dev/action=retry"
    ]
    assert template_revision(release.primary()["spec"]["template"]) == stable
    assert release.image() == IMAGE_STABLE
    assert resource_versions(release) == unchanged
    assert release.phase() == "Failed"


def test_opt_out_hands_back_and_later_updates_roll_out_plainly(release: Release) -> None:
    deploy(release)
    set_image(release, IMAGE_NEW)
    # The analyzer had shifted 30 % of the traffic to the canary.
    route = release.route()
    assert route is not None
    for destination in route["spec"]["http"][0]["route"]:
        destination["weight"] = 30 if destination["destination"]["host"] == CANARY_NAME else 70
    client.CustomObjectsApi(release.api).replace_namespaced_custom_object(
        "networking.istio.io", "v1", release.namespace, "virtualservices", release.name, route
    )
    set_canary_status(release, canaryWeight=30)
    assert release.weights() == (70, 30)

    done = kubectl(release, "annotate", "deployment/podinfo", "perch.dev/enabled-")

    assert perch_warnings(done)[0].startswith("perch: podinfo opted out")
    assert release.weights() == (100, 0)
    assert release.deployment(CANARY_NAME) is None
    assert service(release) is None
    assert hpa(release) is None
    assert release.phase() == "Terminated"
    # From now on podinfo is a plain Deployment: a new image rolls straight into it.
    done = set_image(release, IMAGE_NEWER)
    assert perch_warnings(done) == []
    assert release.image() == IMAGE_NEWER
    wait_settled(release)
    assert release.deployment(CANARY_NAME) is None


def test_skip_analysis_rolls_a_new_image_straight_into_the_primary(release: Release) -> None:
    deploy(release, spec=SPEC_NO_HPA + "skipAnalysis: true\n", hpa=False)
    new_rev = revision_for(release, IMAGE_NEW)

    done = set_image(release, IMAGE_NEW)

    assert perch_warnings(done) == [
        f"perch: skipAnalysis is set; revision {new_rev} rolls out without a canary"
    ]
    primary = release.primary()
    assert container_image(primary["spec"]["template"]) == IMAGE_NEW
    assert annotations_of(primary)["perch.dev/revision"] == new_rev
    assert "perch.dev/canary-revision" not in annotations_of(primary)
    assert release.deployment(CANARY_NAME) is None
    wait_settled(release)


def test_promotion_mark_lets_the_template_through_only_with_the_analyzers_handoff(
    release: Release,
) -> None:
    deploy(release, spec=SPEC_NO_HPA, hpa=False)
    new_rev = revision_for(release, IMAGE_NEW)
    set_image(release, IMAGE_NEW)
    canary = release.canary()
    assert canary is not None
    # The analyzer's write: the canary's template into the primary, with the promotion mark.
    promote = json.dumps(
        [
            {"op": "replace", "path": "/spec/template", "value": canary["spec"]["template"]},
            {
                "op": "add",
                "path": "/metadata/annotations/perch.dev~1promoted-revision",
                "value": new_rev,
            },
        ]
    )

    # The mark alone (anyone can copy an annotation) does not let the template through.
    done = kubectl(release, "patch", "deployment/podinfo", "--type=json", "-p", promote)
    assert "already under analysis" in perch_warnings(done)[0]
    assert release.image() == IMAGE_STABLE

    # With the handoff committed on the Canary object first, as the analyzer does, it does.
    set_canary_status(release, phase="Promoting", handoffRevision=new_rev, canaryWeight=50)
    kubectl(release, "patch", "deployment/podinfo", "--type=json", "-p", promote)
    primary = release.primary()
    assert container_image(primary["spec"]["template"]) == IMAGE_NEW
    assert template_revision(primary["spec"]["template"]) == new_rev
    assert annotations_of(primary)["perch.dev/revision"] == new_rev
    assert "perch.dev/canary-revision" not in annotations_of(primary)
    wait_settled(release)


# --- dry-run ----------------------------------------------------------------------------------


def test_dry_run_answers_like_the_real_request_and_changes_nothing(release: Release) -> None:
    plane, ns = release.perch.plane, release.namespace
    # A dry-run CREATE: Perch's mutation comes back, and no Canary object (nor anything) is made.
    done = kubectl(
        release,
        "apply",
        "--dry-run=server",
        "-o",
        "json",
        "-f",
        "-",
        input=deployment_manifest(release, spec=SPEC_NO_HPA),
    )
    made = json.loads(done.stdout)
    assert annotations_of(made)["perch.dev/revision"] == template_revision(made["spec"]["template"])
    assert custom_object(release, "canaries", "podinfo") is None
    assert only_namespace_defaults(release)

    deploy(release, spec=SPEC_NO_HPA, hpa=False)
    stable = template_revision(release.primary()["spec"]["template"])
    new_rev = revision_for(release, IMAGE_NEW)
    before = snapshot(plane, ns)

    dry_set = set_image(release, IMAGE_NEW, "--dry-run=server", "-o", "json")
    dry_apply = kubectl(
        release,
        "apply",
        "--dry-run=server",
        "-o",
        "json",
        "-f",
        "-",
        input=deployment_manifest(release, image=IMAGE_NEW, spec=SPEC_NO_HPA),
    )

    for dry in (dry_set, dry_apply):
        answer = json.loads(dry.stdout)
        # The held-back result: the stable template, the new revision recorded as the canary's.
        assert template_revision(answer["spec"]["template"]) == stable
        assert container_image(answer["spec"]["template"]) == IMAGE_STABLE
        assert annotations_of(answer)["perch.dev/canary-revision"] == new_rev
        assert perch_warnings(dry) == [started_warning(release, new_rev)]
    assert snapshot(plane, ns) == before
    assert release.deployment(CANARY_NAME) is None
    assert release.phase() == "Initialized"

    # The real request gets the very answer the dry-run showed.
    wet = set_image(release, IMAGE_NEW)
    assert perch_warnings(wet) == perch_warnings(dry_set)
    stored = release.primary()
    dry_answer = json.loads(dry_set.stdout)
    assert stored["spec"]["template"] == dry_answer["spec"]["template"]
    assert annotations_of(stored)["perch.dev/canary-revision"] == new_rev
    assert release.deployment(CANARY_NAME) is not None


# --- refusals ---------------------------------------------------------------------------------


def test_invalid_spec_is_denied_naming_the_annotation_and_the_field(release: Release) -> None:
    bad = SPEC_NO_HPA.replace("stepWeight: 5", "stepWeight: 80")
    done = kubectl(
        release,
        "apply",
        "-f",
        "-",
        input=deployment_manifest(release, spec=bad),
        check=False,
    )
    assert done.returncode != 0
    assert done.stderr.startswith("Error from server"), done.stderr
    assert (
        'admission webhook "deployments.perch.dev" denied the request: perch: invalid '
        "perch.dev/spec: analysis.stepWeight: stepWeight 80 is more than maxWeight 50"
    ) in done.stderr
    assert release.deployment() is None
    assert only_namespace_defaults(release)

    # An UPDATE that changes only the spec is refused too, and nothing changes.
    deploy(release, spec=SPEC_NO_HPA, hpa=False)
    before = snapshot(release.perch.plane, release.namespace)
    bad_url = SPEC_NO_HPA.replace("url: http://flagger-loadtester.test/", "url: flagger-loadtester")
    done = kubectl(
        release,
        "annotate",
        "--overwrite",
        "deployment/podinfo",
        f"perch.dev/spec={bad_url}",
        check=False,
    )
    assert done.returncode != 0
    assert "denied the request: perch: invalid perch.dev/spec: analysis.webhooks[0].url" in (
        done.stderr
    ), done.stderr
    assert annotations_of(release.primary())["perch.dev/spec"] == SPEC_NO_HPA
    assert snapshot(release.perch.plane, release.namespace) == before


def test_route_the_user_made_is_not_overwritten(release: Release) -> None:
    theirs = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "podinfo"},
        "spec": {
            "hosts": ["podinfo"],
            "http": [{"route": [{"destination": {"host": "podinfo"}}]}],
        },
    }
    kubectl(release, "apply", "-f", "-", input=json.dumps(theirs))
    before = release.route()
    assert before is not None

    done = kubectl(
        release,
        "apply",
        "-f",
        "-",
        input=deployment_manifest(release, spec=SPEC_NO_HPA),
        check=False,
    )

    assert done.returncode != 0
    assert (
        f"denied the request: perch: VirtualService {release.namespace}/podinfo already exists "
        "and is not managed by Perch"
    ) in done.stderr, done.stderr
    after = release.route()
    assert after is not None
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    assert release.deployment() is None
    assert release.canary() is None
    assert service(release) is None


# --- providers and forms of the spec ----------------------------------------------------------


def test_gatewayapi_provider_makes_an_httproute_the_api_server_accepts(release: Release) -> None:
    deploy(release, spec=GATEWAY_SPEC, hpa=False, route="httproutes")
    route = custom_object(release, "httproutes", "podinfo")
    assert route is not None
    refs = route["spec"]["rules"][0]["backendRefs"]
    assert [(r["name"], r["weight"]) for r in refs] == [("podinfo", 100), ("podinfo-canary", 0)]
    # The API server filled in the defaults of the Gateway API schema.
    assert route["spec"]["parentRefs"] == [
        {
            "group": "gateway.networking.k8s.io",
            "kind": "Gateway",
            "name": "public",
            "namespace": "istio-system",
        }
    ]
    assert route["metadata"]["labels"][MANAGED_BY] == "perch"
    assert route["metadata"]["ownerReferences"][0]["uid"] == release.primary()["metadata"]["uid"]
    with pytest.raises(client.exceptions.ApiException) as no_vs:  # no VirtualService
        client.CustomObjectsApi(release.api).get_namespaced_custom_object(
            "networking.istio.io", "v1", release.namespace, "virtualservices", "podinfo"
        )
    assert no_vs.value.status == 404

    # A release rewrites the route (reset to 100 % primary); the CRD's CEL rules accept it too.
    done = set_image(release, IMAGE_NEW)
    assert perch_warnings(done)[0].startswith("perch: canary started")
    route = custom_object(release, "httproutes", "podinfo")
    assert route is not None
    refs = route["spec"]["rules"][0]["backendRefs"]
    assert [(r["name"], r["weight"]) for r in refs] == [("podinfo", 100), ("podinfo-canary", 0)]


def test_early_and_current_seed_forms_build_the_same_route(
    release: Release, api: client.ApiClient, tmp_path: Path
) -> None:
    deploy(release, spec=SEED_SPEC_EARLY)
    early = release.route()
    assert early is not None
    core = client.CoreV1Api(api)
    other_ns = f"{release.namespace}-cur"
    core.create_namespace({"metadata": {"name": other_ns}})
    other = Release(perch=release.perch, namespace=other_ns, tmp=tmp_path)
    try:
        deploy(other, spec=SEED_SPEC_CURRENT)
        current = other.route()
        assert current is not None
        assert current["spec"] == early["spec"]
    finally:
        other.close()
        core.delete_namespace(other_ns)


# --- other mutating webhooks ------------------------------------------------------------------


def _assert_one_consistent_canary(
    release: Release, done: CompletedProcess[str], *, image: str
) -> dict[str, Any]:
    """Exactly one canary was started, it runs `image`, and the Canary object, the canary
    Deployment and the primary all name the revision of the template the canary runs."""
    started = [w for w in perch_warnings(done) if "canary started" in w or "replaces" in w]
    assert len(started) == 1 and "canary started" in started[0], perch_warnings(done)
    canary = release.canary()
    assert canary is not None
    revision = canary["spec"]["revision"]
    assert canary["status"]["canaryRevision"] == revision
    assert canary["status"]["analysisRestarts"] == 0
    assert template_revision(canary["spec"]["template"]) == revision
    assert container_image(canary["spec"]["template"]) == image
    canary_dep = release.deployment(CANARY_NAME)
    assert canary_dep is not None
    assert container_image(canary_dep["spec"]["template"]) == image
    assert annotations_of(canary_dep)["perch.dev/revision"] == revision
    assert annotations_of(release.primary())["perch.dev/canary-revision"] == revision
    return canary


def test_a_mutator_after_perch_reinvokes_it_and_one_canary_starts(
    release: Release,
    api: client.ApiClient,
    mutator: MutatorServer,
    webhook: tuple[Server, str],
) -> None:
    name = f"zzz-mutator-{uuid.uuid4().hex[:6]}.test"
    assert name > webhook[1]  # the API server calls configurations in name order
    with registered_mutator(api, mutator, name=name, namespace=release.namespace):
        # CREATE: Perch answers first, the mutator stamps the template, and Perch, reinvoked,
        # records the revision of the template as it is stored.
        deploy(release, spec=SPEC_NO_HPA, hpa=False)
        primary = release.primary()
        stamped = primary["spec"]["template"]
        assert stamped["metadata"]["annotations"][MUTATOR_ANNOTATION] == MUTATOR_VALUE
        assert annotations_of(primary)["perch.dev/revision"] == template_revision(stamped)
        assert release.status()["lastAppliedRevision"] == template_revision(stamped)

        done = set_image(release, IMAGE_NEW)

        assert release.primary()["spec"]["template"] == stamped
        _assert_one_consistent_canary(release, done, image=IMAGE_NEW)


@pytest.mark.parametrize("order", ["before", "after"])
def test_a_mutator_first_stamping_the_template_during_a_release_starts_one_canary(
    release: Release,
    api: client.ApiClient,
    mutator: MutatorServer,
    webhook: tuple[Server, str],
    order: str,
) -> None:
    # The Deployment predates the policy engine: its stored template is not stamped yet.
    deploy(release, spec=SPEC_NO_HPA, hpa=False)
    old = release.primary()["spec"]["template"]
    name = f"{'aa' if order == 'before' else 'zzz'}-mutator-{uuid.uuid4().hex[:6]}.test"
    assert (name < webhook[1]) == (order == "before")
    with registered_mutator(api, mutator, name=name, namespace=release.namespace):
        done = set_image(release, IMAGE_NEW)

        _assert_one_consistent_canary(release, done, image=IMAGE_NEW)
        # The primary keeps the old template, plus what the policy engine adds to every template.
        expected = json.loads(json.dumps(old))
        expected["metadata"].setdefault("annotations", {})[MUTATOR_ANNOTATION] = MUTATOR_VALUE
        assert release.primary()["spec"]["template"] == expected


def test_a_mutator_before_perch_is_part_of_the_revision_perch_hashes(
    release: Release,
    api: client.ApiClient,
    mutator: MutatorServer,
    webhook: tuple[Server, str],
) -> None:
    name = f"aa-mutator-{uuid.uuid4().hex[:6]}.test"
    assert name < webhook[1]
    with registered_mutator(api, mutator, name=name, namespace=release.namespace):
        deploy(release, spec=SPEC_NO_HPA, hpa=False)
        primary = release.primary()
        assert annotations_of(primary)["perch.dev/revision"] == template_revision(
            primary["spec"]["template"]
        )
        # kubectl replace of the manifest in git, which has never carried the stamp: the mutator
        # stamps the new template before Perch sees it, so Perch analyses what would run.
        manifest = deployment_manifest(release, image=IMAGE_NEW, spec=SPEC_NO_HPA)
        git_template = yaml.safe_load(manifest)["spec"]["template"]
        done = kubectl(release, "replace", "-f", "-", input=manifest)

        canary = _assert_one_consistent_canary(release, done, image=IMAGE_NEW)
        stamped = canary["spec"]["template"]
        assert stamped["metadata"]["annotations"][MUTATOR_ANNOTATION] == MUTATOR_VALUE
        assert canary["spec"]["revision"] != template_revision(git_template)
        canary_dep = release.deployment(CANARY_NAME)
        assert canary_dep is not None
        template = canary_dep["spec"]["template"]
        assert template["metadata"]["annotations"][MUTATOR_ANNOTATION] == MUTATOR_VALUE
        assert release.primary()["spec"]["template"] == primary["spec"]["template"]


# --- races ------------------------------------------------------------------------------------


def test_two_racing_releases_end_consistent(release: Release) -> None:
    deploy(release, spec=SPEC_NO_HPA, hpa=False)
    before = release.primary()
    revisions = {revision_for(release, IMAGE_NEW), revision_for(release, IMAGE_NEWER)}
    barrier = threading.Barrier(2)
    outcomes: dict[str, list[CompletedProcess[str]]] = {}

    def send(image: str) -> None:
        barrier.wait()
        tries = outcomes.setdefault(image, [])
        for _ in range(3):
            done = set_image(release, image, check=False)
            tries.append(done)
            if done.returncode == 0:
                return
            # A conflict or Perch's "retry it" denial: the user (or the tool) tries again.
            assert "retry" in done.stderr or "conflict" in done.stderr.lower(), done.stderr

    threads = [threading.Thread(target=send, args=(img,)) for img in (IMAGE_NEW, IMAGE_NEWER)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    for image, tries in outcomes.items():
        assert tries and tries[-1].returncode == 0, (image, [t.stderr for t in tries])

    primary = release.primary()
    assert primary["spec"]["template"] == before["spec"]["template"]
    canary = release.canary()
    assert canary is not None
    revision = canary["spec"]["revision"]
    assert revision in revisions
    assert canary["status"]["canaryRevision"] == revision
    assert template_revision(canary["spec"]["template"]) == revision
    assert annotations_of(primary)["perch.dev/canary-revision"] == revision
    canaries = client.AppsV1Api(release.api).list_namespaced_deployment(
        release.namespace, label_selector="perch.dev/track=canary"
    )
    assert [d.metadata.name for d in canaries.items if d.metadata] == [CANARY_NAME]
    canary_dep = release.deployment(CANARY_NAME)
    assert canary_dep is not None
    assert annotations_of(canary_dep)["perch.dev/revision"] == revision
    assert container_image(canary_dep["spec"]["template"]) == container_image(
        canary["spec"]["template"]
    )


# --- deleting ---------------------------------------------------------------------------------


def test_create_sets_up_owned_objects_and_deleting_the_deployment_removes_them(
    release: Release,
) -> None:
    done = deploy(release, spec=SEED_SPEC_EARLY)
    # The seed is written in Flagger's early form; kubectl shows how Perch reads it.
    assert perch_warnings(done) == [
        "perch: perch.dev/spec: canaryAnalysis is Flagger's early name for analysis and is "
        "read as analysis"
    ]
    primary = release.primary()
    stable = template_revision(primary["spec"]["template"])
    assert annotations_of(primary)["perch.dev/revision"] == stable

    canary = release.canary()
    assert canary is not None
    assert canary["status"]["phase"] == "Initialized"
    assert canary["status"]["lastAppliedRevision"] == stable
    route = release.route()
    assert route is not None
    assert release.weights() == (100, 0)
    assert route["spec"]["hosts"] == ["podinfo", "app.example.com"]
    assert route["spec"]["gateways"] == ["public-gateway.istio-system.svc.cluster.local", "mesh"]
    owner = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "podinfo",
        "uid": primary["metadata"]["uid"],
        "controller": True,
    }
    for obj in (canary, route, service(release)):
        assert obj is not None
        assert obj["metadata"]["ownerReferences"] == [owner], obj["metadata"]
        labels = obj["metadata"]["labels"]
        assert labels[MANAGED_BY] == "perch"
        assert not [k for k in labels if k.startswith(GITOPS_PREFIXES)], labels
    assert release.deployment(CANARY_NAME) is None

    # kubectl get canaries prints the CRD's columns.
    header, row = kubectl(release, "get", "canaries").stdout.splitlines()
    assert header.split() == ["NAME", "STATUS", "WEIGHT", "FAILEDCHECKS", "LASTTRANSITIONTIME"]
    name, status, weight, failed, when = row.split()
    assert (name, status, weight, failed) == ("podinfo", "Initialized", "0", "0")
    assert TIMESTAMP.fullmatch(when) and when == canary["status"]["lastTransitionTime"]

    # A release, so that a canary Deployment and its HPA exist too; then the primary is deleted.
    set_image(release, IMAGE_NEW)
    made = perch_objects(release)
    assert all(made.values()), made
    for obj in (made["Deployment"], made["HorizontalPodAutoscaler"]):
        assert obj["metadata"]["ownerReferences"] == [owner]
    kubectl(release, "delete", "deployment", "podinfo")
    # The garbage collector starts following a new kind (these CRDs came with the session) at its
    # next discovery sync, every 30 s: this test comes last so that is usually long past.
    wait_for(
        lambda: not any(perch_objects(release).values()),
        what="the garbage collector to delete what Perch made for podinfo",
        deadline=90,
    )
    # The user's own HPA was never Perch's: it stays.
    assert hpa(release, "podinfo") is not None
