"""The analyzer's typed data: what the shell observes each tick and what step() asks it to do.

Pure data, no I/O. `analyzer.step.step(spec, status, observations)` is a function of these and of
`perch.spec.CanarySpec` / `perch.status.CanaryStatus` only.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from perch.spec import WebhookType

MetricOutcome = Literal["pass", "fail", "no-data", "error"]
GateOutcome = Literal["pass", "fail", "timeout", "error"]
ControlAction = Literal["promote", "abort", "retry", "pause", "resume"]
EventType = Literal["Normal", "Warning"]
NotificationKind = Literal["started", "halted", "failed", "promoted"]


@dataclass(frozen=True, slots=True)
class MetricResult:
    name: str
    outcome: MetricOutcome
    # The measured value in the metric's unit (percent for success rate, ms for duration).
    value: float | None
    # Flagger's wording, e.g. "success rate 61.39% < 99%", "request duration 1.515s > 500ms",
    # "no data for metric request-success-rate", "Prometheus query failed: timeout".
    message: str


@dataclass(frozen=True, slots=True)
class GateResult:
    name: str
    type: WebhookType
    outcome: GateOutcome
    message: str


@dataclass(frozen=True, slots=True)
class Workload:
    """Readiness of a Deployment as the analyzer sees it."""

    exists: bool = True
    desired: int = 1
    ready: int = 0
    updated: int = 0
    # observedGeneration >= generation and every replica updated and available.
    rolled_out: bool = False
    # The revision its pod template hashes to (perch.revision.template_revision).
    revision: str = ""

    @property
    def has_ready_pods(self) -> bool:
        return self.ready > 0


@dataclass(frozen=True, slots=True)
class Observations:
    now: datetime
    canary: Workload
    primary: Workload
    # (primary, canary) weights read back from the route; None when the route is missing.
    route_weights: tuple[int, int] | None
    # Results for this tick, only for what `needs()` asked for; empty otherwise.
    metrics: tuple[MetricResult, ...] = ()
    gates: tuple[GateResult, ...] = ()
    # A perch.dev/action annotation found on the primary (the shell clears it after the step).
    control: ControlAction | None = None
    # False when the global cap on progressing canaries is reached and this one must queue.
    admitted: bool = True
    # How many canaries hold a slot (CanaryStatus.holds_slot), for the message when not admitted.
    progressing: int | None = None
    # The route carries more than the weighted split: an A/B match rule, a mirror or session
    # cookies (perch.routers Router.analysing); False when it is missing.
    route_analysing: bool = False


@dataclass(frozen=True, slots=True)
class Needs:
    """What the shell must gather before calling step() for this tick."""

    metrics: bool = False
    gates: tuple[WebhookType, ...] = ()


# Actions, performed by the shell in the order step() gives them. CommitStatus is where the new
# status is written, conditionally on the resourceVersion read at the start of the tick: step()
# puts it before every write to the cluster, so a tick whose status write is refused (someone
# wrote first) changes nothing, and a tick cut short after it is finished by the next one from
# what it observes (analyzer.step's module docstring lists how).


@dataclass(frozen=True, slots=True)
class SetWeights:
    """Put the route at these weights, in the shape the committed status calls for: with what
    the analysis adds (A/B match, mirror, session cookies) while analyzer.step.route_revision
    names the revision under analysis, the plain weighted split otherwise."""

    primary: int
    canary: int


@dataclass(frozen=True, slots=True)
class ScaleCanary:
    # None: back to the primary's replica count (the HPA takes over); 0: scaled down.
    replicas: int | None


@dataclass(frozen=True, slots=True)
class SaveStableTemplate:
    """Save the primary's template (of `revision`) in the Canary object before a promotion, so
    that a failed promotion can put it back. Written before the status, with its precondition."""

    revision: str


@dataclass(frozen=True, slots=True)
class CommitStatus:
    """Write the tick's new status here (conditionally); a refused write ends the tick."""


@dataclass(frozen=True, slots=True)
class PromoteTemplate:
    """Copy the canary's template into the primary with the promotion mark for `revision`. The
    committed status names `revision` as its handoff, which is what lets it through admission."""

    revision: str


@dataclass(frozen=True, slots=True)
class RestorePrimary:
    """Put the saved last good template (of `revision`, the committed handoff) back into the
    primary: a promotion that failed."""

    revision: str


@dataclass(frozen=True, slots=True)
class CallGates:
    """Fire-and-forget gates (post-rollout, event): their outcome does not change the rollout."""

    type: WebhookType
    phase: str


@dataclass(frozen=True, slots=True)
class Event:
    reason: str
    message: str
    type: EventType = "Normal"


@dataclass(frozen=True, slots=True)
class Notify:
    kind: NotificationKind
    message: str


@dataclass(frozen=True, slots=True)
class ClearControl:
    """Remove the perch.dev/action annotation the step has acted on."""


Action = (
    SaveStableTemplate
    | CommitStatus
    | SetWeights
    | ScaleCanary
    | PromoteTemplate
    | RestorePrimary
    | CallGates
    | Event
    | Notify
    | ClearControl
)
