"""The admission decision, as a pure function of the request and what the API showed beforehand.

`review(request, observed, now=...)` returns a Decision: allow or deny, the JSONPatch for the
Deployment, the warnings kubectl prints, and the actions the shell performs afterwards (skipped on
dry-run). The table it implements is in docs/webhook.md.

The shell first calls `review(request, None)`. Most requests (not opted in, scale, labels, restart)
are decided from the request alone; the others come back with reason "observe" (and the parsed
spec) and are decided again once the shell has read the Canary object and the objects Perch names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Literal

from perch.names import (
    ANNOTATION_CANARY_REVISION,
    ANNOTATION_PROMOTED_REVISION,
    ANNOTATION_REVISION,
    ANNOTATION_SPEC,
    is_opted_in,
)
from perch.revision import is_restart_only, template_revision
from perch.spec import CanarySpec, SpecError
from perch.speccache import cached_parse_spec as parse_spec
from perch.speccheck import check_spec, denial_message, spec_warnings
from perch.status import CanaryStatus, analysis_started, initialized
from webhook.admission import AdmissionRequest, PatchOp, pointer

Reason = Literal[
    "observe",
    "ignored",
    "not-opted-in",
    "deleting",
    "initialized",
    "unchanged",
    "restart",
    "canary-started",
    "canary-kept",
    "canary-replaced",
    "failed-revision",
    "promotion",
    "reinvoked",
    "skip-analysis",
    "opt-out",
    "denied-spec",
    "denied-foreign",
    "error",
]


@dataclass(frozen=True, slots=True)
class CanaryRecord:
    """The Canary object as read before deciding."""

    revision: str
    status: CanaryStatus
    resource_version: str


@dataclass(frozen=True, slots=True)
class Observed:
    canary: CanaryRecord | None = None
    # Objects under the names Perch uses (routes, canary Deployment and Service) that Perch did not
    # make, e.g.
    # "VirtualService test/podinfo".
    foreign_objects: tuple[str, ...] = ()


# Actions, performed in order by webhook.effects.


@dataclass(frozen=True, slots=True)
class WriteCanaryObject:
    """Create or update the Canary object: spec (revision, template) and status."""

    status: CanaryStatus
    revision: str
    template: Mapping[str, Any] | None
    # The resourceVersion read before deciding; a write against a newer one is a conflict.
    expected_resource_version: str | None


@dataclass(frozen=True, slots=True)
class EnsureRoutes:
    """Create missing route objects; with reset, also put existing ones back to 100 % primary."""

    reset: bool


@dataclass(frozen=True, slots=True)
class EnsureCanaryService:
    pass


@dataclass(frozen=True, slots=True)
class EnsureCanaryWorkload:
    """The canary Deployment (and HPA) with this template; an existing one of another revision is
    given the new template, one of the same revision is left alone."""

    template: Mapping[str, Any]
    revision: str


@dataclass(frozen=True, slots=True)
class HandBack:
    """Opt-out: traffic to the primary, canary objects deleted, the Canary marked Terminated."""


@dataclass(frozen=True, slots=True)
class AdoptWhenCreated:
    """After a CREATE: give objects made before the Deployment had a uid their ownerReference."""


Action = (
    WriteCanaryObject
    | EnsureRoutes
    | EnsureCanaryService
    | EnsureCanaryWorkload
    | HandBack
    | AdoptWhenCreated
)


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: Reason
    patch: tuple[PatchOp, ...] = ()
    warnings: tuple[str, ...] = ()
    message: str = ""
    actions: tuple[Action, ...] = ()
    spec: CanarySpec | None = field(default=None, compare=False)


def _annotations(obj: Mapping[str, Any] | None) -> dict[str, str]:
    return dict(((obj or {}).get("metadata") or {}).get("annotations") or {})


def _template(obj: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return ((obj or {}).get("spec") or {}).get("template") or {}


def _set_annotations(values: Mapping[str, str | None], current: Mapping[str, str]) -> list[PatchOp]:
    """JSONPatch ops that set (or, for None, remove) annotations; the map exists when opted in."""
    ops: list[PatchOp] = []
    for key, value in values.items():
        path = pointer("metadata", "annotations", key)
        if value is None:
            if key in current:
                ops.append({"op": "remove", "path": path})
        elif current.get(key) != value:
            ops.append({"op": "add", "path": path, "value": value})
    return ops


def _watch_hint(req: AdmissionRequest) -> str:
    return f"watch with kubectl get canary {req.name} -n {req.namespace} -w"


def review(req: AdmissionRequest, observed: Observed | None, *, now: datetime) -> Decision:
    if req.operation not in ("CREATE", "UPDATE") or not req.is_deployment:
        return Decision(allowed=True, reason="ignored")
    new, old = req.object or {}, req.old_object
    new_annotations = _annotations(new)
    if (new.get("metadata") or {}).get("deletionTimestamp"):
        return Decision(allowed=True, reason="deleting")
    opted_in = is_opted_in(new_annotations)
    was_opted_in = req.operation == "UPDATE" and is_opted_in(_annotations(old))
    if not opted_in:
        if not was_opted_in:
            return Decision(allowed=True, reason="not-opted-in")
        return Decision(
            allowed=True,
            reason="opt-out",
            actions=(HandBack(),),
            warnings=(
                f"perch: {req.name} opted out; traffic goes to the primary, the canary is removed, "
                "and this update rolls out as a plain Deployment update",
            ),
        )

    new_template = _template(new)
    spec_text = new_annotations.get(ANNOTATION_SPEC)
    spec_changed = req.operation == "CREATE" or spec_text != _annotations(old).get(ANNOTATION_SPEC)

    if req.operation == "UPDATE" and was_opted_in:
        old_template = _template(old)
        # Most updates (scale, labels, re-applies) carry the very same template: equal dicts need
        # no hashing, which is the admission fast path.
        same = new_template == old_template
        old_rev = "" if same else template_revision(old_template)
        if same or template_revision(new_template) == old_rev:
            if spec_changed:
                try:
                    parse_spec(spec_text)
                except SpecError as err:
                    return _deny_spec(err)
            restart = not same and is_restart_only(old_template, new_template)
            return Decision(allowed=True, reason="restart" if restart else "unchanged")
    new_rev = template_revision(new_template)
    try:
        spec = check_spec(spec_text, deployment=req.name)
    except SpecError as err:
        return _deny_spec(err)

    if observed is None:
        return Decision(allowed=True, reason="observe", spec=spec)
    if req.operation == "CREATE" or not was_opted_in:
        decision = _initialize(req, spec, observed, revision=new_rev, now=now)
    else:
        decision = _new_revision(req, spec, observed, old_rev=old_rev, new_rev=new_rev, now=now)
    return _with_spec_warnings(decision, spec)


def _reinvoked(req: AdmissionRequest, record: CanaryRecord) -> bool:
    """The API server calls Perch again for the same request when a webhook after Perch edited
    the object (reinvocationPolicy IfNeeded; request uids differ between calls). Perch's first
    answer then shows in the object: its own annotation changed from the stored value to what the
    Canary object records for this very release (the revision it started, or the handoff it let
    through). A user's request carries the stored values, or stale ones that do not match the
    Canary, so it is never taken for one."""
    new, old = _annotations(req.object), _annotations(req.old_object)
    status = record.status
    started = new.get(ANNOTATION_CANARY_REVISION)
    if (
        status.active
        and started
        and started == record.revision == status.canary_revision
        and started != old.get(ANNOTATION_CANARY_REVISION)
    ):
        return True
    handed = new.get(ANNOTATION_REVISION)
    return bool(
        handed
        and handed == status.handoff_revision == new.get(ANNOTATION_PROMOTED_REVISION)
        and handed != old.get(ANNOTATION_REVISION)
    )


def _with_spec_warnings(decision: Decision, spec: CanarySpec) -> Decision:
    if not spec.warnings:
        return decision
    return replace(decision, warnings=(*decision.warnings, *spec_warnings(spec)))


def _deny_spec(err: SpecError) -> Decision:
    return Decision(allowed=False, reason="denied-spec", message=denial_message(err))


def _deny_foreign(req: AdmissionRequest, observed: Observed) -> Decision:
    names = ", ".join(observed.foreign_objects)
    return Decision(
        allowed=False,
        reason="denied-foreign",
        message=(
            f"perch: {names} already exists and is not managed by Perch; "
            f"Perch will not overwrite it. Delete or rename it, or remove {ANNOTATION_SPEC} "
            f"and perch.dev/enabled from {req.name}"
        ),
    )


def _initialize(
    req: AdmissionRequest, spec: CanarySpec, observed: Observed, *, revision: str, now: datetime
) -> Decision:
    """A Deployment created opted in, or opted in by this update: it rolls out as usual and Perch
    sets up the Canary object and routes at 100 % primary for the releases that follow."""
    if observed.foreign_objects:
        return _deny_foreign(req, observed)
    annotations = _annotations(req.object)
    patch = _set_annotations(
        {ANNOTATION_REVISION: revision, ANNOTATION_CANARY_REVISION: None}, annotations
    )
    actions: list[Action] = [
        WriteCanaryObject(
            status=initialized(revision=revision, at=now),
            revision="",
            template=None,
            expected_resource_version=observed.canary.resource_version if observed.canary else None,
        ),
        EnsureCanaryService(),
        EnsureRoutes(reset=True),
    ]
    warnings: list[str] = []
    if req.operation == "CREATE":
        actions.append(AdoptWhenCreated())
    else:
        warnings.append(
            f"perch: {req.name} opted in; this update rolls out as usual and later template "
            "changes are released as canaries"
        )
    return Decision(
        allowed=True,
        reason="initialized",
        patch=tuple(patch),
        warnings=tuple(warnings),
        actions=tuple(actions),
        spec=spec,
    )


def _new_revision(
    req: AdmissionRequest,
    spec: CanarySpec,
    observed: Observed,
    *,
    old_rev: str,
    new_rev: str,
    now: datetime,
) -> Decision:
    annotations = _annotations(req.object)
    record = observed.canary
    status = record.status if record else CanaryStatus()

    # The handshake: the analyzer copies the canary's template in (promotion), or puts the last
    # good template back after a failed promotion (restore), only after committing that revision
    # as the Canary's handoff. A template that is the handoff revision and carries the mark for it
    # goes through; the mark alone (a user can copy an annotation) does not.
    if (
        record is not None
        and status.handoff_revision == new_rev
        and annotations.get(ANNOTATION_PROMOTED_REVISION) == new_rev
    ):
        # A restore leaves the failed revision recorded as held back, as a rollback does.
        held_back = None if new_rev == record.revision else record.revision or None
        patch = _set_annotations(
            {ANNOTATION_REVISION: new_rev, ANNOTATION_CANARY_REVISION: held_back}, annotations
        )
        return Decision(allowed=True, reason="promotion", patch=tuple(patch), spec=spec)

    if record is not None and _reinvoked(req, record):
        # The template is the one Perch chose a moment ago plus another webhook's edit (a policy
        # engine stamping templates): the primary's, as policy wants it. The release is decided.
        return Decision(allowed=True, reason="reinvoked", spec=spec)

    if spec.skip_analysis:
        patch = _set_annotations(
            {ANNOTATION_REVISION: new_rev, ANNOTATION_CANARY_REVISION: None}, annotations
        )
        return Decision(
            allowed=True,
            reason="skip-analysis",
            patch=tuple(patch),
            warnings=(
                f"perch: skipAnalysis is set; revision {new_rev} rolls out without a canary",
            ),
            spec=spec,
        )

    if observed.foreign_objects:
        return _deny_foreign(req, observed)

    # Hold the release back: the primary keeps its template, the canary gets the new one.
    hold_back: list[PatchOp] = [
        {"op": "replace", "path": "/spec/template", "value": dict(_template(req.old_object))}
    ]
    hold_back += _set_annotations(
        {ANNOTATION_REVISION: old_rev, ANNOTATION_CANARY_REVISION: new_rev}, annotations
    )
    held: tuple[PatchOp, ...] = tuple(hold_back)
    new_template = dict(_template(req.object))
    workload = EnsureCanaryWorkload(template=new_template, revision=new_rev)

    if record is not None and new_rev == status.failed_revision:
        return Decision(
            allowed=True,
            reason="failed-revision",
            patch=held,
            warnings=(
                f"perch: revision {new_rev} failed its canary analysis; {req.name} keeps "
                f"revision {old_rev}. To try it again: kubectl annotate deployment {req.name} "
                f"-n {req.namespace} perch.dev/action=retry",
            ),
            spec=spec,
        )

    if (
        record is not None
        and status.active
        and new_rev in (record.revision, status.canary_revision)
    ):
        return Decision(
            allowed=True,
            reason="canary-kept",
            patch=held,
            warnings=(
                f"perch: revision {new_rev} is already under analysis ({status.phase}, canary "
                f"weight {status.canary_weight}%); {_watch_hint(req)}",
            ),
            actions=(EnsureCanaryService(), workload),
            spec=spec,
        )

    replacing = record is not None and status.active
    started = analysis_started(status, revision=new_rev, at=now, primary_revision=old_rev)
    # The routes go back to 100 % primary before the canary's template changes: a canary at some
    # weight must not serve the new, unanalysed revision even for a moment.
    actions: tuple[Action, ...] = (
        WriteCanaryObject(
            status=started,
            revision=new_rev,
            template=new_template,
            expected_resource_version=record.resource_version if record else None,
        ),
        EnsureRoutes(reset=True),
        EnsureCanaryService(),
        workload,
    )
    if replacing:
        warning = (
            f"perch: revision {new_rev} replaces {status.canary_revision} under analysis; "
            f"analysis restarted at weight 0; {_watch_hint(req)}"
        )
    else:
        warning = f"perch: canary started for revision {new_rev}; {_watch_hint(req)}"
    return Decision(
        allowed=True,
        reason="canary-replaced" if replacing else "canary-started",
        patch=held,
        warnings=(warning,),
        actions=actions,
        spec=spec,
    )
