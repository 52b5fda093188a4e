"""The admission decision table, row by row, as a pure function."""

from __future__ import annotations

import copy
from datetime import UTC, datetime

import jsonpatch
import pytest

from perch.revision import template_revision
from perch.status import CanaryStatus, analysis_started, initialized
from tests.seed import IMAGE_NEW, SEED_SPEC_CURRENT, admission_review, podinfo
from webhook.admission import parse_review
from webhook.review import (
    AdoptWhenCreated,
    CanaryRecord,
    Decision,
    EnsureCanaryService,
    EnsureCanaryWorkload,
    EnsureRoutes,
    HandBack,
    Observed,
    WriteCanaryObject,
    review,
)

NOW = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)
IMAGE_NEWER = "ghcr.io/stefanprodan/podinfo:6.7.2"
STABLE_REV = template_revision(podinfo()["spec"]["template"])
NEW_REV = template_revision(podinfo(image=IMAGE_NEW)["spec"]["template"])
NEWER_REV = template_revision(podinfo(image=IMAGE_NEWER)["spec"]["template"])


def decide(body: dict, observed: Observed | None = None) -> Decision:
    req = parse_review(body)
    first = review(req, None, now=NOW)
    if first.reason != "observe":
        return first
    return review(req, observed if observed is not None else Observed(), now=NOW)


def update(new: dict, old: dict | None = None, **kw) -> dict:
    return admission_review(operation="UPDATE", obj=new, old=old or podinfo(), **kw)


def record(status: CanaryStatus, revision: str = "") -> Observed:
    return Observed(canary=CanaryRecord(revision=revision, status=status, resource_version="7"))


def patched(body: dict, decision: Decision) -> dict:
    return jsonpatch.apply_patch(body["request"]["object"], list(decision.patch))


def under_analysis(revision: str) -> Observed:
    started = analysis_started(initialized(revision=STABLE_REV, at=NOW), revision=revision, at=NOW)
    return record(started, revision)


def test_not_opted_in_is_allowed_untouched():
    body = update(podinfo(enabled=False, image=IMAGE_NEW), podinfo(enabled=False))
    d = decide(body)
    assert (d.allowed, d.reason, d.patch, d.actions) == (True, "not-opted-in", (), ())


def test_only_true_opts_in():
    dep = podinfo(image=IMAGE_NEW)
    dep["metadata"]["annotations"]["perch.dev/enabled"] = "yes"
    old = podinfo()
    old["metadata"]["annotations"]["perch.dev/enabled"] = "false"
    assert decide(update(dep, old)).reason == "not-opted-in"


def test_create_sets_up_canary_object_and_routes():
    body = admission_review(operation="CREATE", obj=podinfo(uid=None))
    first = review(parse_review(body), None, now=NOW)
    assert first.reason == "observe"
    d = decide(body)
    assert d.allowed and d.reason == "initialized"
    kinds = [type(a) for a in d.actions]
    assert kinds == [WriteCanaryObject, EnsureCanaryService, EnsureRoutes, AdoptWhenCreated]
    write = d.actions[0]
    assert isinstance(write, WriteCanaryObject)
    assert write.status.phase == "Initialized" and write.status.canary_weight == 0
    assert write.status.last_applied_revision == STABLE_REV
    assert patched(body, d)["metadata"]["annotations"]["perch.dev/revision"] == STABLE_REV


def test_scale_only_update_is_allowed_as_is():
    new = podinfo()
    new["spec"]["replicas"] = 5
    new["metadata"]["labels"]["team"] = "a"
    d = decide(update(new))
    assert (d.allowed, d.reason, d.patch, d.actions) == (True, "unchanged", (), ())


def test_rollout_restart_is_allowed_as_is():
    new = podinfo()
    new["spec"]["template"]["metadata"]["annotations"]["kubectl.kubernetes.io/restartedAt"] = "now"
    d = decide(update(new))
    assert (d.allowed, d.reason, d.patch) == (True, "restart", ())


def test_new_revision_holds_back_and_starts_canary():
    body = update(podinfo(image=IMAGE_NEW))
    d = decide(body, Observed(canary=record(initialized(revision=STABLE_REV, at=NOW)).canary))
    assert d.allowed and d.reason == "canary-started"
    result = patched(body, d)
    assert result["spec"]["template"] == podinfo()["spec"]["template"]
    assert result["metadata"]["annotations"]["perch.dev/revision"] == STABLE_REV
    assert result["metadata"]["annotations"]["perch.dev/canary-revision"] == NEW_REV
    assert d.warnings[0] == (
        f"perch: canary started for revision {NEW_REV}; watch with kubectl get canary podinfo -n test -w"
    )
    # Routes back to 100 % primary before the canary's template changes.
    write, routes, service, workload = d.actions
    assert isinstance(write, WriteCanaryObject) and write.revision == NEW_REV
    assert write.status.phase == "Progressing" and write.status.canary_revision == NEW_REV
    assert write.status.analysis_restarts == 0 and write.expected_resource_version == "7"
    assert write.status.last_applied_revision == STABLE_REV
    assert isinstance(service, EnsureCanaryService)
    assert isinstance(workload, EnsureCanaryWorkload) and workload.revision == NEW_REV
    assert workload.template["spec"]["containers"][0]["image"] == IMAGE_NEW
    assert routes == EnsureRoutes(reset=True)


def test_new_revision_keeps_other_changes_of_the_update():
    new = podinfo(image=IMAGE_NEW)
    new["spec"]["replicas"] = 4
    body = update(new)
    result = patched(body, decide(body))
    assert result["spec"]["replicas"] == 4
    assert result["spec"]["template"]["spec"]["containers"][0]["image"] != IMAGE_NEW


def test_same_revision_under_analysis_is_idempotent():
    body = update(podinfo(image=IMAGE_NEW))
    d = decide(body, under_analysis(NEW_REV))
    assert d.allowed and d.reason == "canary-kept"
    assert not any(isinstance(a, WriteCanaryObject | EnsureRoutes) for a in d.actions)
    assert patched(body, d)["spec"]["template"] == podinfo()["spec"]["template"]
    assert "already under analysis" in d.warnings[0]


def test_reinvocation_after_own_patch_is_a_no_op():
    body = update(podinfo(image=IMAGE_NEW))
    d = decide(body)
    again = update(patched(body, d), podinfo())
    assert decide(again).reason == "unchanged"


def test_newer_revision_replaces_canary_and_restarts_analysis():
    old = podinfo()
    old["metadata"]["annotations"]["perch.dev/canary-revision"] = NEW_REV
    body = update(podinfo(image=IMAGE_NEWER), old)
    d = decide(body, under_analysis(NEW_REV))
    assert d.reason == "canary-replaced"
    write = d.actions[0]
    assert isinstance(write, WriteCanaryObject)
    assert write.status.canary_revision == NEWER_REV and write.status.analysis_restarts == 1
    assert write.status.canary_weight == 0 and write.status.failed_checks == 0
    assert "analysis restarted" in write.status.conditions[0]["message"]
    workload = next(a for a in d.actions if isinstance(a, EnsureCanaryWorkload))
    assert workload.revision == NEWER_REV
    assert f"replaces {NEW_REV}" in d.warnings[0]
    kinds = [type(a) for a in d.actions]
    assert kinds.index(EnsureRoutes) < kinds.index(EnsureCanaryWorkload)


def test_newer_revision_during_a_promotion_calls_the_handoff_off():
    # The copy of NEW already reached the primary; NEWER arrives before the promotion finished.
    old = podinfo(image=IMAGE_NEW)
    old["metadata"]["annotations"]["perch.dev/promoted-revision"] = NEW_REV
    new = podinfo(image=IMAGE_NEWER)
    new["metadata"]["annotations"]["perch.dev/promoted-revision"] = NEW_REV
    promoting = CanaryStatus(
        phase="Promoting",
        canary_revision=NEW_REV,
        analysed_revision=NEW_REV,
        canary_weight=50,
        last_applied_revision=STABLE_REV,
        handoff_revision=NEW_REV,
    )
    d = decide(update(new, old), record(promoting, NEW_REV))
    assert d.reason == "canary-replaced"
    write = d.actions[0]
    assert isinstance(write, WriteCanaryObject)
    # NEW, which passed its analysis, is what the primary runs: the last good revision now.
    assert write.status.last_applied_revision == NEW_REV
    assert write.status.handoff_revision == ""
    assert write.status.canary_revision == NEWER_REV and write.status.canary_weight == 0


def test_failed_revision_is_held_back_without_new_canary():
    failed = CanaryStatus(phase="Failed", canary_revision=NEW_REV, failed_revision=NEW_REV)
    body = update(podinfo(image=IMAGE_NEW))
    d = decide(body, record(failed, NEW_REV))
    assert d.allowed and d.reason == "failed-revision" and d.actions == ()
    assert patched(body, d)["spec"]["template"] == podinfo()["spec"]["template"]
    assert "failed its canary analysis" in d.warnings[0]
    assert "perch.dev/action=retry" in d.warnings[0]


def test_promotion_mark_lets_template_through():
    new = podinfo(image=IMAGE_NEW)
    new["metadata"]["annotations"]["perch.dev/promoted-revision"] = NEW_REV
    promoting = CanaryStatus(
        phase="Promoting", canary_revision=NEW_REV, canary_weight=50, handoff_revision=NEW_REV
    )
    body = update(new)
    d = decide(body, record(promoting, NEW_REV))
    assert d.allowed and d.reason == "promotion" and d.actions == ()
    result = patched(body, d)
    assert result["spec"]["template"]["spec"]["containers"][0]["image"] == IMAGE_NEW
    assert result["metadata"]["annotations"]["perch.dev/revision"] == NEW_REV
    assert "perch.dev/canary-revision" not in result["metadata"]["annotations"]


def test_promotion_mark_before_the_handoff_is_committed_is_held_back():
    # The analyzer's copy racing ahead of its own status write would be a release like any other:
    # the handoff in the committed status is what lets a template through, not the mark.
    new = podinfo(image=IMAGE_NEW)
    new["metadata"]["annotations"]["perch.dev/promoted-revision"] = NEW_REV
    progressing = CanaryStatus(
        phase="Progressing", canary_revision=NEW_REV, analysed_revision=NEW_REV, canary_weight=50
    )
    body = update(new)
    d = decide(body, record(progressing, NEW_REV))
    assert d.reason == "canary-kept"
    assert patched(body, d)["spec"]["template"] == podinfo()["spec"]["template"]


def test_the_handoff_without_the_mark_is_a_release():
    # A user applying the very revision being promoted is held back like any re-apply; the
    # analyzer's copy lands either way.
    promoting = CanaryStatus(phase="Promoting", canary_revision=NEW_REV, handoff_revision=NEW_REV)
    body = update(podinfo(image=IMAGE_NEW))
    d = decide(body, record(promoting, NEW_REV))
    assert d.reason == "canary-kept"


def test_restore_mark_puts_the_last_good_template_back():
    # Promotion copied NEW into the primary and it never became ready: the analyzer restores.
    old = podinfo(image=IMAGE_NEW)
    new = podinfo()
    new["metadata"]["annotations"]["perch.dev/promoted-revision"] = STABLE_REV
    restoring = CanaryStatus(
        phase="Failed",
        canary_revision=NEW_REV,
        last_applied_revision=STABLE_REV,
        failed_revision=NEW_REV,
        handoff_revision=STABLE_REV,
    )
    body = update(new, old)
    d = decide(body, record(restoring, NEW_REV))
    assert d.reason == "promotion"
    result = patched(body, d)
    assert result["spec"]["template"] == podinfo()["spec"]["template"]
    annotations = result["metadata"]["annotations"]
    assert annotations["perch.dev/revision"] == STABLE_REV
    # The failed revision stays recorded as the one held back, as after a rollback.
    assert annotations["perch.dev/canary-revision"] == NEW_REV


@pytest.mark.parametrize("phase", ["Progressing", "Failed", "Succeeded", "Promoting"])
def test_promotion_mark_outside_a_handoff_is_not_a_bypass(phase):
    new = podinfo(image=IMAGE_NEW)
    new["metadata"]["annotations"]["perch.dev/promoted-revision"] = NEW_REV
    status = CanaryStatus(phase=phase, canary_revision=NEWER_REV)  # type: ignore[arg-type]
    d = decide(update(new), record(status, NEWER_REV))
    assert d.reason != "promotion"
    assert d.patch[0]["path"] == "/spec/template"


def test_opt_out_hands_back():
    new = podinfo(image=IMAGE_NEW, enabled=False)
    d = decide(update(new))
    assert d.allowed and d.reason == "opt-out" and d.patch == ()
    assert d.actions == (HandBack(),)
    assert "opted out" in d.warnings[0]


def test_skip_analysis_rolls_out_directly():
    spec = SEED_SPEC_CURRENT + "skipAnalysis: true\n"
    body = update(podinfo(image=IMAGE_NEW, spec=spec), podinfo(spec=spec))
    d = decide(body)
    assert d.allowed and d.reason == "skip-analysis" and d.actions == ()
    result = patched(body, d)
    assert result["spec"]["template"]["spec"]["containers"][0]["image"] == IMAGE_NEW
    assert result["metadata"]["annotations"]["perch.dev/revision"] == NEW_REV


def test_invalid_spec_on_create_is_denied_naming_the_field():
    bad = SEED_SPEC_CURRENT.replace("stepWeight: 5", "stepWeight: 60")
    d = decide(admission_review(operation="CREATE", obj=podinfo(spec=bad, uid=None)))
    assert not d.allowed and d.reason == "denied-spec" and d.actions == ()
    assert "perch.dev/spec" in d.message and "analysis.stepWeight" in d.message


def test_invalid_spec_change_without_template_change_is_denied():
    bad = SEED_SPEC_CURRENT.replace("threshold: 10", "treshold: 10")
    d = decide(update(podinfo(spec=bad)))
    assert not d.allowed and "treshold" in d.message


def test_foreign_route_is_not_overwritten():
    observed = Observed(foreign_objects=("VirtualService test/podinfo",))
    d = decide(update(podinfo(image=IMAGE_NEW)), observed)
    assert not d.allowed and d.reason == "denied-foreign" and d.actions == ()
    assert "VirtualService test/podinfo" in d.message and "not managed by Perch" in d.message


def test_opting_in_by_update_initializes_and_lets_template_through():
    old = podinfo(enabled=False)
    body = update(podinfo(image=IMAGE_NEW), old)
    d = decide(body)
    assert d.reason == "initialized"
    result = patched(body, d)
    assert result["spec"]["template"]["spec"]["containers"][0]["image"] == IMAGE_NEW
    assert AdoptWhenCreated() not in d.actions


def test_deleting_deployment_is_left_alone():
    new = podinfo(image=IMAGE_NEW)
    new["metadata"]["deletionTimestamp"] = "2026-11-26T12:00:00Z"
    assert decide(update(new)).reason == "deleting"


def test_dry_run_gets_the_same_decision():
    wet = decide(update(podinfo(image=IMAGE_NEW)))
    dry = decide(update(podinfo(image=IMAGE_NEW), dry_run=True))
    assert (wet.allowed, wet.patch, wet.warnings) == (dry.allowed, dry.patch, dry.warnings)


def test_request_is_not_mutated():
    body = update(podinfo(image=IMAGE_NEW))
    before = copy.deepcopy(body)
    decide(body)
    assert body == before


def test_a_reinvocation_of_the_request_that_started_the_canary_keeps_it():
    # Perch held NEW back; a policy webhook after it then stamped the held-back template, and the
    # API server calls Perch again for the same request (with another uid) with that template.
    body = update(podinfo(image=IMAGE_NEW))
    first = decide(body, Observed(canary=record(initialized(revision=STABLE_REV, at=NOW)).canary))
    write = first.actions[0]
    assert isinstance(write, WriteCanaryObject)
    stamped = patched(body, first)
    stamped["spec"]["template"]["metadata"]["annotations"]["policy.example.com/checked"] = "true"
    observed = Observed(
        canary=CanaryRecord(revision=NEW_REV, status=write.status, resource_version="8")
    )
    d = decide(update(stamped, podinfo(), uid="second-call"), observed)
    assert d.allowed and d.reason == "reinvoked" and d.patch == () and d.actions == ()
    # A user's request for that template carries the stored annotations: a release like any other.
    stored = podinfo()
    stored["metadata"]["annotations"]["perch.dev/canary-revision"] = NEW_REV
    user = copy.deepcopy(stamped)
    assert decide(update(user, stored), observed).reason == "canary-replaced"


def test_a_reinvocation_of_the_promotion_lets_the_edited_template_through():
    promoting = CanaryStatus(
        phase="Promoting", canary_revision=NEW_REV, canary_weight=50, handoff_revision=NEW_REV
    )
    new = podinfo(image=IMAGE_NEW)
    new["metadata"]["annotations"]["perch.dev/promoted-revision"] = NEW_REV
    body = update(new)
    first = decide(body, record(promoting, NEW_REV))
    assert first.reason == "promotion"
    stamped = patched(body, first)
    stamped["spec"]["template"]["metadata"]["annotations"]["policy.example.com/checked"] = "true"
    d = decide(update(stamped, podinfo(), uid="second-call"), record(promoting, NEW_REV))
    assert d.reason == "reinvoked" and d.patch == ()
