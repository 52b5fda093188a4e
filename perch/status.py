"""The Canary status object (perch.dev/v1alpha1): its typed status and the object's wire shape.

The status is the rollout's memory: a restarted analyzer continues from it, and the webhook reads it
to tell a new release from one already under analysis or one that failed. Pure: no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal, TypedDict, cast, get_args

from perch.names import (
    CANARY_API_VERSION,
    CANARY_KIND,
    LABEL_MANAGED_BY,
    LABEL_TARGET,
    MANAGED_BY_VALUE,
)

Phase = Literal[
    "Initializing",
    "Initialized",
    "Waiting",
    "Progressing",
    "WaitingPromotion",
    "Promoting",
    "Finalising",
    "Succeeded",
    "Failed",
    "Terminated",
]
PHASES: tuple[Phase, ...] = get_args(Phase)
# Phases in which a revision is being analysed or promoted: a new template then replaces it.
ACTIVE_PHASES: frozenset[Phase] = frozenset(
    {"Initializing", "Waiting", "Progressing", "WaitingPromotion", "Promoting", "Finalising"}
)
# Phases in which the analyzer judges the canary (before the template is copied into the primary).
ANALYSING_PHASES: frozenset[Phase] = frozenset({"Waiting", "Progressing", "WaitingPromotion"})


class Condition(TypedDict):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str
    lastTransitionTime: str
    lastUpdateTime: str


CheckKind = Literal["metric", "gate"]
# A message longer than this is cut: the status is read on every tick, and one check's error
# text (a Prometheus answer, say) must not grow it without bound.
MAX_CHECK_MESSAGE = 300


@dataclass(frozen=True, slots=True)
class LastCheck:
    """One check of the last judged interval: a metric against its threshold, or a rollout gate.

    ``outcome`` is the analyzer's (metrics: pass, fail, no-data, error; gates: pass, fail,
    timeout, error). ``value`` is the measured value in the metric's unit (percent for
    request-success-rate, milliseconds for request-duration), None when there was none;
    ``min``/``max`` the thresholdRange it was judged against. Informational: no decision reads it.
    """

    name: str
    outcome: str
    kind: CheckKind = "metric"
    value: float | None = None
    min: float | None = None
    max: float | None = None
    message: str = ""

    def __post_init__(self) -> None:
        # Normalised here so that what is stored reads back equal: JSON has no NaN or infinity
        # (the API server refuses a body that holds one), and a long message is cut.
        for key in ("value", "min", "max"):
            object.__setattr__(self, key, _number(getattr(self, key)))
        object.__setattr__(self, "message", self.message[:MAX_CHECK_MESSAGE])

    @classmethod
    def from_wire(cls, raw: Mapping[str, Any]) -> LastCheck:
        kind = raw.get("kind")
        return cls(
            name=str(raw.get("name") or ""),
            outcome=str(raw.get("outcome") or ""),
            kind="gate" if kind == "gate" else "metric",
            value=_number(raw.get("value")),
            min=_number(raw.get("min")),
            max=_number(raw.get("max")),
            message=str(raw.get("message") or ""),
        )

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"name": self.name, "kind": self.kind, "outcome": self.outcome}
        for key, number in (("value", self.value), ("min", self.min), ("max", self.max)):
            if number is not None:
                wire[key] = number
        if self.message:
            wire["message"] = self.message
        return wire


def timestamp(at: datetime) -> str:
    """RFC 3339 in UTC with a Z, second precision, as the API server prints times."""
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class CanaryStatus:
    phase: Phase = "Initializing"
    canary_weight: int = 0
    failed_checks: int = 0
    iterations: int = 0
    # The revision under analysis (or last analysed), and the revision the primary runs.
    canary_revision: str = ""
    last_applied_revision: str = ""
    failed_revision: str = ""
    # How many times a newer revision replaced the one under analysis.
    analysis_restarts: int = 0
    phase_entered_at: str = ""
    last_transition_time: str = ""
    # One-shot gates (confirm-rollout, pre-rollout, ...) already passed for canary_revision.
    gates_done: tuple[str, ...] = ()
    conditions: tuple[Condition, ...] = field(default=())
    # perch.dev/action=pause: no progress (safety rollbacks still happen) until resume.
    paused: bool = False
    # The canary_revision the analyzer has taken up (it then holds a slot of the global cap). The
    # progress fields above belong to it: when it differs from canary_revision they are stale, and
    # the analyzer starts the analysis over.
    analysed_revision: str = ""
    # Since when the canary (primary) has not been seen ready, RFC 3339; "" when it was ready at the
    # last tick. The readiness deadlines (progressDeadlineSeconds) are measured from these.
    canary_unready_since: str = ""
    primary_unready_since: str = ""
    # The confirm gates waited for: their type (confirm-rollout, confirm-traffic-increase,
    # confirm-promotion) and since when, RFC 3339, i.e. when they were first asked and did not
    # approve; "" when no confirm gate is waited for. A gate's maxWait is measured from it, so a
    # restarted analyzer keeps counting. confirm_timed_out names the gates of that type whose
    # maxWait has run out with onTimeout "wait" (or "proceed" while another gate still waits),
    # so that this is announced once.
    confirm_type: str = ""
    confirm_asked_at: str = ""
    confirm_timed_out: tuple[str, ...] = ()
    # The revision the analyzer is writing into the primary: the canary's, while it promotes, or
    # the last good one, while it restores after a failed promotion; "" otherwise. The analyzer
    # records it (a conditional status write) before it writes the template, and the webhook lets
    # a template through only when it is this revision and carries the promotion mark for it: the
    # handshake of docs/webhook.md.
    handoff_revision: str = ""
    # The checks of the last judged interval, for people (kubectl perch status): what each metric
    # measured against its threshold, and what each rollout gate answered. They belong to
    # canary_revision and are dropped when another analysis starts.
    last_checks: tuple[LastCheck, ...] = ()

    @classmethod
    def from_wire(cls, raw: Mapping[str, Any] | None) -> CanaryStatus:
        raw = raw or {}
        phase = raw.get("phase")
        return cls(
            phase=cast(Phase, phase) if phase in PHASES else "Initializing",
            canary_weight=_int(raw.get("canaryWeight")),
            failed_checks=_int(raw.get("failedChecks")),
            iterations=_int(raw.get("iterations")),
            canary_revision=str(raw.get("canaryRevision") or ""),
            last_applied_revision=str(raw.get("lastAppliedRevision") or ""),
            failed_revision=str(raw.get("failedRevision") or ""),
            analysis_restarts=_int(raw.get("analysisRestarts")),
            phase_entered_at=str(raw.get("phaseEnteredAt") or ""),
            last_transition_time=str(raw.get("lastTransitionTime") or ""),
            gates_done=tuple(str(g) for g in raw.get("gatesDone") or ()),
            conditions=tuple(cast(Condition, dict(c)) for c in raw.get("conditions") or ()),
            paused=raw.get("paused") is True,
            analysed_revision=str(raw.get("analysedRevision") or ""),
            canary_unready_since=str(raw.get("canaryUnreadySince") or ""),
            primary_unready_since=str(raw.get("primaryUnreadySince") or ""),
            confirm_type=str(raw.get("confirmType") or ""),
            confirm_asked_at=str(raw.get("confirmAskedAt") or ""),
            confirm_timed_out=tuple(str(g) for g in raw.get("confirmTimedOut") or ()),
            handoff_revision=str(raw.get("handoffRevision") or ""),
            last_checks=tuple(
                LastCheck.from_wire(c) for c in raw.get("lastChecks") or () if isinstance(c, dict)
            ),
        )

    def to_wire(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "canaryWeight": self.canary_weight,
            "failedChecks": self.failed_checks,
            "iterations": self.iterations,
            "canaryRevision": self.canary_revision,
            "lastAppliedRevision": self.last_applied_revision,
            "failedRevision": self.failed_revision,
            "analysisRestarts": self.analysis_restarts,
            "phaseEnteredAt": self.phase_entered_at,
            "lastTransitionTime": self.last_transition_time,
            "gatesDone": list(self.gates_done),
            "conditions": [dict(c) for c in self.conditions],
            "paused": self.paused,
            "analysedRevision": self.analysed_revision,
            "canaryUnreadySince": self.canary_unready_since,
            "primaryUnreadySince": self.primary_unready_since,
            "confirmType": self.confirm_type,
            "confirmAskedAt": self.confirm_asked_at,
            "confirmTimedOut": list(self.confirm_timed_out),
            "handoffRevision": self.handoff_revision,
            "lastChecks": [c.to_wire() for c in self.last_checks],
        }

    @property
    def active(self) -> bool:
        return self.phase in ACTIVE_PHASES

    @property
    def holds_slot(self) -> bool:
        """Counts against the global cap on canaries progressing at once: taken up and not done.

        A canary queued for a slot (phase Waiting, not yet taken up) does not hold one.
        """
        return _holds_slot(self.phase, self.canary_revision, self.analysed_revision)


def wire_holds_slot(raw: Mapping[str, Any] | None) -> bool:
    """``CanaryStatus.from_wire(raw).holds_slot``, reading only the three fields it needs.

    A queued canary counts the slots held by every other canary at each of its ticks. Building
    each one's whole CanaryStatus made that count 6.6 ms at 1,000 canaries (0.4 ms this way), and
    900 canaries queued behind a cap of 100 kept the analyzer so busy that the 100 it let through
    missed a third of their ticks (benchmarks/README.md, "The global cap at 1,000 canaries").
    """
    raw = raw or {}
    phase = raw.get("phase")
    return _holds_slot(
        phase if phase in PHASES else "Initializing",  # as from_wire reads it
        str(raw.get("canaryRevision") or ""),
        str(raw.get("analysedRevision") or ""),
    )


def _holds_slot(phase: Any, canary_revision: str, analysed_revision: str) -> bool:
    taken_up = analysed_revision == canary_revision
    return phase in ACTIVE_PHASES and canary_revision != "" and taken_up


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _promoted_condition(*, reason: str, message: str, now: str, status: str) -> Condition:
    return Condition(
        type="Promoted",
        status=cast(Literal["True", "False", "Unknown"], status),
        reason=reason,
        message=message,
        lastTransitionTime=now,
        lastUpdateTime=now,
    )


# The Promoted condition of each phase, as Flagger words it.
_PHASE_CONDITION: dict[Phase, tuple[Literal["True", "False", "Unknown"], str]] = {
    "Initializing": ("Unknown", "Initializing."),
    "Initialized": ("True", "Deployment initialization completed."),
    "Waiting": ("Unknown", "Waiting for approval."),
    "Progressing": ("Unknown", "New revision detected, progressing canary analysis."),
    "WaitingPromotion": ("Unknown", "Waiting for approval."),
    "Promoting": ("Unknown", "Canary analysis completed, starting primary rolling update."),
    "Finalising": ("Unknown", "Canary analysis completed, routing all traffic to primary."),
    "Succeeded": ("True", "Canary analysis completed successfully, promotion finished."),
    "Failed": ("False", "Canary analysis failed, Deployment scaled to zero."),
    "Terminated": ("False", "Opt-in removed; traffic routed to the primary and canary removed."),
}


def entered(prev: CanaryStatus, phase: Phase, *, at: datetime, message: str = "") -> CanaryStatus:
    """`prev` moved into `phase` at `at`: the entry time and the Promoted condition follow.

    `message` overrides the phase's usual condition message (e.g. why a canary waits).
    """
    now = timestamp(at)
    status, usual = _PHASE_CONDITION[phase]
    return replace(
        prev,
        phase=phase,
        phase_entered_at=now,
        last_transition_time=now,
        conditions=(
            _promoted_condition(reason=phase, message=message or usual, now=now, status=status),
        ),
    )


def initialized(*, revision: str, at: datetime) -> CanaryStatus:
    """A newly opted-in Deployment: routes at 100 % primary, nothing to analyse."""
    now = timestamp(at)
    return CanaryStatus(
        phase="Initialized",
        last_applied_revision=revision,
        phase_entered_at=now,
        last_transition_time=now,
        conditions=(
            _promoted_condition(
                reason="Initialized",
                message="Deployment initialization completed.",
                now=now,
                status="True",
            ),
        ),
    )


def analysis_started(
    prev: CanaryStatus, *, revision: str, at: datetime, primary_revision: str = ""
) -> CanaryStatus:
    """A new revision held back at admission: analysis starts from weight 0 with fresh counters.

    A revision replacing one still under analysis counts as a restart, so that the history shows it.
    `primary_revision` is what the primary runs as the analysis starts (the template the webhook
    keeps): it is the last good revision from now on, also when a promotion was under way and its
    copy had already reached the primary. A handoff in progress is called off.
    """
    now = timestamp(at)
    restarted = prev.active and prev.canary_revision not in ("", revision)
    return replace(
        prev,
        phase="Progressing",
        last_applied_revision=primary_revision or prev.last_applied_revision,
        handoff_revision="",
        canary_weight=0,
        failed_checks=0,
        iterations=0,
        canary_revision=revision,
        analysis_restarts=prev.analysis_restarts + (1 if restarted else 0),
        phase_entered_at=now,
        last_transition_time=now,
        gates_done=(),
        # Not yet taken up by the analyzer: it starts this revision's analysis (and its deadlines)
        # afresh, even when the same revision comes back (A, then B, then A again).
        analysed_revision="",
        canary_unready_since="",
        primary_unready_since="",
        confirm_type="",
        confirm_asked_at="",
        confirm_timed_out=(),
        last_checks=(),
        conditions=(
            _promoted_condition(
                reason="Progressing",
                message=(
                    f"New revision {revision} replaced {prev.canary_revision}; analysis restarted."
                    if restarted
                    else f"New revision {revision} detected, starting canary analysis."
                ),
                now=now,
                status="Unknown",
            ),
        ),
    )


def terminated(prev: CanaryStatus, *, at: datetime) -> CanaryStatus:
    """The Deployment opted out: Perch handed it back and stopped analysing."""
    now = timestamp(at)
    return replace(
        prev,
        phase="Terminated",
        canary_weight=0,
        phase_entered_at=now,
        last_transition_time=now,
        conditions=(
            _promoted_condition(
                reason="Terminated",
                message="Opt-in removed; traffic routed to the primary and canary removed.",
                now=now,
                status="False",
            ),
        ),
    )


def canary_object(
    *,
    name: str,
    namespace: str,
    provider: str,
    owner_references: list[dict[str, Any]],
    revision: str = "",
    template: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The Canary object's metadata and spec (the status is written through its subresource)."""
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "labels": {LABEL_MANAGED_BY: MANAGED_BY_VALUE, LABEL_TARGET: name},
    }
    if owner_references:
        metadata["ownerReferences"] = owner_references
    spec: dict[str, Any] = {
        "targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
        "provider": provider,
        "revision": revision,
    }
    if template is not None:
        spec["template"] = dict(template)
    return {
        "apiVersion": CANARY_API_VERSION,
        "kind": CANARY_KIND,
        "metadata": metadata,
        "spec": spec,
    }
