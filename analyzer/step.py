"""The analyzer's decision as a pure function: step(spec, status, obs) -> (status, actions).

The shell (the APScheduler job) does, each tick::

    wanted = needs(spec, status, now=now)          # what to measure and which gates to call
    obs = Observations(...)                        # readiness, route weights, control annotation,
                                                   # admission to a slot, and what `wanted` asked
    new_status, actions = step(spec, status, obs, name=..., namespace=...)
    perform(actions) in order; CommitStatus writes new_status with the resourceVersion read at
    the start of the tick, and a refused write ends the tick

The status is committed first. step() orders the actions so that the conditional status write
(CommitStatus) comes before every write to the cluster (routes, scale, the primary's template),
and the records (events, notifications, fire-and-forget gates) and ClearControl after them. Only
SaveStableTemplate, which the status depends on, is written before, under the same precondition.
So a decision taken on a stale read (the webhook started a new revision meanwhile) is refused
whole, and a tick cut short after its commit (a crash, an API error) is finished by the next tick
from what it observes, never repeated and never undone:

- a route that differs from the status weight, or whose shape differs from what the status calls
  for (``route_revision``: an A/B match, a mirror or session cookies while analysing, none
  otherwise), is set again (``_drifted``; also in Failed at weight 0, so that no match rule keeps
  sending requests to a scaled-down canary);
- Promoting while the primary does not run the handoff revision: the copy is issued again;
  Failed while it does not run the restore's handoff: the restore is issued again;
- a canary with replicas while idle (Failed at weight 0, Succeeded) is scaled down again; a
  canary at zero replicas while analysed (a retry) is scaled up again;
- ClearControl comes last: a control left in place is seen again and, no longer applying, is
  cleared with a "not applied" event.

Events, notifications and post-rollout gates are at most once: a crash between the commit and
them loses them (Kubernetes Events are best-effort too); they never announce a step whose status
was refused. Returning the status as given and no actions means "nothing to do".

No I/O: a function of the spec, the status and the observations (including `obs.now`) only.

Phases are Flagger's. Initialized, Succeeded, Terminated and Failed (once its traffic is back on the
primary) are idle. Progressing, Waiting and WaitingPromotion are *analysing*; Promoting and
Finalising follow the copy of the canary template into the primary.

Each interval, while analysing, in this order:

1. ``perch.dev/action=abort`` rolls back ("Rolling back podinfo.test manual abort"); a status whose
   failedChecks already reached the threshold rolls back; a ``rollback`` gate answering 2xx rolls
   back ("Rolling back podinfo.test manual webhook invoked"), which is Flagger's meaning of that
   webhook type (a manual rollback switch polled while analysing), not "call me on rollback".
2. A route whose weights differ from the status is put back to the status weight; the tick ends.
3. ``perch.dev/action=promote`` (and ``skipAnalysis``, unless paused) promotes as soon as the
   canary is ready: no more metrics or gates. A promote request waits (the annotation stays) while
   the canary is not ready.
4. Taking the revision up: a revision the analyzer has not yet taken up
   (``status.analysed_revision`` differs from ``canary_revision``) starts afresh; stale progress
   fields are dropped. If ``obs.admitted`` is False (the global cap on canaries progressing at once
   is reached), it queues in phase Waiting with one event and no other action. A canary once taken
   up holds its slot (``CanaryStatus.holds_slot``) and is never pre-empted.
5. Readiness: a canary (or primary) that is not ready halts the analysis without a failed check and
   never gets weight; not ready for more than ``progressDeadlineSeconds`` (measured from when it was
   first seen not ready, stored in the status) rolls back, whatever the Deployment's conditions say.
6. A paused canary (``perch.dev/action=pause``) stops here: it neither advances nor gathers failed
   checks until ``resume``, but the safety rules above (abort, rollback gates, deadlines) still
   hold.
7. The first step (weight 0, iteration 0): ``confirm-rollout`` gates (not all 2xx: phase Waiting, no
   failed check), then ``pre-rollout`` gates (a failure is a failed check), then for the canary
   strategy ``confirm-traffic-increase``; then the first weight. No metrics: the canary has had no
   traffic to judge. The passed one-shot gates are recorded in ``gates_done``.
   ``pre-rollout`` gates are asked for only once the canary was seen ready at the previous tick, so
   a smoke test or a migration never runs against pods that do not serve yet; a spec with
   pre-rollout gates therefore takes its first step one interval later than one without. More
   generally, a step is judged only on what needs() asked for at the start of the tick: when the
   status moved on within the tick (resumed, taken up) so that the step needs more, it waits for
   the next tick instead of reading absent results as failures.
8. Later steps: every metric passes and every ``rollout`` gate answers 2xx, else failedChecks += 1
   (one per tick, however many checks failed; each failure is its own event) and the weight stays.
   A failed query (or a MetricTemplate that cannot be used) is a failure and says so: a dead
   Prometheus halts and eventually rolls back, it never promotes. A metric with no data ("no data
   for metric …") follows its ``onNoData``: ``fail`` (the default) is a failed check, ``pass``
   passes it, ``skip`` leaves it out of the interval; an interval in which every metric was
   skipped is not judged at all: the weight stays and no failed check counts. Then
   ``confirm-traffic-increase`` (not 2xx: stay, no failed check) and the next weight; at
   maxWeight ``confirm-promotion`` (not 2xx: phase WaitingPromotion, metrics still judged each
   tick) and the promotion.

Confirm gates wait for approval without limit (Flagger), unless a gate has ``maxWait``: the wait
is counted from the first tick at which the gates of that type were asked and did not all approve
(``status.confirm_type`` and ``confirm_asked_at``, so a restarted analyzer keeps counting; pauses
and readiness halts do not stop the clock), and once a gate has not approved within its maxWait
its ``onTimeout`` applies (``analyzer.gates.confirm_state``): ``abort`` rolls back ("Rolling back
podinfo.test confirm-promotion gate ship-it not approved within 10m"), ``proceed`` goes on as if
approved ("Proceeding with podinfo.test: confirm-promotion gate ship-it not approved within 10m
(onTimeout: proceed)"), ``wait`` keeps waiting with one event. With several gates of one type the
canary rolls back if any gate aborts, proceeds only if every gate that has not approved proceeds,
and otherwise waits. The wait ends when the gates approve or proceed, so each traffic increase is
its own question (after proceed, confirm-promotion's lasts until the copy: blue-green asks it again
before the copy), and starts afresh for another confirm type or a new revision.

Strategies (``spec.analysis.strategy``):

- canary: weights ``spec.analysis.steps`` (stepWeight or stepWeights, capped at maxWeight). The
  first tick goes to the first step, each passing tick to the next, and the tick after reaching
  maxWeight (one more judged interval at maxWeight) promotes: the seed (stepWeight 5, maxWeight 50)
  reaches 50 % after 10 ticks and starts the promotion at tick 11, i.e. 10 intervals after the
  first tick; Finalising and Succeeded take one tick each after the primary has rolled out.
- blue-green (iterations, no match): as Flagger. The canary keeps weight 0 while ``iterations``
  iterations run (the first is the start step, as in Flagger: so ``iterations: 10`` judges 9
  intervals of metrics, fed by the ``rollout`` load-test gates); then, confirm-promotion passing,
  all traffic goes to the canary (SetWeights(0, 100), "Routing all traffic to canary") for one more
  judged iteration, and then the template is promoted while the canary serves everything, so the
  primary's rolling update never carries live traffic it cannot take. With ``mirror`` the first
  iteration issues SetWeights(100, 0) so that the route mirrors ``mirrorWeight`` percent of the
  requests to the canary ("Mirroring 50% of the requests of podinfo.test to podinfo-canary.test");
  the mirror ends with the switch to the canary.
- ab-testing (iterations and match): the same iterations, SetWeights never moves from (100, 0):
  sending the requests that match ``analysis.match`` to the canary is the route's shape, not a
  weight. The first iteration issues SetWeights(100, 0) so that the route takes the match rule
  ("Routing requests of podinfo.test that match analysis.match to podinfo-canary.test"); after
  the last iteration (and confirm-promotion) the template is promoted, and Finalising's
  SetWeights(100, 0) takes the rule away again.
- session affinity (canary strategy only): each SetWeights of the analysis carries the cookies;
  the one of Finalising (or of a rollback) drops them.

The route's shape is not an action field: SetWeights puts the route in the shape the committed
status calls for (``route_revision``: the revision under analysis from the first step until
Finalising or Failed, "" otherwise), so a route re-issued by a later tick has the same shape.

Promotion, the handshake with the webhook (docs/webhook.md): SaveStableTemplate (the primary's
template, the last good one), then the status commits phase Promoting with
``handoff_revision`` = the canary revision, then PromoteTemplate copies the canary's template
into the primary with the promotion mark ("Copying podinfo-canary.test template spec to
podinfo.test"). The webhook admits that template because the committed status names it; a copy
issued before the commit would be held back as a release, which is why the order matters.
Promoting waits until the primary runs the canary revision and has rolled out (re-issuing the
copy while the primary does not run it); then routes go back to the primary (phase Finalising):
all at once, or stepWeightPromotion points per tick; with the canary at weight 0 a last tick
scales it down: phase Succeeded, ``post-rollout`` gates, notification. If the primary has not
rolled out within progressDeadlineSeconds of entering Promoting (or stops being ready while
Finalising), the last good template is restored (the status commits Failed with
``handoff_revision`` = the last good revision, then RestorePrimary, re-issued while the primary
does not run it) and the phase is Failed with the canary still serving its weight: traffic is
never all sent to a broken primary. A Failed canary that still has weight is not idle: once the
primary is ready on its last good revision, the traffic goes back to it and the canary is scaled
down. A rollback during the analysis follows the same rule when the primary has no ready pods at
all.

Control (``perch.dev/action``, ``obs.control``): abort, promote, pause, resume, retry (Failed only:
the same revision from weight 0 with fresh counters, canary scaled back up). A control is consumed
(ClearControl, always the last action, so that a failed action leaves the request in place) when it
is acted on, and also when it does not apply (with a Warning event saying why), so that a stale
request never fires on a later release; ``promote`` is the exception while the canary is not ready.
``pause`` and ``resume`` apply in every phase (a paused idle canary will not start the next
release). ``spec.suspend`` and phase Terminated: nothing at all, controls included.

Events are Flagger's wording where Flagger has one. ``event`` webhooks are the shell's: it posts
every Event action to them (they need the message and type, which CallGates cannot carry).
Notifications: ``started`` when a revision is taken up, ``halted`` on each failed check and on each
wait for approval (once, on entering the wait, with its event: a canary waiting for approval
issues nothing until the gate answers; none for a webhook with muteAlert, and none for a failed
check that only muted gates failed: their halts are events only), ``failed`` on each
transition into Failed, ``promoted`` on success. Readiness waits are events only: they are how
every release starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Final, Literal

from analyzer.confirm import confirm_state
from analyzer.model import (
    Action,
    CallGates,
    ClearControl,
    CommitStatus,
    ControlAction,
    Event,
    GateResult,
    MetricResult,
    Needs,
    NotificationKind,
    Notify,
    Observations,
    PromoteTemplate,
    RestorePrimary,
    SaveStableTemplate,
    ScaleCanary,
    SetWeights,
    Workload,
)
from perch.names import ANNOTATION_ACTION, canary_name
from perch.routers.base import analysis_rules
from perch.spec import Analysis, CanarySpec, Metric, Webhook, WebhookType
from perch.status import ANALYSING_PHASES, CanaryStatus, LastCheck, Phase, entered, timestamp

__all__ = ["needs", "route_revision", "step"]

TOTAL_WEIGHT: Final = 100


# --------------------------------------------------------------------------------------------
# What to gather
# --------------------------------------------------------------------------------------------


def needs(spec: CanarySpec, status: CanaryStatus, *, now: datetime) -> Needs:
    """What the shell must gather before calling :func:`step` this tick.

    Only types the spec has webhooks of are listed. The shell calls every listed gate (their order
    does not matter: the one-shot gates whose order does, confirm-rollout before pre-rollout, are
    never asked for in the same tick) and passes the results in ``Observations.gates``; a gate that
    was asked for and has no result counts as ``error``, and results for types not asked for are
    ignored. ``now`` is part of the contract for deadlines; today's answer does not depend on it.
    """
    del now
    s = _normalised(status)
    if spec.suspend or s.phase not in ANALYSING_PHASES or not s.canary_revision:
        return Needs()
    analysis = spec.analysis
    present = {hook.type for hook in analysis.webhooks}

    def pick(*types: WebhookType) -> tuple[WebhookType, ...]:
        return tuple(kind for kind in types if kind in present)

    if s.paused:
        return Needs(gates=pick("rollback"))
    if spec.skip_analysis:
        return Needs()
    if not _started(s):
        confirm_pending = "confirm-rollout" in present and "confirm-rollout" not in s.gates_done
        pre_pending = "pre-rollout" in present and "pre-rollout" not in s.gates_done
        pre_now = (
            pre_pending and not confirm_pending and _taken_up(s) and s.canary_unready_since == ""
        )
        types: list[WebhookType] = [*pick("rollback")]
        if confirm_pending:
            types.append("confirm-rollout")
        if pre_now:
            types.append("pre-rollout")
        if analysis.strategy == "canary" and (not pre_pending or pre_now):
            types += pick("confirm-traffic-increase")
        return Needs(gates=tuple(types))
    confirm: tuple[WebhookType, ...] = ()
    if analysis.strategy == "canary":
        confirm = (
            ("confirm-traffic-increase",)
            if s.canary_weight < analysis.max_weight
            else ("confirm-promotion",)
        )
    elif s.iterations >= (analysis.iterations or 0):
        confirm = ("confirm-promotion",)
    return Needs(metrics=bool(analysis.metrics), gates=pick("rollback", "rollout", *confirm))


# --------------------------------------------------------------------------------------------
# The decision
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Tick:
    """One call's inputs and the actions it collects (step() itself stays pure)."""

    spec: CanarySpec
    obs: Observations
    target: str  # podinfo.test: the primary, named as Flagger names the canary in its events
    canary: str  # podinfo-canary.test
    asked: Needs
    actions: list[Action] = field(default_factory=list)
    consumed: bool = False
    moved: bool = False  # the phase was set this tick (possibly back to what it was)
    condition: str = ""

    @property
    def analysis(self) -> Analysis:
        return self.spec.analysis

    @property
    def now(self) -> datetime:
        now = self.obs.now
        return now if now.tzinfo is not None else now.replace(tzinfo=UTC)

    def do(self, *actions: Action) -> None:
        self.actions.extend(actions)

    def event(self, message: str, *, reason: str, warning: bool = False) -> None:
        self.actions.append(
            Event(reason=reason, message=message, type="Warning" if warning else "Normal")
        )

    def notify(self, kind: NotificationKind, message: str) -> None:
        self.actions.append(Notify(kind=kind, message=message))

    def to(self, s: CanaryStatus, phase: Phase, *, condition: str = "") -> CanaryStatus:
        self.moved = True
        self.condition = condition
        return replace(s, phase=phase)


def step(
    spec: CanarySpec, status: CanaryStatus, obs: Observations, *, name: str, namespace: str
) -> tuple[CanaryStatus, tuple[Action, ...]]:
    """The new status and the actions to perform, in order, for one tick; see the module doc."""
    if spec.suspend or status.phase == "Terminated":
        return status, ()
    tick = _Tick(
        spec=spec,
        obs=obs,
        target=f"{name}.{namespace}",
        canary=f"{canary_name(name)}.{namespace}",
        asked=needs(spec, status, now=obs.now),
    )
    after = _quiet(status, _stamped(status, _dispatch(tick, _normalised(status)), tick))
    return after, _ordered(tick.actions, changed=after != status, consumed=tick.consumed)


def _quiet(before: CanaryStatus, after: CanaryStatus) -> CanaryStatus:
    """New measurements alone are no reason to write the status.

    A canary waiting for approval (WaitingPromotion, a confirm-traffic-increase) is judged
    every interval, and its metrics never measure exactly the same twice: recording each new
    value in ``last_checks`` would be a status write per tick for a canary that is otherwise
    idle. So ``last_checks`` is renewed when the tick changes something else (a step, a failed
    check, a phase) or when a check's outcome changed (a metric that passed now has no data);
    otherwise the values shown are those of the last interval that changed something.
    """
    if after.last_checks == before.last_checks:
        return after
    kept = replace(after, last_checks=before.last_checks)
    if kept != before or _verdicts(after) != _verdicts(before):
        return after
    return kept


def _verdicts(s: CanaryStatus) -> tuple[tuple[str, str, str], ...]:
    return tuple((check.name, check.kind, check.outcome) for check in s.last_checks)


_BEFORE_COMMIT = (SaveStableTemplate,)
_WRITES = (SetWeights, ScaleCanary, PromoteTemplate, RestorePrimary)


def _ordered(actions: Sequence[Action], *, changed: bool, consumed: bool) -> tuple[Action, ...]:
    """The commit protocol of the module docstring: what the status depends on, the status,
    the cluster writes, the records, and the control last. Order within each group is kept."""
    before = [a for a in actions if isinstance(a, _BEFORE_COMMIT)]
    writes = [a for a in actions if isinstance(a, _WRITES)]
    records = [a for a in actions if not isinstance(a, (*_BEFORE_COMMIT, *_WRITES))]
    commit: list[Action] = [CommitStatus()] if changed or before or writes else []
    control: list[Action] = [ClearControl()] if consumed else []
    return (*before, *commit, *writes, *records, *control)


def _dispatch(t: _Tick, s: CanaryStatus) -> CanaryStatus:
    control = t.obs.control
    if control in ("pause", "resume"):
        s = _pause(t, s, pause=control == "pause")
        control = None
    if s.phase in ANALYSING_PHASES:
        if not s.canary_revision:
            return s  # nothing to analyse: only the webhook starts an analysis, with a revision
        return _analysing(t, s, control)
    if s.phase in ("Promoting", "Finalising"):
        return _promoting(t, s, control)
    if s.phase == "Failed":
        return _failed(t, s, control)
    if control is not None:
        _ignore(t, control, f"no canary of {t.target} is in progress (phase {s.phase})")
    if s.phase == "Succeeded":
        _scaled_down(t)
    return s


def _scaled_down(t: _Tick) -> None:
    """An idle canary runs no pods: scale it down again if a tick was cut short before it was."""
    if t.obs.canary.exists and t.obs.canary.desired > 0:
        t.do(ScaleCanary(replicas=0))
        t.event(f"Scaling down {t.canary}", reason="ScaledDown")


def _analysing(t: _Tick, s: CanaryStatus, control: ControlAction | None) -> CanaryStatus:
    if control == "abort":
        t.consumed = True
        return _rollback(t, s, "manual abort")
    if control == "retry":
        _ignore(t, control, f"revision {s.canary_revision} is still being analysed")
    if s.failed_checks >= t.analysis.threshold:
        return _rollback(t, s, f"failed checks threshold reached {s.failed_checks}")
    signalled = [hook for hook, result in _gates(t, "rollback") if _passed(result)]
    if signalled:
        for hook in signalled:
            t.event(f"Rollback check {hook.name} passed", reason="Rollback", warning=True)
        return _rollback(t, s, "manual webhook invoked")
    if _drifted(t, s):
        return s

    if control == "promote" or (t.spec.skip_analysis and not s.paused):
        s, ready = _readiness(t, s)
        if not ready:
            return s  # a promote request stays until the canary is ready to be promoted
        if control == "promote":
            t.consumed = True
            why = (
                f"Promoting {t.target} on request ({ANNOTATION_ACTION}=promote): "
                "skipping the remaining analysis"
            )
            return _promote(t, replace(s, paused=False), why=why)
        return _promote(t, s, why=f"Skipping the analysis of {t.target}: skipAnalysis is set")

    if not _taken_up(s):
        if s.paused:
            return s
        if not t.obs.admitted:
            return _queued(t, s)
        s = _take_up(t, s)
    s, ready = _readiness(t, s)
    if not ready or s.paused:
        return s
    missing = _not_gathered(t, s)
    if missing:
        # What this step is judged on was not asked for at the start of the tick (the status moved
        # on within it: resumed, just taken up): judge it next tick rather than on absent results.
        if "pre-rollout" in missing:
            t.event(
                f"Running the pre-rollout checks of {t.target} at the next interval, "
                f"now that {t.canary} is ready",
                reason="Waiting",
            )
        return s
    if not _started(s):
        return _start(t, s)
    return _analyse(t, s)


def _not_gathered(t: _Tick, s: CanaryStatus) -> set[str]:
    wanted = needs(t.spec, s, now=t.now)
    missing = {str(kind) for kind in wanted.gates if kind not in t.asked.gates}
    if wanted.metrics and not t.asked.metrics:
        missing.add("metrics")
    return missing


def _queued(t: _Tick, s: CanaryStatus) -> CanaryStatus:
    if s.phase == "Waiting":
        return s  # already queued: the event was given when it queued
    count = (
        f"{t.obs.progressing} canaries progressing"
        if t.obs.progressing is not None
        else "the cap on canaries progressing at once is reached"
    )
    t.event(f"Halt {t.target} advancement waiting for a slot: {count}", reason="Queued")
    return t.to(s, "Waiting", condition=f"Waiting for a slot: {count}.")


def _take_up(t: _Tick, s: CanaryStatus) -> CanaryStatus:
    revision = s.canary_revision
    t.event(f"Starting canary analysis for {t.target} revision {revision}", reason="Started")
    t.notify("started", f"New revision {revision} of {t.target} detected, starting canary analysis")
    s = replace(s, analysed_revision=revision)
    if t.obs.primary.exists and t.obs.primary.revision:
        # What the primary runs is the last good revision, whatever an interrupted promotion
        # or an earlier release left recorded.
        s = replace(s, last_applied_revision=t.obs.primary.revision)
    return s if s.phase == "Progressing" else t.to(s, "Progressing")


def _readiness(t: _Tick, s: CanaryStatus) -> tuple[CanaryStatus, bool]:
    """Halts (False) while either Deployment is not ready; rolls back past the deadline."""
    now = timestamp(t.now)
    if t.obs.canary.exists and t.obs.canary.desired == 0:
        # A retry scales the canary back up after its commit; a tick cut short in between left
        # it at zero, where it would never become ready.
        t.do(ScaleCanary(replicas=None))
        t.event(f"Scaling up {t.canary} for the analysis", reason="ScaledUp")
    # The canary's revision too: right after the webhook replaced its template, a stale read can
    # still show the previous pods as rolled out.
    canary_ok = t.obs.canary.revision == s.canary_revision and _ready(
        t.obs.canary, t.analysis.canary_ready_threshold
    )
    primary_ok = _ready(t.obs.primary, t.analysis.primary_ready_threshold)
    s = replace(
        s,
        canary_unready_since="" if canary_ok else s.canary_unready_since or now,
        primary_unready_since="" if primary_ok else s.primary_unready_since or now,
    )
    deadline = t.spec.progress_deadline_seconds
    canary_detail = _unready(t.obs.canary, s.canary_revision)
    primary_detail = _unready(t.obs.primary)
    for ok, since, kind, who, detail in (
        (canary_ok, s.canary_unready_since, "canary", t.canary, canary_detail),
        (primary_ok, s.primary_unready_since, "primary", t.target, primary_detail),
    ):
        if not ok and _overdue(since, t.now, deadline):
            reason = (
                f"progress deadline exceeded: {kind} deployment {who} not ready after "
                f"{deadline}s: {detail}"
            )
            return _rollback(t, s, reason), False
    for ok, who, detail in (
        (canary_ok, t.canary, canary_detail),
        (primary_ok, t.target, primary_detail),
    ):
        if not ok:
            t.event(
                f"Halt advancement {who} waiting for rollout to finish: {detail}", reason="Waiting"
            )
            return s, False
    return s, True


def _start(t: _Tick, s: CanaryStatus) -> CanaryStatus:
    """The first step: one-shot gates, then the first weight (or iteration) with no metrics."""
    if t.analysis.webhooks_of("confirm-rollout") and "confirm-rollout" not in s.gates_done:
        s, confirm = _confirm(t, s, "confirm-rollout")
        if confirm.outcome == "abort":
            return _rollback(t, s, confirm.reason)
        if confirm.outcome == "waiting":
            waiting = confirm.waiting
            if s.phase != "Waiting":
                message = f"Halt {t.target} advancement waiting for approval {waiting[0].name}"
                t.event(message, reason="Waiting", warning=True)
                if not waiting[0].mute_alert:
                    t.notify("halted", message)
                s = t.to(s, "Waiting", condition=f"Waiting for approval {waiting[0].name}.")
            return s
        if confirm.outcome == "approved":
            for hook in t.analysis.webhooks_of("confirm-rollout"):
                t.event(f"Confirm-rollout check {hook.name} passed", reason="Confirmed")
        s = replace(s, gates_done=(*s.gates_done, "confirm-rollout"))
        if s.phase != "Progressing":
            s = t.to(s, "Progressing")

    if t.analysis.webhooks_of("pre-rollout") and "pre-rollout" not in s.gates_done:
        if "pre-rollout" not in t.asked.gates:
            # confirm-rollout was approved this tick, so the pre-rollout gates were not asked for
            # yet: they run at the next tick rather than count as failed.
            t.event(
                f"Running the pre-rollout checks of {t.target} at the next interval",
                reason="Waiting",
            )
            return s
        results = _gates(t, "pre-rollout")
        failures = [
            _Problem(f"pre-rollout check {hook.name} failed {_detail(result)}", hook.mute_alert)
            for hook, result in results
            if not _passed(result)
        ]
        if failures:
            return _failed_check(t, s, failures)
        for hook, _ in results:
            t.event(f"Pre-rollout check {hook.name} passed", reason="Checked")
        s = replace(s, gates_done=(*s.gates_done, "pre-rollout"))

    if t.analysis.strategy != "canary":
        return _iterate(t, s)
    s, go = _traffic_increase(t, s)
    if not go:
        return s
    return _set_weight(t, s, t.analysis.steps[0])


def _analyse(t: _Tick, s: CanaryStatus) -> CanaryStatus:
    """A step after the first: judge the interval, then advance, wait for approval or promote."""
    s = replace(s, last_checks=_last_checks(t))
    metrics = _judge_metrics(t)
    problems = [*metrics.problems, *_rollout_problems(t)]
    if problems:
        return _failed_check(t, s, problems)
    if metrics.unjudged:
        return _no_verdict(t, s, metrics.skipped)
    analysis = t.analysis
    if analysis.strategy == "canary":
        if s.canary_weight < analysis.max_weight:
            s, go = _traffic_increase(t, s)
            if not go:
                return s
            following = [w for w in analysis.steps if w > s.canary_weight]
            return _set_weight(t, s, following[0] if following else analysis.max_weight)
        return _confirm_then_promote(t, s)
    iterations = analysis.iterations or 0
    if s.iterations < iterations:
        return _iterate(t, s)
    if analysis.strategy == "blue-green" and s.iterations == iterations:
        s, go = _promotion_wait(t, s)
        if not go:
            return s
        # One more judged iteration with all the traffic before the primary is touched.
        t.do(SetWeights(primary=0, canary=TOTAL_WEIGHT))
        t.event(f"Routing all traffic to canary {t.canary}", reason="Advanced")
        s = replace(s, canary_weight=TOTAL_WEIGHT, iterations=s.iterations + 1)
        return s if s.phase == "Progressing" else t.to(s, "Progressing")
    return _confirm_then_promote(t, s)


def _set_weight(t: _Tick, s: CanaryStatus, weight: int) -> CanaryStatus:
    t.do(SetWeights(primary=TOTAL_WEIGHT - weight, canary=weight))
    t.event(f"Advance {t.target} canary weight {weight}", reason="Advanced")
    s = replace(s, canary_weight=weight)
    return s if s.phase == "Progressing" else t.to(s, "Progressing")


def _iterate(t: _Tick, s: CanaryStatus) -> CanaryStatus:
    done = s.iterations + 1
    if s.iterations == 0 and analysis_rules(t.spec, canary_weight=s.canary_weight):
        # The first iteration starts the analysis: the route takes what the strategy adds (A/B:
        # the match to the canary; blue/green: the mirror) at the same weights.
        t.do(SetWeights(primary=TOTAL_WEIGHT - s.canary_weight, canary=s.canary_weight))
        t.event(_routing_message(t), reason="Routing")
    t.event(
        f"Advance {t.target} canary iteration {done}/{t.analysis.iterations or 0}",
        reason="Advanced",
    )
    s = replace(s, iterations=done)
    return s if s.phase == "Progressing" else t.to(s, "Progressing")


def _traffic_increase(t: _Tick, s: CanaryStatus) -> tuple[CanaryStatus, bool]:
    """The status and whether the weight may increase (False: hold it, or rolled back).

    The wait is announced (event, notification) when it begins, as confirm-rollout's and
    confirm-promotion's are, not at every tick: a canary waiting for approval does nothing, and
    costs no API call, until the gate answers."""
    announced = s.confirm_type == "confirm-traffic-increase" and bool(s.confirm_asked_at)
    s, confirm = _confirm(t, s, "confirm-traffic-increase")
    if confirm.outcome == "abort":
        return _rollback(t, s, confirm.reason), False
    if confirm.outcome != "waiting":
        return s, True
    if announced:
        return s, False
    waiting = confirm.waiting
    message = f"Halt {t.target} advancement waiting for traffic increase approval {waiting[0].name}"
    t.event(message, reason="Waiting", warning=True)
    if not waiting[0].mute_alert:
        t.notify("halted", message)
    return s, False


def _promotion_wait(t: _Tick, s: CanaryStatus) -> tuple[CanaryStatus, bool]:
    """The status and whether to go on to the promotion (False: waiting, or rolled back)."""
    s, confirm = _confirm(t, s, "confirm-promotion")
    if confirm.outcome == "abort":
        return _rollback(t, s, confirm.reason), False
    if confirm.outcome == "approved":
        for hook in t.analysis.webhooks_of("confirm-promotion"):
            t.event(f"Confirm-promotion check {hook.name} passed", reason="Confirmed")
    if confirm.outcome != "waiting":
        return s, True
    if s.phase == "WaitingPromotion":
        return s, False
    waiting = confirm.waiting
    message = f"Halt {t.target} advancement waiting for promotion approval {waiting[0].name}"
    t.event(message, reason="Waiting", warning=True)
    if not waiting[0].mute_alert:
        t.notify("halted", message)
    waits = t.to(
        s, "WaitingPromotion", condition=f"Waiting for promotion approval {waiting[0].name}."
    )
    return waits, False


def _confirm_then_promote(t: _Tick, s: CanaryStatus) -> CanaryStatus:
    s, go = _promotion_wait(t, s)
    return _promote(t, s, why="") if go else s


@dataclass(frozen=True, slots=True)
class _Confirmation:
    """What the confirm gates of one type say this tick.

    ``approved``: every gate answered 2xx. ``waiting``: not (yet) approved, keep waiting.
    ``proceed``: every gate that has not approved ran out of its maxWait with onTimeout proceed.
    ``abort``: a gate ran out of its maxWait with onTimeout abort (``reason`` says which).
    """

    outcome: Literal["approved", "waiting", "proceed", "abort"]
    waiting: tuple[Webhook, ...] = ()
    reason: str = ""


def _confirm(t: _Tick, s: CanaryStatus, kind: WebhookType) -> tuple[CanaryStatus, _Confirmation]:
    """Judges the confirm gates of `kind` against their maxWait; records when the wait began.

    The wait begins at the first tick at which the gates were asked and did not all approve
    (status.confirm_asked_at, with confirm_type = `kind`); it ends (the fields are cleared) when
    they approve, and a wait for another confirm type starts afresh. After ``proceed`` the
    confirm-promotion wait is kept: blue-green asks confirm-promotion again before the copy, and
    that second ask must not wait another maxWait.
    """
    results = _gates(t, kind)
    if not results:
        return s, _Confirmation("approved")  # no gate of this type
    waiting = tuple(hook for hook, result in results if not _passed(result))
    if not waiting:
        return _confirm_cleared(s), _Confirmation("approved")
    if kind not in t.asked.gates:
        return s, _Confirmation("waiting", waiting)  # not asked this tick: nothing to count
    since = _parse(s.confirm_asked_at) if s.confirm_type == kind else None
    if since is None:
        asked_at = timestamp(t.now)
        s = replace(s, confirm_type=kind, confirm_asked_at=asked_at, confirm_timed_out=())
        since = _parse(asked_at) or t.now
    states = [
        confirm_state(
            first_asked_at=since,
            now=t.now,
            max_wait_seconds=hook.max_wait_seconds,
            on_timeout=hook.on_timeout,
        )
        for hook in waiting
    ]
    late = [hook for hook, state in zip(waiting, states, strict=True) if state == "abort"]
    if late:
        hook = late[0]
        return s, _Confirmation(
            "abort", waiting, f"{kind} gate {hook.name} not approved within {hook.max_wait}"
        )
    if all(state == "proceed" for state in states):
        for hook in waiting:
            t.event(
                f"Proceeding with {t.target}: {kind} gate {hook.name} not approved within "
                f"{hook.max_wait} (onTimeout: proceed)",
                reason="ApprovalTimeout",
                warning=True,
            )
        if kind != "confirm-promotion":
            s = _confirm_cleared(s)
        return s, _Confirmation("proceed", waiting)
    # Still waiting: a gate whose maxWait ran out (onTimeout wait, or proceed while another gate
    # still waits) is announced once.
    waited = (t.now - since).total_seconds()
    for hook in waiting:
        expired = hook.max_wait_seconds is not None and waited >= hook.max_wait_seconds
        if expired and hook.name not in s.confirm_timed_out:
            t.event(
                f"Halt {t.target} advancement: {kind} gate {hook.name} not approved within "
                f"{hook.max_wait} (onTimeout: {hook.on_timeout}), still waiting for approval",
                reason="ApprovalTimeout",
                warning=True,
            )
            s = replace(s, confirm_timed_out=(*s.confirm_timed_out, hook.name))
    return s, _Confirmation("waiting", waiting)


def _confirm_cleared(s: CanaryStatus) -> CanaryStatus:
    return replace(s, confirm_type="", confirm_asked_at="", confirm_timed_out=())


def _promote(t: _Tick, s: CanaryStatus, *, why: str) -> CanaryStatus:
    """The handshake's first half: save the last good template, commit Promoting with the handoff,
    then copy (the webhook admits the copy because the committed status names its revision)."""
    if why:
        t.event(why, reason="Promoting")
    t.event(f"Copying {t.canary} template spec to {t.target}", reason="Promoting")
    stable = t.obs.primary.revision or s.last_applied_revision
    t.do(SaveStableTemplate(revision=stable), PromoteTemplate(revision=s.canary_revision))
    s = replace(s, handoff_revision=s.canary_revision, last_applied_revision=stable)
    return t.to(_confirm_cleared(s), "Promoting")


@dataclass(frozen=True, slots=True)
class _Problem:
    """Why a check failed, and whether it came from a gate with muteAlert (an event, no alert)."""

    message: str
    muted: bool = False


def _failed_check(t: _Tick, s: CanaryStatus, problems: Sequence[_Problem]) -> CanaryStatus:
    s = replace(s, failed_checks=s.failed_checks + 1)
    for problem in problems:
        t.event(f"Halt {t.target} advancement {problem.message}", reason="Halted", warning=True)
    threshold = t.analysis.threshold
    if s.failed_checks >= threshold:
        # The rollback is announced whatever caused it: muteAlert mutes a gate's halts, not the
        # end of the release.
        return _rollback(t, s, f"failed checks threshold reached {s.failed_checks}")
    # Flagger's muteAlert: a gate's failures are events but not alerts. A halt that only muted
    # gates caused sends nothing; otherwise the alert names the unmuted problems.
    loud = [problem.message for problem in problems if not problem.muted]
    if loud:
        t.notify(
            "halted",
            f"Halt {t.target} advancement {'; '.join(loud)} "
            f"(failed checks {s.failed_checks}/{threshold})",
        )
    return s


def _no_verdict(t: _Tick, s: CanaryStatus, skipped: Sequence[Metric]) -> CanaryStatus:
    """Every metric had no data and says ``onNoData: skip``: nothing judged the interval, so the
    weight stays and no failed check is counted (no data is not evidence either way)."""
    names = ", ".join(metric.name for metric in skipped)
    message = (
        f"Halt {t.target} advancement no data for metric {names} (onNoData: skip): "
        "no metric could be judged this interval"
    )
    t.event(message, reason="Halted", warning=True)
    t.notify("halted", message)
    return s


def _rollback(t: _Tick, s: CanaryStatus, reason: str) -> CanaryStatus:
    """Analysis over, the canary failed: traffic back to the primary (if it can take it)."""
    t.event(f"Rolling back {t.target} {reason}", reason="RollingBack", warning=True)
    s = _confirm_cleared(replace(s, failed_revision=s.canary_revision, gates_done=()))
    condition = ""
    if s.canary_weight > 0 and not _serving(t.obs.primary):
        # Sending everything to a primary with no ready pods would turn a partial failure into an
        # outage; the Failed tick hands the traffic back once the primary is ready.
        t.event(
            f"Canary failed! {t.target} has no ready pods, so {t.canary} keeps serving "
            f"{s.canary_weight}% until it has",
            reason="Failed",
            warning=True,
        )
        condition = (
            f"Canary analysis failed; {t.canary} keeps serving {s.canary_weight}% until the "
            "primary is ready."
        )
    else:
        t.do(SetWeights(primary=TOTAL_WEIGHT, canary=0), ScaleCanary(replicas=0))
        t.event(f"Canary failed! Scaling down {t.canary}", reason="Failed", warning=True)
        s = replace(s, canary_weight=0)
    t.notify("failed", f"Rolling back {t.target} {reason}")
    t.do(CallGates(type="post-rollout", phase="Failed"))
    return t.to(s, "Failed", condition=condition)


# --------------------------------------------------------------------------------------------
# After the copy: Promoting, Finalising
# --------------------------------------------------------------------------------------------


def _promoting(t: _Tick, s: CanaryStatus, control: ControlAction | None) -> CanaryStatus:
    if control == "abort":
        t.consumed = True
        return _promotion_failed(t, s, "manual abort")
    if control is not None:
        _ignore(t, control, f"revision {s.canary_revision} of {t.target} is already {s.phase}")
    if _drifted(t, s):
        return s
    primary = t.obs.primary
    revision = s.canary_revision
    rolled_out = primary.revision == revision and _ready(
        primary, t.analysis.primary_ready_threshold
    )
    detail = _unready(primary, revision)
    deadline = t.spec.progress_deadline_seconds
    if s.phase == "Promoting":
        if not rolled_out:
            if _overdue(s.phase_entered_at, t.now, deadline):
                return _promotion_failed(
                    t, s, f"promotion failed: {t.target} not rolled out after {deadline}s: {detail}"
                )
            if primary.exists and primary.revision != revision:
                # The copy has not reached the primary (the tick that committed Promoting was cut
                # short, or its copy was refused): the committed handoff still admits it.
                t.do(PromoteTemplate(revision=revision))
                t.event(
                    f"Copying {t.canary} template spec to {t.target} again: {detail}",
                    reason="Promoting",
                )
                return s
            t.event(f"Waiting for {t.target} rollout to finish: {detail}", reason="Promoting")
            return s
        return s if s.paused else _route_back(t, s)

    s = replace(
        s, primary_unready_since="" if rolled_out else s.primary_unready_since or timestamp(t.now)
    )
    if not rolled_out:
        if _overdue(s.primary_unready_since, t.now, deadline):
            return _promotion_failed(
                t, s, f"promotion failed: {t.target} not ready after {deadline}s: {detail}"
            )
        t.event(
            f"Halt advancement {t.target} waiting for rollout to finish: {detail}", reason="Waiting"
        )
        return s
    if s.paused:
        return s
    return _route_back(t, s) if s.canary_weight > 0 else _succeed(t, s)


def _route_back(t: _Tick, s: CanaryStatus) -> CanaryStatus:
    by = t.analysis.step_weight_promotion
    weight = max(0, s.canary_weight - by) if by else 0
    t.do(SetWeights(primary=TOTAL_WEIGHT - weight, canary=weight))
    if by:
        t.event(f"Advance {t.target} primary weight {TOTAL_WEIGHT - weight}", reason="Finalising")
    else:
        t.event(f"Routing all traffic to primary {t.target}", reason="Finalising")
    s = replace(s, canary_weight=weight)
    return s if s.phase == "Finalising" else t.to(s, "Finalising")


def _succeed(t: _Tick, s: CanaryStatus) -> CanaryStatus:
    revision = s.canary_revision
    t.do(ScaleCanary(replicas=0))
    t.event(f"Promotion completed! Scaling down {t.canary}", reason="Succeeded")
    t.notify(
        "promoted",
        f"Canary analysis of {t.target} completed successfully, revision {revision} promoted",
    )
    t.do(CallGates(type="post-rollout", phase="Succeeded"))
    s = replace(s, last_applied_revision=revision, gates_done=(), handoff_revision="")
    return t.to(s, "Succeeded")


def _promotion_failed(t: _Tick, s: CanaryStatus, reason: str) -> CanaryStatus:
    """The copy has begun: put the last good template back, keep the canary serving its weight."""
    last = s.last_applied_revision
    t.event(f"Rolling back {t.target} {reason}", reason="RollingBack", warning=True)
    if last:
        t.do(RestorePrimary(revision=last))
    if s.canary_weight > 0:
        keeps = f"{t.canary} keeps serving {s.canary_weight}% until {t.target} is ready again"
        condition = (
            f"Promotion failed; {t.canary} keeps serving {s.canary_weight}% until the primary is "
            "restored."
        )
    else:
        # The canary has no traffic to keep: nothing is gained by keeping it up. An A/B match rule
        # goes with it, so the matching requests are not left on a canary scaled to zero.
        if _route_rules(t, s):
            t.do(SetWeights(primary=TOTAL_WEIGHT, canary=0))
        t.do(ScaleCanary(replicas=0))
        keeps = f"scaling down {t.canary}"
        condition = "Promotion failed; the primary is being restored."
    t.event(
        f"Canary failed! Restoring {t.target} to revision {last or 'unknown'}; {keeps}",
        reason="Failed",
        warning=True,
    )
    t.notify("failed", f"Rolling back {t.target} {reason}")
    t.do(CallGates(type="post-rollout", phase="Failed"))
    s = replace(s, failed_revision=s.canary_revision, gates_done=(), handoff_revision=last)
    return t.to(s, "Failed", condition=condition)


# --------------------------------------------------------------------------------------------
# Failed, controls
# --------------------------------------------------------------------------------------------


def _failed(t: _Tick, s: CanaryStatus, control: ControlAction | None) -> CanaryStatus:
    if control == "retry" and s.canary_weight == 0 and s.canary_revision:
        t.consumed = True
        return _retry(t, s)
    if control is not None:
        why = (
            f"{t.canary} still serves {s.canary_weight}% until {t.target} is ready again"
            if s.canary_weight > 0
            else f"the canary of {t.target} failed; {ANNOTATION_ACTION}=retry analyses "
            f"revision {s.canary_revision} again"
        )
        _ignore(t, control, why)
    primary = t.obs.primary
    handoff = s.handoff_revision
    if s.canary_weight == 0 and t.obs.route_analysing:
        # A failed canary at weight 0 runs no pods: a route that still sends requests to it (an
        # A/B match rule left by a tick cut short) is put back to the plain split first.
        _drifted(t, s)
    if handoff and primary.exists and primary.revision != handoff:
        # The restore of a failed promotion has not reached the primary yet: issue it again.
        t.do(RestorePrimary(revision=handoff))
        t.event(
            f"Restoring {t.target} to revision {handoff} again: {_unready(primary, handoff)}",
            reason="Failed",
            warning=True,
        )
        return s
    if s.canary_weight == 0:
        _scaled_down(t)
        return s
    if _drifted(t, s):
        return s
    last = s.last_applied_revision
    on_last = not last or primary.revision == last
    if on_last and _ready(primary, t.analysis.primary_ready_threshold):
        t.do(SetWeights(primary=TOTAL_WEIGHT, canary=0), ScaleCanary(replicas=0))
        t.event(
            f"Routing all traffic back to {t.target} and scaling down {t.canary}", reason="Failed"
        )
        return replace(s, canary_weight=0)
    detail = _unready(primary, last or None)
    t.event(
        f"Waiting for {t.target} to be ready on revision {last or 'unknown'} before routing "
        f"traffic back from {t.canary}: {detail}",
        reason="Failed",
        warning=True,
    )
    return s


def _retry(t: _Tick, s: CanaryStatus) -> CanaryStatus:
    revision = s.canary_revision
    t.do(ScaleCanary(replicas=None))
    t.event(
        f"Retrying {t.target} revision {revision} on request ({ANNOTATION_ACTION}=retry): "
        "the analysis starts over at weight 0",
        reason="Retrying",
    )
    s = replace(
        s,
        canary_weight=0,
        failed_checks=0,
        iterations=0,
        gates_done=(),
        failed_revision="" if s.failed_revision == revision else s.failed_revision,
        # Taken up again like a new revision: it queues for a slot if the cap is reached.
        analysed_revision="",
        canary_unready_since="",
        primary_unready_since="",
        confirm_type="",
        confirm_asked_at="",
        confirm_timed_out=(),
        handoff_revision="",
        last_checks=(),
    )
    return t.to(s, "Progressing")


def _pause(t: _Tick, s: CanaryStatus, *, pause: bool) -> CanaryStatus:
    t.consumed = True
    word = "pause" if pause else "resume"
    if s.paused == pause:
        _ignore(t, word, f"{t.target} is already {'paused' if pause else 'not paused'}")
        return s
    if pause:
        t.event(
            f"Paused {t.target} on request ({ANNOTATION_ACTION}=pause): no progress until "
            f"{ANNOTATION_ACTION}=resume",
            reason="Paused",
        )
    else:
        t.event(f"Resumed {t.target} on request ({ANNOTATION_ACTION}=resume)", reason="Resumed")
    return replace(s, paused=pause)


def _ignore(t: _Tick, control: str, why: str) -> None:
    t.consumed = True
    t.event(
        f"Ignoring {ANNOTATION_ACTION}={control} on {t.target}: {why}",
        reason="ControlIgnored",
        warning=True,
    )


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _normalised(s: CanaryStatus) -> CanaryStatus:
    """Drops progress fields that belong to another revision than the one under analysis.

    The webhook resets them when a new revision arrives (perch.status.analysis_started); this makes
    step() independent of that: a status whose revision was changed by anything else cannot carry
    gates_done or counters of the previous revision into the new analysis.
    """
    if s.phase not in ANALYSING_PHASES or _taken_up(s):
        return s
    return replace(
        s,
        canary_weight=0,
        failed_checks=0,
        iterations=0,
        gates_done=(),
        canary_unready_since="",
        primary_unready_since="",
        confirm_type="",
        confirm_asked_at="",
        confirm_timed_out=(),
        last_checks=(),
    )


def _taken_up(s: CanaryStatus) -> bool:
    return s.analysed_revision == s.canary_revision


def _started(s: CanaryStatus) -> bool:
    """The first step has been taken (Flagger's test: weight 0 and no iteration means not)."""
    return s.canary_weight > 0 or s.iterations > 0


def route_revision(status: CanaryStatus) -> str:
    """The revision whose analysis the route serves, "" when none: the route then carries what
    the strategy adds (the A/B match, the mirror, the session cookies) from the first step (or
    iteration) of an analysis until its traffic goes back to the primary (Finalising) or it
    fails; before the first step (queued, waiting for confirm-rollout or readiness) and after,
    the route is the plain weighted split."""
    analysed = status.phase in ANALYSING_PHASES or status.phase == "Promoting"
    if analysed and _taken_up(status) and _started(status):
        return status.canary_revision
    return ""


def _route_rules(t: _Tick, s: CanaryStatus) -> bool:
    """Whether the route for status `s` carries more than the weighted split."""
    return bool(route_revision(s)) and analysis_rules(t.spec, canary_weight=s.canary_weight)


def _routing_message(t: _Tick) -> str:
    analysis = t.analysis
    if analysis.strategy == "ab-testing":
        return f"Routing requests of {t.target} that match analysis.match to {t.canary}"
    if analysis.strategy == "blue-green":
        share = analysis.mirror_weight if analysis.mirror_weight is not None else 100
        return f"Mirroring {share}% of the requests of {t.target} to {t.canary}"
    return f"Keeping the users of {t.target} on the side they were routed to (session affinity)"


def _drifted(t: _Tick, s: CanaryStatus) -> bool:
    """Re-issues the status weight (and the route's shape) when the route says otherwise, and
    tells the caller to stop."""
    want = (TOTAL_WEIGHT - s.canary_weight, s.canary_weight)
    got = t.obs.route_weights
    rules = _route_rules(t, s)
    if got == want and t.obs.route_analysing == rules:
        return False
    t.do(SetWeights(primary=want[0], canary=want[1]))
    if got is None:
        message = (
            f"Route of {t.target} not found; re-creating it at canary weight {s.canary_weight}"
        )
    elif got != want:
        message = (
            f"Route of {t.target} has weights {got[0]}/{got[1]} but the status records "
            f"{want[0]}/{want[1]}; restoring {want[0]}/{want[1]} before going on"
        )
    elif rules:
        message = (
            f"Route of {t.target} lacks what the analysis adds to it; restoring it: "
            f"{_routing_message(t)}"
        )
    else:
        message = (
            f"Route of {t.target} still carries what the analysis added to it; restoring the "
            f"plain split {want[0]}/{want[1]}"
        )
    t.event(message, reason="RouteRestored", warning=True)
    return True


def _ready(workload: Workload, threshold: int) -> bool:
    """Ready pods, and rolled out (or, below a 100 % ready threshold, enough updated replicas)."""
    if not workload.exists or not workload.has_ready_pods:
        return False
    if workload.rolled_out:
        return True
    return (
        threshold < 100
        and workload.updated >= workload.desired
        and workload.ready * 100 >= threshold * workload.desired
    )


def _serving(workload: Workload) -> bool:
    return workload.exists and workload.has_ready_pods


def _unready(workload: Workload, revision: str | None = None) -> str:
    """Why a Deployment is not ready (on `revision`, when given), in Flagger's words."""
    if not workload.exists:
        return "the Deployment does not exist"
    if revision is not None and workload.revision != revision:
        return f"it runs revision {workload.revision or 'unknown'}, not yet {revision}"
    if workload.updated < workload.desired:
        return f"{workload.updated} out of {workload.desired} new replicas have been updated"
    if workload.ready < workload.desired:
        return f"{workload.ready} of {workload.desired} updated replicas are available"
    return "the rollout has not finished"


def _overdue(since: str, now: datetime, seconds: int) -> bool:
    start = _parse(since)
    return start is not None and (now - start).total_seconds() > seconds


def _parse(text: str) -> datetime | None:
    try:
        at = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def _gates(t: _Tick, kind: WebhookType) -> list[tuple[Webhook, GateResult | None]]:
    """Each gate of the spec of this type with its result; None when it was not asked for."""
    if kind not in t.asked.gates:
        return [(hook, None) for hook in t.analysis.webhooks_of(kind)]
    pairs: list[tuple[Webhook, GateResult | None]] = []
    for hook in t.analysis.webhooks_of(kind):
        found = next((g for g in t.obs.gates if g.type == kind and g.name == hook.name), None)
        pairs.append((hook, found or GateResult(hook.name, kind, "error", "no answer recorded")))
    return pairs


def _passed(result: GateResult | None) -> bool:
    return result is not None and result.outcome == "pass"


def _detail(result: GateResult | None) -> str:
    if result is None:
        return "(not called)"
    return result.message or result.outcome


@dataclass(frozen=True, slots=True)
class _MetricVerdict:
    """The interval's metrics: why they failed, and those left unjudged (``onNoData: skip``).

    ``unjudged``: the spec has metrics and every one of them was skipped, so nothing judged the
    interval.
    """

    problems: tuple[_Problem, ...]
    skipped: tuple[Metric, ...]
    unjudged: bool


def _judge_metrics(t: _Tick) -> _MetricVerdict:
    by_name = {result.name: result for result in t.obs.metrics}
    problems: list[_Problem] = []
    skipped: list[Metric] = []
    for metric in t.analysis.metrics:
        result = by_name.get(metric.name)
        if result is not None and result.outcome == "no-data" and metric.on_no_data != "fail":
            # A metric that may legitimately go quiet: its silence passes it, or leaves it out.
            if metric.on_no_data == "skip":
                skipped.append(metric)
            continue
        problem = _metric_problem(metric, result)
        if problem is not None:
            problems.append(_Problem(problem))
    metrics = t.analysis.metrics
    return _MetricVerdict(
        problems=tuple(problems),
        skipped=tuple(skipped),
        unjudged=bool(metrics) and len(skipped) == len(metrics),
    )


def _metric_problem(metric: Metric, result: MetricResult | None) -> str | None:
    """The halt message for a metric that did not pass; None when it passed.

    No data reads "no data for metric …", never a number. An error's message is kept when it is
    a sentence of its own (a failed Prometheus query; a MetricTemplate that is missing, cannot be
    rendered or whose Secret cannot be read, which name the metric), and otherwise says which
    metric it belongs to.
    """
    if result is None:
        # The shell was asked for it and has nothing: never read that as a pass.
        return f"no result for metric {metric.name}: it was not measured"
    message = result.message
    if result.outcome == "pass":
        return None
    if result.outcome == "fail":
        return message or f"{metric.name} {result.value} outside its threshold"
    if result.outcome == "no-data":
        if message.startswith("no data"):
            return message
        return f"no data for metric {metric.name}" + (f": {message}" if message else "")
    if message.startswith("Prometheus query failed") or message.startswith(
        f"metric {metric.name}:"
    ):
        return message
    return f"Prometheus query failed for metric {metric.name}: {message or 'unknown error'}"


def _last_checks(t: _Tick) -> tuple[LastCheck, ...]:
    """What this interval's checks found, in the spec's order, for the status (people read it:
    kubectl perch status); no decision depends on it."""
    by_name = {result.name: result for result in t.obs.metrics}
    checks: list[LastCheck] = []
    for metric in t.analysis.metrics:
        result = by_name.get(metric.name)
        bounds = metric.threshold_range
        checks.append(
            LastCheck(
                name=metric.name,
                outcome=result.outcome if result is not None else "error",
                value=result.value if result is not None else None,
                min=bounds.min,
                max=bounds.max,
                message=result.message if result is not None else "not measured",
            )
        )
    for hook, gate in _gates(t, "rollout"):
        checks.append(
            LastCheck(
                name=hook.name,
                kind="gate",
                outcome=gate.outcome if gate is not None else "error",
                message=_detail(gate) if gate is not None and not _passed(gate) else "",
            )
        )
    return tuple(checks)


def _rollout_problems(t: _Tick) -> list[_Problem]:
    return [
        _Problem(f"external check {hook.name} failed {_detail(result)}", hook.mute_alert)
        for hook, result in _gates(t, "rollout")
        if not _passed(result)
    ]


def _stamped(before: CanaryStatus, after: CanaryStatus, t: _Tick) -> CanaryStatus:
    """Times and the Promoted condition follow what changed (status writes are conditional, so a
    timestamp is as repeatable as the rest: it comes from obs.now)."""
    if t.moved or after.phase != before.phase:
        return entered(after, after.phase, at=t.now, message=t.condition)
    if _progress(after) != _progress(before):
        return replace(after, last_transition_time=timestamp(t.now))
    return after


def _progress(s: CanaryStatus) -> tuple[int, int, int, bool]:
    return (s.canary_weight, s.failed_checks, s.iterations, s.paused)
