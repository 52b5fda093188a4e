"""The analyzer's state machine, driven tick by tick as the shell drives it.

`World` plays the shell and the cluster: each tick it asks needs(), gathers what was asked for,
calls step(), checks that the call is pure and that the status survives the wire (a restarted
analyzer reads it back from the API), performs the actions on its model of the cluster and feeds
the returned status into the next tick.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import pytest

from analyzer.model import (
    Action,
    CallGates,
    ClearControl,
    CommitStatus,
    ControlAction,
    Event,
    GateOutcome,
    GateResult,
    MetricResult,
    Needs,
    Notify,
    Observations,
    PromoteTemplate,
    RestorePrimary,
    SaveStableTemplate,
    ScaleCanary,
    SetWeights,
    Workload,
)
from analyzer.step import needs, route_revision, step
from perch.routers.base import analysis_rules
from perch.spec import CanarySpec, parse_spec
from perch.status import CanaryStatus, analysis_started, initialized, timestamp
from tests.seed import SEED_SPEC_EARLY

T0 = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)
STABLE = "v1-stable0000"
REV = "v1-canary1111"
NEWER = "v1-newer22222"
SEED = parse_spec(SEED_SPEC_EARLY)

PASSING = {
    "request-success-rate": MetricResult(
        "request-success-rate", "pass", 99.9, "success rate 99.90%"
    ),
    "request-duration": MetricResult("request-duration", "pass", 120.0, "request duration 120ms"),
}
LOW_SUCCESS = MetricResult("request-success-rate", "fail", 61.39, "success rate 61.39% < 99%")
SLOW = MetricResult("request-duration", "fail", 1515.0, "request duration 1.515s > 500ms")
CLUSTER_WRITES = (SetWeights, ScaleCanary, PromoteTemplate, RestorePrimary)


def ready(revision: str, replicas: int = 2) -> Workload:
    return Workload(
        desired=replicas, ready=replicas, updated=replicas, rolled_out=True, revision=revision
    )


def starting(revision: str, *, available: int = 0, replicas: int = 2) -> Workload:
    return Workload(
        desired=replicas, ready=available, updated=replicas, rolled_out=False, revision=revision
    )


def spec(top: dict[str, Any] | None = None, **analysis: Any) -> CanarySpec:
    """A small spec (10 % steps to 30 %, threshold 3); keyword None removes a default."""
    fields: dict[str, Any] = {
        "interval": "30s",
        "threshold": 3,
        "maxWeight": 30,
        "stepWeight": 10,
        "metrics": [
            {"name": "request-success-rate", "thresholdRange": {"min": 99}, "interval": "30s"}
        ],
    }
    fields.update(analysis)
    document = {
        "service": {"port": 9898},
        "analysis": {k: v for k, v in fields.items() if v is not None},
        **(top or {}),
    }
    return parse_spec(json.dumps(document))


def hook(name: str, type_: str, **more: Any) -> dict[str, Any]:
    return {"name": name, "type": type_, "url": f"http://gates.test/{name}", **more}


def started(at: datetime = T0, revision: str = REV) -> CanaryStatus:
    """What the webhook writes when it holds `revision` back for analysis."""
    return analysis_started(initialized(revision=STABLE, at=at), revision=revision, at=at)


def analysing(weight: int, **fields: Any) -> CanaryStatus:
    """A status the analyzer has taken up and advanced to `weight`."""
    base = replace(started(), canary_weight=weight, analysed_revision=REV)
    return replace(base, **fields)


@dataclass
class World:
    spec: CanarySpec
    status: CanaryStatus
    now: datetime = T0
    canary: Workload = field(default_factory=lambda: ready(REV))
    primary: Workload = field(default_factory=lambda: ready(STABLE))
    # The route's (primary, canary) weights; by default what the status records.
    route: tuple[int, int] | Literal["status"] | None = "status"
    # Whether the route carries more than the weighted split (A/B match, mirror, cookies); by
    # default what the status calls for.
    route_rules: bool | None = None
    control: ControlAction | None = None
    admitted: bool = True
    progressing: int | None = None
    metrics: dict[str, MetricResult] = field(default_factory=lambda: dict(PASSING))
    # Gate answers by name; unnamed gates pass, except rollback gates, whose 2xx means "roll back".
    answers: dict[str, GateOutcome] = field(default_factory=dict)
    # After PromoteTemplate, does the primary roll out the new template?
    primary_rolls_out: bool = True
    called: list[tuple[str, str]] = field(default_factory=list)
    asked: Needs = field(default_factory=Needs)
    performed: list[Action] = field(default_factory=list)
    ticks: int = 0

    def __post_init__(self) -> None:
        if self.route == "status":
            self.route = (100 - self.status.canary_weight, self.status.canary_weight)
        if self.route_rules is None:
            self.route_rules = self._rules(self.status.canary_weight)

    @property
    def interval(self) -> timedelta:
        return timedelta(seconds=self.spec.analysis.interval_seconds)

    def observe(self) -> Observations:
        self.asked = needs(self.spec, self.status, now=self.now)
        gates: list[GateResult] = []
        for kind in self.asked.gates:
            for gate in self.spec.analysis.webhooks_of(kind):
                self.called.append((kind, gate.name))
                default: GateOutcome = "fail" if kind == "rollback" else "pass"
                outcome = self.answers.get(gate.name, default)
                message = "" if outcome == "pass" else "HTTP 500 Internal Server Error"
                gates.append(GateResult(gate.name, kind, outcome, message))
        measured = tuple(
            self.metrics[m.name]
            for m in self.spec.analysis.metrics
            if self.asked.metrics and m.name in self.metrics
        )
        return Observations(
            now=self.now,
            canary=self.canary,
            primary=self.primary,
            route_weights=None if self.route == "status" else self.route,
            route_analysing=bool(self.route_rules) and self.route is not None,
            metrics=measured,
            gates=tuple(gates),
            control=self.control,
            admitted=self.admitted,
            progressing=self.progressing,
        )

    def tick(self, *, crash_after: type[Any] | None = None) -> tuple[Action, ...]:
        """One tick as the shell runs it: the actions in order, the status written at
        CommitStatus. ``crash_after``: the shell dies right after performing the first action of
        that type (the rest of the tick, the status write included if it comes later, is lost)."""
        self.ticks += 1
        assert self.ticks <= 60, f"no end in sight: {self.status}"  # bounds the `while` loops
        obs = self.observe()
        new, actions = step(self.spec, self.status, obs, name="podinfo", namespace="test")
        # Pure: the same inputs give the same answer, so a repeated tick decides the same.
        assert step(self.spec, self.status, obs, name="podinfo", namespace="test") == (
            new,
            actions,
        )
        # Everything needed to continue is in the status as the API stores it.
        assert CanaryStatus.from_wire(new.to_wire()) == new
        # The protocol: nothing is written to the cluster before the status is committed.
        commit = actions.index(CommitStatus()) if CommitStatus() in actions else len(actions)
        assert not [a for a in actions[:commit] if isinstance(a, CLUSTER_WRITES)], actions
        if new != self.status:
            assert CommitStatus() in actions, "a changed status is never left unwritten"
        for action in actions:
            if isinstance(action, CommitStatus):
                self.status = CanaryStatus.from_wire(new.to_wire())
            self.perform(action)
            if crash_after is not None and isinstance(action, crash_after):
                break
        self.now += self.interval
        return actions

    def _rules(self, weight: int) -> bool:
        return bool(route_revision(self.status)) and analysis_rules(self.spec, canary_weight=weight)

    def perform(self, action: Action) -> None:
        self.performed.append(action)
        match action:
            case SetWeights():
                self.route = (action.primary, action.canary)
                # The shell shapes the route after the status just committed (analyzer.act).
                self.route_rules = self._rules(action.canary)
            case PromoteTemplate():
                self.primary = (
                    ready(action.revision)
                    if self.primary_rolls_out
                    else starting(action.revision, available=1)
                )
            case RestorePrimary():
                self.primary = ready(action.revision)
            case ScaleCanary():
                self.canary = (
                    ready(REV) if action.replicas is None else Workload(desired=0, revision=REV)
                )
            case ClearControl():
                self.control = None


def events(actions: tuple[Action, ...]) -> list[str]:
    return [a.message for a in actions if isinstance(a, Event)]


def warnings(actions: tuple[Action, ...]) -> list[str]:
    return [a.message for a in actions if isinstance(a, Event) and a.type == "Warning"]


def of(kind: type[Any], actions: tuple[Action, ...]) -> list[Any]:
    return [a for a in actions if isinstance(a, kind)]


def notified(actions: tuple[Action, ...]) -> list[str]:
    return [a.kind for a in actions if isinstance(a, Notify)]


# --------------------------------------------------------------------------------------------
# The seed example
# --------------------------------------------------------------------------------------------


def test_seed_healthy_advances_5_to_50_in_ten_ticks_then_promotes() -> None:
    world = World(SEED, started())
    trace: list[tuple[str, int]] = []
    first = world.now
    copied_at = None
    for _ in range(20):
        actions = world.tick()
        trace.append((world.status.phase, world.status.canary_weight))
        if of(PromoteTemplate, actions):
            copied_at = world.now - world.interval
        if world.status.phase == "Succeeded":
            break
    weights = [("Progressing", w) for w in range(5, 55, 5)]
    assert trace == [*weights, ("Promoting", 50), ("Finalising", 0), ("Succeeded", 0)]
    # Minimum time to promote: the first tick takes the first step, the copy starts 10 intervals
    # later (interval x maxWeight / stepWeight).
    assert copied_at is not None and copied_at - first == timedelta(seconds=300)
    assert world.status.last_applied_revision == REV
    assert world.status.failed_checks == 0
    assert world.route == (100, 0)


def test_seed_events_and_actions_tick_by_tick() -> None:
    world = World(SEED, started())
    first = world.tick()
    assert world.asked == Needs()  # weight 0: no traffic yet, no metrics, no load test
    assert events(first) == [
        f"Starting canary analysis for podinfo.test revision {REV}",
        "Advance podinfo.test canary weight 5",
    ]
    assert of(SetWeights, first) == [SetWeights(95, 5)]
    assert notified(first) == ["started"]

    second = world.tick()
    assert world.asked == Needs(metrics=True, gates=("rollout",))
    assert ("rollout", "load-test") in world.called
    assert second == (
        CommitStatus(),
        SetWeights(90, 10),
        Event("Advanced", "Advance podinfo.test canary weight 10"),
    )
    for _ in range(8):
        world.tick()
    assert world.status.canary_weight == 50

    promote = world.tick()
    assert world.status.phase == "Promoting"
    # The handshake: the last good template saved, Promoting committed with the handoff, then the
    # copy (which the webhook admits because the committed status names its revision).
    assert promote == (
        SaveStableTemplate(STABLE),
        CommitStatus(),
        PromoteTemplate(REV),
        Event("Promoting", "Copying podinfo-canary.test template spec to podinfo.test"),
    )
    assert world.status.handoff_revision == REV
    finalise = world.tick()
    assert world.status.phase == "Finalising"
    assert of(SetWeights, finalise) == [SetWeights(100, 0)]
    done = world.tick()
    assert world.status.phase == "Succeeded"
    assert world.status.handoff_revision == ""
    assert done == (
        CommitStatus(),
        ScaleCanary(0),
        Event("Succeeded", "Promotion completed! Scaling down podinfo-canary.test"),
        Notify(
            "promoted",
            f"Canary analysis of podinfo.test completed successfully, revision {REV} promoted",
        ),
        CallGates("post-rollout", "Succeeded"),
    )
    # Succeeded is idle.
    before = world.status
    assert world.tick() == ()
    assert world.status == before


@pytest.mark.parametrize(
    ("failing", "halt"),
    [
        (LOW_SUCCESS, "Halt podinfo.test advancement success rate 61.39% < 99%"),
        (SLOW, "Halt podinfo.test advancement request duration 1.515s > 500ms"),
    ],
)
def test_seed_failing_halts_ten_times_then_rolls_back(failing: MetricResult, halt: str) -> None:
    world = World(SEED, started())
    world.metrics[failing.name] = failing
    world.tick()
    assert world.status.canary_weight == 5
    for n in range(1, 10):
        actions = world.tick()
        assert (world.status.phase, world.status.canary_weight) == ("Progressing", 5)
        assert world.status.failed_checks == n
        assert warnings(actions) == [halt]
        assert notified(actions) == ["halted"]
        assert not of(SetWeights, actions)
    last = world.tick()
    assert warnings(last) == [
        halt,
        "Rolling back podinfo.test failed checks threshold reached 10",
        "Canary failed! Scaling down podinfo-canary.test",
    ]
    assert of(SetWeights, last) == [SetWeights(100, 0)]
    assert of(ScaleCanary, last) == [ScaleCanary(0)]
    assert of(CallGates, last) == [CallGates("post-rollout", "Failed")]
    assert notified(last) == ["failed"]
    assert (world.status.phase, world.status.canary_weight) == ("Failed", 0)
    assert world.status.failed_checks == 10
    assert world.status.failed_revision == REV
    # Failed is idle.
    before = world.status
    assert world.tick() == ()
    assert world.status == before


# --------------------------------------------------------------------------------------------
# Metrics and gates while progressing
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("result", "halt"),
    [
        (
            MetricResult("request-success-rate", "no-data", None, ""),
            "no data for metric request-success-rate",
        ),
        (
            MetricResult(
                "request-success-rate",
                "no-data",
                None,
                "no data for metric request-success-rate",
            ),
            "no data for metric request-success-rate",
        ),
        (
            MetricResult("request-success-rate", "error", None, "timeout"),
            "Prometheus query failed for metric request-success-rate: timeout",
        ),
        (
            MetricResult(
                "request-success-rate", "error", None, "Prometheus query failed: connection refused"
            ),
            "Prometheus query failed: connection refused",
        ),
        (None, "no result for metric request-success-rate: it was not measured"),
    ],
)
def test_missing_or_unreadable_metrics_halt_and_never_promote(
    result: MetricResult | None, halt: str
) -> None:
    world = World(spec(), analysing(10))
    if result is None:
        del world.metrics["request-success-rate"]
    else:
        world.metrics["request-success-rate"] = result
    phases = []
    for _ in range(3):
        actions = world.tick()
        phases.append(world.status.phase)
        assert f"Halt podinfo.test advancement {halt}" in warnings(actions)
    assert phases == ["Progressing", "Progressing", "Failed"]
    assert not any(isinstance(a, PromoteTemplate) for a in world.performed)
    assert [a for a in world.performed if isinstance(a, SetWeights)] == [SetWeights(100, 0)]


def test_a_failed_rollout_gate_is_a_failed_check() -> None:
    world = World(
        spec(webhooks=[hook("load-test", "rollout")]), analysing(10), answers={"load-test": "fail"}
    )
    actions = world.tick()
    assert warnings(actions) == [
        "Halt podinfo.test advancement external check load-test failed "
        "HTTP 500 Internal Server Error"
    ]
    assert (world.status.canary_weight, world.status.failed_checks) == (10, 1)
    world.answers.clear()
    world.tick()
    assert (world.status.canary_weight, world.status.failed_checks) == (20, 1)


def test_confirm_traffic_increase_holds_the_weight_without_a_failed_check() -> None:
    gates = [hook("more", "confirm-traffic-increase"), hook("quiet", "confirm-traffic-increase")]
    world = World(spec(webhooks=gates), analysing(10), answers={"more": "fail"})
    for tick in range(3):
        actions = world.tick()
        assert "confirm-traffic-increase" in world.asked.gates
        assert (world.status.canary_weight, world.status.failed_checks) == (10, 0)
        assert not of(SetWeights, actions)
        if tick == 0:
            # The wait is announced when it begins, as the other confirm gates' are...
            assert warnings(actions) == [
                "Halt podinfo.test advancement waiting for traffic increase approval more"
            ]
            assert notified(actions) == ["halted"]
        else:
            # ...and then the canary waits without a write, an event or an alert: the gate is
            # asked each interval, the metrics judged, and nothing else happens.
            assert actions == ()
    # A muted gate still halts, without a notification.
    muted = World(
        spec(webhooks=[hook("quiet", "confirm-traffic-increase", muteAlert=True)]),
        analysing(10),
        answers={"quiet": "timeout"},
    )
    actions = muted.tick()
    assert warnings(actions) and notified(actions) == []
    world.answers.clear()
    world.tick()
    assert world.status.canary_weight == 20


def test_confirm_promotion_waits_at_max_weight_and_keeps_judging_metrics() -> None:
    world = World(
        spec(webhooks=[hook("ship-it", "confirm-promotion")]),
        analysing(30),
        answers={"ship-it": "fail"},
    )
    first = world.tick()
    assert (world.status.phase, world.status.canary_weight) == ("WaitingPromotion", 30)
    assert warnings(first) == [
        "Halt podinfo.test advancement waiting for promotion approval ship-it"
    ]
    assert notified(first) == ["halted"]
    # Waiting: no event per tick, but metrics are still asked for and judged.
    assert world.tick() == ()
    assert world.asked.metrics and "confirm-promotion" in world.asked.gates
    world.metrics["request-success-rate"] = LOW_SUCCESS
    world.tick()
    assert (world.status.phase, world.status.failed_checks) == ("WaitingPromotion", 1)
    world.metrics = dict(PASSING)
    world.answers.clear()
    actions = world.tick()
    assert world.status.phase == "Promoting"
    assert "Confirm-promotion check ship-it passed" in events(actions)
    assert of(PromoteTemplate, actions) == [PromoteTemplate(REV)]


def test_waiting_for_approval_new_measurements_alone_write_nothing() -> None:
    """A canary waiting for promotion approval is judged every interval, and live metrics never
    measure the same twice: new values of checks that still pass are no reason to write the
    status (they are recorded with the next change), a check whose outcome changed is."""
    world = World(
        spec(
            webhooks=[hook("ship-it", "confirm-promotion")],
            metrics=[
                {"name": "request-success-rate", "thresholdRange": {"min": 99}},
                {"name": "request-duration", "thresholdRange": {"max": 500}, "onNoData": "pass"},
            ],
        ),
        analysing(30),
        answers={"ship-it": "fail"},
    )
    world.tick()
    assert world.status.phase == "WaitingPromotion"
    recorded = world.status.last_checks
    assert [check.value for check in recorded] == [99.9, 120.0]
    for rate, duration in ((99.5, 131.0), (99.97, 87.5), (100.0, 240.0)):
        world.metrics = {
            "request-success-rate": MetricResult(
                "request-success-rate", "pass", rate, f"success rate {rate:.2f}%"
            ),
            "request-duration": MetricResult(
                "request-duration", "pass", duration, f"request duration {duration:g}ms"
            ),
        }
        assert world.tick() == ()  # no CommitStatus: nothing to write
        assert world.status.last_checks == recorded
    # The duration goes quiet (onNoData: pass): still passing, but an outcome changed.
    world.metrics["request-duration"] = MetricResult("request-duration", "no-data", None, "")
    actions = world.tick()
    assert actions == (CommitStatus(),)
    assert [c.outcome for c in world.status.last_checks] == ["pass", "no-data"]
    assert world.status.last_checks[0].value == 100.0  # the values of that interval


@pytest.mark.parametrize(
    ("answer", "rolled_back"), [("pass", True), ("fail", False), ("timeout", False)]
)
def test_a_rollback_gate_answering_2xx_rolls_back(answer: GateOutcome, rolled_back: bool) -> None:
    world = World(
        spec(webhooks=[hook("kill-switch", "rollback")]),
        analysing(20),
        answers={"kill-switch": answer},
    )
    world.route = (80, 20)
    actions = world.tick()
    assert "rollback" in world.asked.gates
    if rolled_back:
        assert world.status.phase == "Failed"
        assert "Rolling back podinfo.test manual webhook invoked" in warnings(actions)
        assert of(SetWeights, actions) == [SetWeights(100, 0)]
    else:
        assert (world.status.phase, world.status.canary_weight) == ("Progressing", 30)


# --------------------------------------------------------------------------------------------
# The first step: readiness, confirm-rollout, pre-rollout
# --------------------------------------------------------------------------------------------


def test_confirm_rollout_waits_without_failed_checks_and_is_not_asked_again() -> None:
    world = World(
        spec(webhooks=[hook("approve", "confirm-rollout")]), started(), answers={"approve": "fail"}
    )
    first = world.tick()
    assert world.status.phase == "Waiting"
    assert warnings(first) == ["Halt podinfo.test advancement waiting for approval approve"]
    assert notified(first) == ["started", "halted"]
    for _ in range(3):
        assert world.tick() == ()  # the wait was announced once
        assert (world.status.phase, world.status.canary_weight) == ("Waiting", 0)
        assert world.status.failed_checks == 0
    world.answers.clear()
    approved = world.tick()
    assert (world.status.phase, world.status.canary_weight) == ("Progressing", 10)
    assert events(approved) == [
        "Confirm-rollout check approve passed",
        "Advance podinfo.test canary weight 10",
    ]
    assert world.status.gates_done == ("confirm-rollout",)
    world.tick()
    assert "confirm-rollout" not in world.asked.gates
    assert world.called.count(("confirm-rollout", "approve")) == 5


def test_pre_rollout_runs_once_the_canary_was_seen_ready_and_only_once() -> None:
    world = World(spec(webhooks=[hook("smoke", "pre-rollout")]), started())
    world.canary = starting(REV)
    first = world.tick()
    assert "pre-rollout" not in world.asked.gates
    assert events(first)[-1] == (
        "Halt advancement podinfo-canary.test waiting for rollout to finish: "
        "0 of 2 updated replicas are available"
    )
    world.canary = ready(REV)
    second = world.tick()  # ready now, but it was not at the last tick: the gate waits a tick
    assert "pre-rollout" not in world.asked.gates
    assert world.status.canary_weight == 0
    assert events(second) == [
        "Running the pre-rollout checks of podinfo.test at the next interval, "
        "now that podinfo-canary.test is ready"
    ]
    third = world.tick()
    assert "pre-rollout" in world.asked.gates
    assert events(third) == [
        "Pre-rollout check smoke passed",
        "Advance podinfo.test canary weight 10",
    ]
    assert world.status.gates_done == ("pre-rollout",)
    for _ in range(3):
        world.tick()
    assert world.called.count(("pre-rollout", "smoke")) == 1


def test_a_failing_pre_rollout_gate_is_a_failed_check_and_is_retried() -> None:
    world = World(
        spec(webhooks=[hook("smoke", "pre-rollout")]),
        analysing(0),
        answers={"smoke": "fail"},
    )
    actions = world.tick()
    assert warnings(actions) == [
        "Halt podinfo.test advancement pre-rollout check smoke failed "
        "HTTP 500 Internal Server Error"
    ]
    assert (world.status.canary_weight, world.status.failed_checks) == (0, 1)
    world.answers.clear()
    world.tick()
    assert (world.status.canary_weight, world.status.gates_done) == (10, ("pre-rollout",))


def test_the_canary_never_gets_weight_while_not_ready_and_rolls_back_past_the_deadline() -> None:
    world = World(spec(), started())
    world.canary = starting(REV)
    halts = 0
    while world.status.phase == "Progressing":
        actions = world.tick()
        if world.status.phase == "Progressing":
            halts += 1
            assert events(actions)[-1] == (
                "Halt advancement podinfo-canary.test waiting for rollout to finish: "
                "0 of 2 updated replicas are available"
            )
            assert not of(SetWeights, actions)
            assert (world.status.canary_weight, world.status.failed_checks) == (0, 0)
    # First seen not ready at T0; at T0+600s it is not yet late, at T0+630s it is.
    assert halts == 21
    assert warnings(actions) == [
        "Rolling back podinfo.test progress deadline exceeded: canary deployment "
        "podinfo-canary.test not ready after 600s: 0 of 2 updated replicas are available",
        "Canary failed! Scaling down podinfo-canary.test",
    ]
    assert world.status.phase == "Failed"
    assert of(SetWeights, actions) == [SetWeights(100, 0)]


def test_readiness_deadline_counts_from_when_the_canary_stopped_being_ready() -> None:
    # Analysing for an hour: the phase is old, but the canary just became unready.
    world = World(spec(), analysing(20, phase_entered_at=timestamp(T0 - timedelta(hours=1))))
    world.canary = starting(REV, available=1)
    actions = world.tick()
    assert world.status.phase == "Progressing"
    assert world.status.canary_unready_since == timestamp(T0)
    assert events(actions) == [
        "Halt advancement podinfo-canary.test waiting for rollout to finish: "
        "1 of 2 updated replicas are available"
    ]
    world.canary = ready(REV)
    world.tick()
    assert world.status.canary_unready_since == ""
    assert world.status.canary_weight == 30


def test_an_unready_primary_halts_and_past_the_deadline_rolls_back() -> None:
    world = World(spec(), analysing(20), route=(80, 20))
    world.primary = starting(STABLE, available=1)
    actions = world.tick()
    assert events(actions) == [
        "Halt advancement podinfo.test waiting for rollout to finish: "
        "1 of 2 updated replicas are available"
    ]
    assert (world.status.canary_weight, world.status.failed_checks) == (20, 0)
    world.now = T0 + timedelta(seconds=601)
    actions = world.tick()
    assert warnings(actions)[0] == (
        "Rolling back podinfo.test progress deadline exceeded: primary deployment podinfo.test "
        "not ready after 600s: 1 of 2 updated replicas are available"
    )
    # It has ready pods: traffic goes back to it.
    assert (world.status.phase, world.route) == ("Failed", (100, 0))


def test_a_rollback_never_sends_all_traffic_to_a_primary_with_no_ready_pods() -> None:
    world = World(spec(), analysing(20), route=(80, 20), control="abort")
    world.primary = starting(STABLE, available=0)
    actions = world.tick()
    assert warnings(actions) == [
        "Rolling back podinfo.test manual abort",
        "Canary failed! podinfo.test has no ready pods, so podinfo-canary.test keeps serving "
        "20% until it has",
    ]
    assert not of(SetWeights, actions) and not of(ScaleCanary, actions)
    assert (world.status.phase, world.status.canary_weight) == ("Failed", 20)
    # Still broken: the canary keeps its share.
    waiting = world.tick()
    assert not of(SetWeights, waiting)
    assert world.status.canary_weight == 20
    world.primary = ready(STABLE)
    back = world.tick()
    assert back[:3] == (CommitStatus(), SetWeights(100, 0), ScaleCanary(0))
    assert (world.status.phase, world.status.canary_weight) == ("Failed", 0)
    assert world.tick() == ()


# --------------------------------------------------------------------------------------------
# Promotion
# --------------------------------------------------------------------------------------------


def test_a_primary_that_does_not_roll_out_is_restored_and_the_canary_keeps_serving() -> None:
    world = World(spec(), analysing(30), route=(70, 30), primary_rolls_out=False)
    world.tick()
    assert world.status.phase == "Promoting"
    promoting_since = world.now - world.interval
    while world.status.phase == "Promoting":
        actions = world.tick()
    assert world.now - world.interval - promoting_since == timedelta(seconds=630)
    assert warnings(actions) == [
        "Rolling back podinfo.test promotion failed: podinfo.test not rolled out after 600s: "
        "1 of 2 updated replicas are available",
        f"Canary failed! Restoring podinfo.test to revision {STABLE}; podinfo-canary.test keeps "
        "serving 30% until podinfo.test is ready again",
    ]
    assert of(RestorePrimary, actions) == [RestorePrimary(STABLE)]
    assert not of(SetWeights, actions) and not of(ScaleCanary, actions)
    assert (world.status.phase, world.status.canary_weight) == ("Failed", 30)
    assert world.status.failed_revision == REV
    # No tick ever sent all traffic to the primary while it ran the broken rollout.
    assert SetWeights(100, 0) not in world.performed
    back = world.tick()  # the restored primary is ready
    assert back[:3] == (CommitStatus(), SetWeights(100, 0), ScaleCanary(0))
    assert world.status.canary_weight == 0


@pytest.mark.parametrize(
    ("promotion_step", "finalising"),
    [(None, [0]), (20, [30, 10, 0]), (50, [0])],
)
def test_traffic_goes_back_to_the_primary_in_steps_of_step_weight_promotion(
    promotion_step: int | None, finalising: list[int]
) -> None:
    world = World(spec(stepWeight=25, maxWeight=50, stepWeightPromotion=promotion_step), started())
    trace = []
    while world.status.phase != "Succeeded":
        world.tick()
        trace.append((world.status.phase, world.status.canary_weight))
        assert world.route == (100 - world.status.canary_weight, world.status.canary_weight)
    assert trace == [
        ("Progressing", 25),
        ("Progressing", 50),
        ("Promoting", 50),
        *[("Finalising", w) for w in finalising],
        ("Succeeded", 0),
    ]


def test_skip_analysis_promotes_an_active_canary_right_away() -> None:
    world = World(spec({"skipAnalysis": True}), analysing(10), route=(90, 10))
    actions = world.tick()
    assert world.asked == Needs()
    assert world.status.phase == "Promoting"
    assert events(actions) == [
        "Skipping the analysis of podinfo.test: skipAnalysis is set",
        "Copying podinfo-canary.test template spec to podinfo.test",
    ]
    assert of(PromoteTemplate, actions) == [PromoteTemplate(REV)]


# --------------------------------------------------------------------------------------------
# Iterations: blue/green and A/B testing
# --------------------------------------------------------------------------------------------


def test_blue_green_runs_its_iterations_at_weight_0_then_switches_and_promotes() -> None:
    world = World(spec(stepWeight=None, maxWeight=None, iterations=3), started())
    assert world.spec.analysis.strategy == "blue-green"
    trace = []
    while world.status.phase != "Succeeded":
        actions = world.tick()
        trace.append((world.status.phase, world.status.canary_weight, world.status.iterations))
        if world.status.iterations == 1:
            assert not world.asked.metrics and events(actions)[-1] == (
                "Advance podinfo.test canary iteration 1/3"
            )
    assert trace == [
        ("Progressing", 0, 1),
        ("Progressing", 0, 2),
        ("Progressing", 0, 3),
        ("Progressing", 100, 4),  # all traffic to the canary for one judged iteration
        ("Promoting", 100, 4),  # the primary rolls out while the canary serves everything
        ("Finalising", 0, 4),
        ("Succeeded", 0, 4),
    ]
    weights = [a for a in world.performed if isinstance(a, SetWeights)]
    assert weights == [SetWeights(0, 100), SetWeights(100, 0)]


def test_ab_testing_never_moves_the_weights() -> None:
    match = [{"headers": {"x-canary": {"exact": "insider"}}}]
    world = World(spec(stepWeight=None, maxWeight=None, iterations=3, match=match), started())
    assert world.spec.analysis.strategy == "ab-testing"
    trace = []
    while world.status.phase != "Succeeded":
        world.tick()
        trace.append((world.status.phase, world.status.iterations))
    assert trace == [
        ("Progressing", 1),
        ("Progressing", 2),
        ("Progressing", 3),
        ("Promoting", 3),
        ("Finalising", 3),
        ("Succeeded", 3),
    ]
    assert all(a.canary == 0 for a in world.performed if isinstance(a, SetWeights))


def test_a_failing_iteration_does_not_count() -> None:
    world = World(spec(stepWeight=None, maxWeight=None, iterations=3), analysing(0, iterations=1))
    world.metrics["request-success-rate"] = LOW_SUCCESS
    world.tick()
    assert (world.status.iterations, world.status.failed_checks) == (1, 1)


MATCH = [{"headers": {"x-canary": {"exact": "insider"}}}]


def test_ab_testing_routes_the_match_to_the_canary_from_the_first_iteration_to_finalising() -> None:
    world = World(spec(stepWeight=None, maxWeight=None, iterations=3, match=MATCH), started())
    first = world.tick()
    assert of(SetWeights, first) == [SetWeights(100, 0)]
    assert events(first) == [
        "Starting canary analysis for podinfo.test revision v1-canary1111",
        "Routing requests of podinfo.test that match analysis.match to podinfo-canary.test",
        "Advance podinfo.test canary iteration 1/3",
    ]
    trace = [(world.status.phase, world.route_rules)]
    while world.status.phase != "Succeeded":
        world.tick()
        trace.append((world.status.phase, world.route_rules))
    assert trace == [
        ("Progressing", True),
        ("Progressing", True),
        ("Progressing", True),
        ("Promoting", True),  # matching users stay on the new version while the primary rolls
        ("Finalising", False),  # all traffic back on the primary: the match rule is gone
        ("Succeeded", False),
    ]
    assert all(a == SetWeights(100, 0) for a in world.performed if isinstance(a, SetWeights))


def test_blue_green_mirrors_during_its_iterations_until_the_traffic_switches() -> None:
    world = World(
        spec(stepWeight=None, maxWeight=None, iterations=3, mirror=True, mirrorWeight=50),
        started(),
    )
    first = world.tick()
    assert "Mirroring 50% of the requests of podinfo.test to podinfo-canary.test" in events(first)
    trace = [(world.status.canary_weight, world.route_rules)]
    while world.status.phase != "Succeeded":
        world.tick()
        trace.append((world.status.canary_weight, world.route_rules))
    assert trace[:4] == [(0, True), (0, True), (0, True), (100, False)]
    assert trace[-1] == (0, False)


def test_blue_green_without_mirror_never_touches_the_route_before_the_switch() -> None:
    world = World(spec(stepWeight=None, maxWeight=None, iterations=3), started())
    assert not of(SetWeights, world.tick())
    assert world.route_rules is False


def test_a_match_rule_lost_in_a_crash_after_the_commit_is_put_back() -> None:
    world = World(spec(stepWeight=None, maxWeight=None, iterations=3, match=MATCH), started())
    world.tick(crash_after=CommitStatus)
    assert (world.status.iterations, world.route_rules) == (1, False)
    actions = world.tick()
    assert of(SetWeights, actions) == [SetWeights(100, 0)]
    assert warnings(actions) == [
        "Route of podinfo.test lacks what the analysis adds to it; restoring it: Routing requests "
        "of podinfo.test that match analysis.match to podinfo-canary.test"
    ]
    assert (world.status.iterations, world.route_rules) == (1, True)


def test_an_aborted_ab_test_takes_the_match_rule_away() -> None:
    world = World(
        spec(stepWeight=None, maxWeight=None, iterations=3, match=MATCH),
        analysing(0, iterations=2),
        control="abort",
    )
    assert world.route_rules is True
    world.tick()
    assert (world.status.phase, world.route, world.route_rules) == ("Failed", (100, 0), False)


def test_a_failed_canary_whose_route_still_matches_is_put_back_before_scaling_down() -> None:
    # A rollback cut short after its commit: Failed at weight 0, the route still has the rule.
    failed = replace(analysing(0, iterations=2), phase="Failed", failed_revision=REV)
    world = World(
        spec(stepWeight=None, maxWeight=None, iterations=3, match=MATCH), failed, route_rules=True
    )
    actions = world.tick()
    # The rule goes first, then the pods: no request is left on a canary scaled to zero.
    assert [a for a in actions if isinstance(a, CLUSTER_WRITES)] == [
        SetWeights(100, 0),
        ScaleCanary(0),
    ]
    assert warnings(actions)[0] == (
        "Route of podinfo.test still carries what the analysis added to it; restoring the plain "
        "split 100/0"
    )
    assert world.route_rules is False
    assert not of(SetWeights, world.tick())


def test_a_failed_ab_promotion_takes_the_match_rule_away_with_the_canary() -> None:
    world = World(
        spec(stepWeight=None, maxWeight=None, iterations=2, match=MATCH),
        analysing(0, iterations=2),
        primary_rolls_out=False,
    )
    world.tick()
    assert world.status.phase == "Promoting" and world.route_rules is True
    world.now += timedelta(seconds=world.spec.progress_deadline_seconds + 1)
    actions = world.tick()
    assert world.status.phase == "Failed"
    assert of(SetWeights, actions) == [SetWeights(100, 0)]
    assert of(ScaleCanary, actions) == [ScaleCanary(0)]
    assert world.route_rules is False


def test_session_affinity_cookies_are_on_the_route_while_weights_are() -> None:
    affinity = {"cookieName": "canary", "primaryCookieName": "primary"}
    world = World(spec(sessionAffinity=affinity), started())
    trace = []
    while world.status.phase != "Succeeded":
        world.tick()
        trace.append((world.status.phase, world.status.canary_weight, world.route_rules))
    assert trace == [
        ("Progressing", 10, True),
        ("Progressing", 20, True),
        ("Progressing", 30, True),
        ("Promoting", 30, True),
        ("Finalising", 0, False),
        ("Succeeded", 0, False),
    ]


def test_route_revision_covers_the_first_step_to_finalising() -> None:
    assert route_revision(started()) == ""  # not taken up
    assert route_revision(replace(started(), analysed_revision=REV)) == ""  # no step yet
    assert route_revision(analysing(10)) == REV
    assert route_revision(analysing(0, iterations=1, phase="WaitingPromotion")) == REV
    assert route_revision(analysing(30, phase="Promoting")) == REV
    for phase in ("Finalising", "Succeeded", "Failed", "Initialized"):
        assert route_revision(analysing(30, phase=phase)) == ""


# --------------------------------------------------------------------------------------------
# Control
# --------------------------------------------------------------------------------------------


def test_abort_rolls_back_now() -> None:
    world = World(spec(), analysing(20), route=(80, 20), control="abort")
    actions = world.tick()
    assert warnings(actions) == [
        "Rolling back podinfo.test manual abort",
        "Canary failed! Scaling down podinfo-canary.test",
    ]
    assert actions[-1] == ClearControl()
    assert (world.status.phase, world.status.canary_weight) == ("Failed", 0)
    assert world.control is None


def test_abort_after_the_copy_restores_the_primary_and_keeps_the_canary_serving() -> None:
    world = World(spec(), analysing(30, phase="Promoting"), route=(70, 30), control="abort")
    world.primary = starting(REV, available=1)
    actions = world.tick()
    assert of(RestorePrimary, actions) == [RestorePrimary(STABLE)]
    assert not of(SetWeights, actions)
    assert (world.status.phase, world.status.canary_weight) == ("Failed", 30)
    assert actions[-1] == ClearControl()


def test_promote_skips_the_remaining_analysis_once_the_canary_is_ready() -> None:
    world = World(spec(), analysing(10), route=(90, 10), control="promote")
    world.canary = starting(REV, available=1)
    waiting = world.tick()
    assert world.control == "promote"  # not consumed: it waits for the canary
    assert not of(PromoteTemplate, waiting) and ClearControl() not in waiting
    world.canary = ready(REV)
    actions = world.tick()
    assert world.status.phase == "Promoting"
    assert events(actions) == [
        "Promoting podinfo.test on request (perch.dev/action=promote): skipping the remaining "
        "analysis",
        "Copying podinfo-canary.test template spec to podinfo.test",
    ]
    assert actions[-1] == ClearControl()


def test_pause_stops_progress_until_resume() -> None:
    world = World(spec(), analysing(10), route=(90, 10), control="pause")
    actions = world.tick()
    assert events(actions) == [
        "Paused podinfo.test on request (perch.dev/action=pause): no progress until "
        "perch.dev/action=resume"
    ]
    assert actions[-1] == ClearControl()
    assert world.status.paused and world.status.canary_weight == 10
    for _ in range(3):
        before = world.status
        assert world.tick() == ()
        assert world.status == before
        assert world.asked == Needs()
    world.control = "resume"
    actions = world.tick()
    # Nothing was measured while paused: the next tick judges the canary, not this one.
    assert events(actions) == ["Resumed podinfo.test on request (perch.dev/action=resume)"]
    assert not world.status.paused
    assert (world.status.canary_weight, world.status.failed_checks) == (10, 0)
    world.tick()
    assert world.asked.metrics
    assert world.status.canary_weight == 20


def test_a_paused_canary_still_rolls_back_past_the_readiness_deadline() -> None:
    world = World(spec(), analysing(10, paused=True), route=(90, 10))
    world.canary = starting(REV)
    world.tick()
    world.now += timedelta(seconds=600)
    world.tick()
    assert world.status.phase == "Failed"


def test_retry_restarts_a_failed_revision_from_weight_0() -> None:
    failed = analysing(
        0, phase="Failed", failed_checks=3, failed_revision=REV, gates_done=("pre-rollout",)
    )
    world = World(spec(), failed, control="retry")
    world.canary = Workload(desired=0, revision=REV)
    actions = world.tick()
    assert actions == (
        CommitStatus(),
        ScaleCanary(None),
        Event(
            "Retrying",
            f"Retrying podinfo.test revision {REV} on request (perch.dev/action=retry): "
            "the analysis starts over at weight 0",
        ),
        ClearControl(),
    )
    status = world.status
    assert (status.phase, status.canary_weight, status.failed_checks) == ("Progressing", 0, 0)
    assert (status.gates_done, status.failed_revision, status.canary_revision) == ((), "", REV)
    world.tick()
    assert (world.status.phase, world.status.canary_weight) == ("Progressing", 10)


@pytest.mark.parametrize(
    ("status", "control", "why"),
    [
        (
            analysing(0, phase="Succeeded"),
            "promote",
            "no canary of podinfo.test is in progress (phase Succeeded)",
        ),
        (
            analysing(0, phase="Failed", failed_revision=REV),
            "abort",
            "the canary of podinfo.test failed; perch.dev/action=retry analyses revision "
            f"{REV} again",
        ),
        (
            analysing(30, phase="Promoting"),
            "promote",
            f"revision {REV} of podinfo.test is already Promoting",
        ),
        (analysing(10), "retry", f"revision {REV} is still being analysed"),
        (analysing(10), "resume", "podinfo.test is already not paused"),
    ],
)
def test_a_control_that_does_not_apply_is_consumed_with_a_warning(
    status: CanaryStatus, control: ControlAction, why: str
) -> None:
    world = World(spec(), status, route=(100 - status.canary_weight, status.canary_weight))
    world.primary = ready(REV) if status.phase == "Promoting" else ready(STABLE)
    if status.phase in ("Succeeded", "Failed"):
        world.canary = Workload(desired=0, revision=REV)  # scaled down when it ended
    world.control = control
    actions = world.tick()
    assert f"Ignoring perch.dev/action={control} on podinfo.test: {why}" in warnings(actions)
    assert actions[-1] == ClearControl()
    # The control had no effect of its own: nothing promoted, restored, rolled back or restarted.
    assert not of(PromoteTemplate, actions) and not of(RestorePrimary, actions)
    assert not of(ScaleCanary, actions)
    assert world.status.canary_weight >= status.canary_weight or status.phase == "Promoting"
    assert world.status.failed_revision == status.failed_revision


def test_suspend_does_nothing_at_all() -> None:
    world = World(spec({"suspend": True}), analysing(10), control="abort", route=(50, 50))
    assert world.tick() == ()
    assert world.status == analysing(10)
    assert world.asked == Needs()


def test_terminated_does_nothing() -> None:
    world = World(spec(), analysing(0, phase="Terminated"), control="retry")
    assert world.tick() == ()


# --------------------------------------------------------------------------------------------
# The global cap, restarts, stale status
# --------------------------------------------------------------------------------------------


def test_a_canary_queues_for_a_slot_then_starts() -> None:
    world = World(spec(), started(), admitted=False, progressing=3)
    first = world.tick()
    assert first == (
        CommitStatus(),
        Event("Queued", "Halt podinfo.test advancement waiting for a slot: 3 canaries progressing"),
    )
    assert world.status.phase == "Waiting" and not world.status.holds_slot
    for _ in range(3):
        before = world.status
        assert world.tick() == ()
        assert world.status == before
    world.admitted = True
    actions = world.tick()
    assert events(actions) == [
        f"Starting canary analysis for podinfo.test revision {REV}",
        "Advance podinfo.test canary weight 10",
    ]
    assert world.status.phase == "Progressing" and world.status.holds_slot


def test_a_canary_still_running_the_previous_revision_is_not_ready() -> None:
    # Just after the webhook replaced the canary's template, a stale read still shows the old pods.
    world = World(spec(), started(revision=NEWER))
    world.canary = ready(REV)
    actions = world.tick()
    assert events(actions)[-1] == (
        "Halt advancement podinfo-canary.test waiting for rollout to finish: "
        f"it runs revision {REV}, not yet {NEWER}"
    )
    assert world.status.canary_weight == 0
    world.canary = ready(NEWER)
    world.tick()
    assert world.status.canary_weight == 10


def test_a_progressing_canary_is_never_pre_empted() -> None:
    world = World(spec(), analysing(10), route=(90, 10), admitted=False)
    world.tick()
    assert world.status.canary_weight == 20


def test_a_weight_change_is_committed_before_the_route_and_finished_after_a_crash() -> None:
    world = World(spec(), analysing(10), route=(90, 10))
    # The shell commits weight 20 and dies before it sets the route.
    lost = world.tick(crash_after=CommitStatus)
    assert lost[:2] == (CommitStatus(), SetWeights(80, 20))
    assert world.route == (90, 10) and world.status.canary_weight == 20
    # The next analyzer finishes the step (the route catches up); it neither repeats the step nor
    # goes back to 10.
    resync = world.tick()
    assert of(SetWeights, resync) == [SetWeights(80, 20)]
    assert warnings(resync) == [
        "Route of podinfo.test has weights 90/10 but the status records 80/20; restoring 80/20 "
        "before going on"
    ]
    assert (world.status.canary_weight, world.status.failed_checks) == (20, 0)
    world.tick()
    assert world.status.canary_weight == 30 and world.route == (70, 30)
    assert [a for a in world.performed if isinstance(a, SetWeights)] == [
        SetWeights(80, 20),
        SetWeights(70, 30),
    ]


def test_a_tick_cut_short_before_its_commit_is_decided_again_not_repeated() -> None:
    world = World(spec(), analysing(10), route=(90, 10))
    # The shell decided weight 20 and died before its commit: nothing was written.
    decided = step(world.spec, world.status, world.observe(), name="podinfo", namespace="test")
    assert decided[1][0] == CommitStatus()
    world.tick()
    assert world.status.canary_weight == 20
    assert [a for a in world.performed if isinstance(a, SetWeights)] == [SetWeights(80, 20)]


def test_a_missing_route_is_recreated_at_the_status_weight() -> None:
    world = World(spec(), analysing(20), route=None)
    actions = world.tick()
    assert of(SetWeights, actions) == [SetWeights(80, 20)]
    assert world.status.canary_weight == 20


def test_a_newer_revision_restarts_the_analysis_without_stale_flags() -> None:
    gates = [hook("approve", "confirm-rollout"), hook("smoke", "pre-rollout")]
    world = World(spec(webhooks=gates), started())
    while world.status.canary_weight < 20:
        world.tick()
    assert world.status.gates_done == ("confirm-rollout", "pre-rollout")
    # The webhook holds back a newer revision: analysis_started resets the status.
    world.status = analysis_started(world.status, revision=NEWER, at=world.now)
    world.route = (100, 0)
    world.canary = ready(NEWER)
    world.tick()
    assert "confirm-rollout" in world.asked.gates
    assert world.status.analysed_revision == NEWER


def test_stale_progress_of_another_revision_is_dropped_even_without_the_webhook_reset() -> None:
    gates = [hook("approve", "confirm-rollout"), hook("smoke", "pre-rollout")]
    stale = analysing(20, failed_checks=2, gates_done=("confirm-rollout", "pre-rollout"))
    stale = replace(stale, canary_revision=NEWER)  # only the revision changed
    world = World(spec(webhooks=gates), stale, route=(80, 20), answers={"approve": "fail"})
    world.canary = ready(NEWER)
    assert "confirm-rollout" in needs(world.spec, stale, now=T0).gates
    actions = world.tick()
    assert of(SetWeights, actions) == [SetWeights(100, 0)]  # the route follows the fresh status
    assert (world.status.canary_weight, world.status.failed_checks) == (0, 0)
    assert world.status.gates_done == ()
    world.tick()
    assert world.status.phase == "Waiting"  # confirm-rollout asked again, for NEWER


# --------------------------------------------------------------------------------------------
# Confirm gates: maxWait and onTimeout
# --------------------------------------------------------------------------------------------


def elapsed(world: World) -> timedelta:
    """How long after T0 the last tick ran (World.tick moves the clock on after the step)."""
    return world.now - world.interval - T0


def test_confirm_rollout_past_max_wait_with_abort_rolls_back_then_and_not_before() -> None:
    gate = hook("approve", "confirm-rollout", maxWait="10s", onTimeout="abort")
    world = World(spec(interval="1s", webhooks=[gate]), started(), answers={"approve": "fail"})
    first = world.tick()
    assert world.status.phase == "Waiting"
    assert warnings(first) == ["Halt podinfo.test advancement waiting for approval approve"]
    assert (world.status.confirm_type, world.status.confirm_asked_at) == (
        "confirm-rollout",
        timestamp(T0),
    )
    for _ in range(9):  # 1s ... 9s: still within the 10s
        assert world.tick() == ()
        assert (world.status.phase, world.status.failed_checks) == ("Waiting", 0)
    actions = world.tick()
    assert elapsed(world) == timedelta(seconds=10)
    assert world.status.phase == "Failed"
    assert warnings(actions) == [
        "Rolling back podinfo.test confirm-rollout gate approve not approved within 10s",
        "Canary failed! Scaling down podinfo-canary.test",
    ]
    assert of(SetWeights, actions) == [SetWeights(100, 0)]
    assert of(ScaleCanary, actions) == [ScaleCanary(0)]
    assert of(CallGates, actions) == [CallGates(type="post-rollout", phase="Failed")]
    assert notified(actions) == ["failed"]
    assert world.status.failed_revision == REV
    assert (world.status.confirm_type, world.status.confirm_asked_at) == ("", "")


def test_confirm_promotion_past_max_wait_with_proceed_promotes() -> None:
    gate = hook("ship-it", "confirm-promotion", maxWait="2m", onTimeout="proceed")
    world = World(spec(webhooks=[gate]), analysing(30), answers={"ship-it": "fail"})
    world.tick()
    assert world.status.phase == "WaitingPromotion"
    for _ in range(3):  # 30s, 60s, 90s
        assert world.tick() == ()
        assert world.status.phase == "WaitingPromotion"
    actions = world.tick()
    assert elapsed(world) == timedelta(minutes=2)
    assert world.status.phase == "Promoting"
    assert events(actions) == [
        "Proceeding with podinfo.test: confirm-promotion gate ship-it not approved within 2m "
        "(onTimeout: proceed)",
        "Copying podinfo-canary.test template spec to podinfo.test",
    ]
    assert of(PromoteTemplate, actions) == [PromoteTemplate(REV)]
    assert world.status.confirm_type == world.status.confirm_asked_at == ""
    while world.status.phase != "Succeeded":
        world.tick()


def test_confirm_traffic_increase_past_max_wait_with_wait_keeps_waiting() -> None:
    gate = hook("more", "confirm-traffic-increase", maxWait="1m", onTimeout="wait")
    world = World(spec(webhooks=[gate]), analysing(10), answers={"more": "fail"})
    halt = "Halt podinfo.test advancement waiting for traffic increase approval more"
    timed_out = (
        "Halt podinfo.test advancement: confirm-traffic-increase gate more not approved within "
        "1m (onTimeout: wait), still waiting for approval"
    )
    announced = []
    for tick in range(40):  # 20 minutes
        actions = world.tick()
        assert (halt in warnings(actions)) == (tick == 0)  # once, when the wait began
        if timed_out in warnings(actions):
            announced.append(elapsed(world))
        assert world.status.phase == "Progressing"
        assert (world.status.canary_weight, world.status.failed_checks) == (10, 0)
        assert not of(SetWeights, actions)
    assert announced == [timedelta(minutes=1)]  # once
    assert world.status.confirm_timed_out == ("more",)
    world.answers.clear()
    actions = world.tick()
    assert world.status.canary_weight == 20
    assert (world.status.confirm_type, world.status.confirm_asked_at) == ("", "")
    assert world.status.confirm_timed_out == ()
    # The next step is a new question with its own wait.
    world.answers["more"] = "fail"
    world.tick()
    assert world.status.confirm_asked_at == timestamp(world.now - world.interval)


def test_approval_before_max_wait_goes_on_as_usual_and_resets_the_wait() -> None:
    gates = [
        hook("approve", "confirm-rollout", maxWait="1m"),
        hook("more", "confirm-traffic-increase", maxWait="1m"),
    ]
    world = World(spec(webhooks=gates), started(), answers={"approve": "fail"})
    world.tick()
    world.tick()
    assert world.status.phase == "Waiting"
    world.answers.clear()
    actions = world.tick()  # at 60s the gate approves: approval wins over the wait
    assert (world.status.phase, world.status.canary_weight) == ("Progressing", 10)
    assert "Confirm-rollout check approve passed" in events(actions)
    assert (world.status.confirm_type, world.status.confirm_asked_at) == ("", "")
    # 40 s without approval at weight 10, approved, then 40 s more at 20: 80 s of waiting for
    # confirm-traffic-increase in all, but never 1m for one step.
    for answer in ("fail", "fail", "pass", "fail", "fail", "pass"):
        world.answers["more"] = answer
        world.tick()
        assert world.status.phase == "Progressing"
    assert world.status.canary_weight == 30
    while world.status.phase != "Succeeded":
        world.tick()
    assert world.status.failed_checks == 0
    assert not any("not approved within" in message for message in warnings(tuple(world.performed)))


def test_a_restarted_analyzer_keeps_counting_from_the_first_ask() -> None:
    gate = hook("ship-it", "confirm-promotion", maxWait="2m")
    world = World(spec(webhooks=[gate]), analysing(30), answers={"ship-it": "fail"})
    world.tick()
    world.tick()
    stored = world.status.to_wire()
    assert (stored["confirmType"], stored["confirmAskedAt"], stored["confirmTimedOut"]) == (
        "confirm-promotion",
        timestamp(T0),
        [],
    )
    # A new analyzer process: it knows only what the API stored, and its clock.
    restarted = World(
        world.spec,
        CanaryStatus.from_wire(json.loads(json.dumps(stored))),
        now=world.now,
        answers={"ship-it": "fail"},
    )
    restarted.tick()  # 60s
    restarted.tick()  # 90s
    assert restarted.status.phase == "WaitingPromotion"
    actions = restarted.tick()
    assert elapsed(restarted) == timedelta(minutes=2)
    assert restarted.status.phase == "Failed"
    assert warnings(actions)[0] == (
        "Rolling back podinfo.test confirm-promotion gate ship-it not approved within 2m"
    )


@pytest.mark.parametrize(
    ("b", "b_answers", "outcome"),
    [
        # every gate that has not approved proceeds: go on once the last one has timed out
        ({"maxWait": "2m", "onTimeout": "proceed"}, "fail", ("Promoting", 120)),
        # any abort wins, whether it times out after or before the proceeding gate
        ({"maxWait": "2m", "onTimeout": "abort"}, "fail", ("Failed", 120)),
        ({"maxWait": "30s", "onTimeout": "abort"}, "fail", ("Failed", 30)),
        # a gate that waits, or has no maxWait, holds the others back for ever
        ({"maxWait": "30s", "onTimeout": "wait"}, "fail", None),
        ({}, "fail", None),
        # a gate that approves does not
        ({}, "pass", ("Promoting", 60)),
    ],
)
def test_several_confirm_gates_of_one_type(
    b: dict[str, str], b_answers: GateOutcome, outcome: tuple[str, float] | None
) -> None:
    gates = [
        hook("a", "confirm-promotion", maxWait="1m", onTimeout="proceed"),
        hook("b", "confirm-promotion", **b),
    ]
    world = World(spec(webhooks=gates), analysing(30), answers={"a": "fail", "b": b_answers})
    result = None
    for _ in range(11):  # five minutes
        world.tick()
        if world.status.phase != "WaitingPromotion":
            result = (world.status.phase, elapsed(world).total_seconds())
            break
    assert result == outcome
    told = [m for m in warnings(tuple(world.performed)) if "not approved within" in m]
    assert len(told) == len(set(told))  # each timeout is told once
    if outcome is None:
        assert (
            "Halt podinfo.test advancement: confirm-promotion gate a not approved within 1m "
            "(onTimeout: proceed), still waiting for approval" in told
        )


def test_blue_green_asks_confirm_promotion_twice_but_waits_out_max_wait_once() -> None:
    gate = hook("ship-it", "confirm-promotion", maxWait="1m", onTimeout="proceed")
    world = World(
        spec(stepWeight=None, maxWeight=None, iterations=2, webhooks=[gate]),
        analysing(0, iterations=2),
        answers={"ship-it": "fail"},
    )
    world.tick()
    assert world.status.phase == "WaitingPromotion"
    world.tick()
    actions = world.tick()  # 60s: proceeds, all traffic to the canary for the last iteration
    assert (world.status.phase, world.status.canary_weight) == ("Progressing", 100)
    assert "Routing all traffic to canary podinfo-canary.test" in events(actions)
    actions = world.tick()  # asked again before the copy: already waited out
    assert world.status.phase == "Promoting"
    assert of(PromoteTemplate, actions) == [PromoteTemplate(REV)]


def test_confirm_rollout_proceeding_runs_pre_rollout_at_the_next_tick() -> None:
    gates = [
        hook("approve", "confirm-rollout", maxWait="1m", onTimeout="proceed"),
        hook("smoke", "pre-rollout"),
    ]
    world = World(spec(webhooks=gates), started(), answers={"approve": "fail"})
    world.tick()
    world.tick()
    actions = world.tick()  # 60s: as if approved; pre-rollout was not asked for this tick
    assert events(actions) == [
        "Proceeding with podinfo.test: confirm-rollout gate approve not approved within 1m "
        "(onTimeout: proceed)",
        "Running the pre-rollout checks of podinfo.test at the next interval",
    ]
    assert (world.status.phase, world.status.failed_checks) == ("Progressing", 0)
    assert world.status.gates_done == ("confirm-rollout",)
    actions = world.tick()
    assert "pre-rollout" in world.asked.gates
    assert "Pre-rollout check smoke passed" in events(actions)
    assert (world.status.canary_weight, world.status.failed_checks) == (10, 0)


def test_a_new_revision_forgets_the_confirm_wait() -> None:
    waiting = analysing(
        30,
        phase="WaitingPromotion",
        confirm_type="confirm-promotion",
        confirm_asked_at=timestamp(T0 - timedelta(hours=1)),
        confirm_timed_out=("ship-it",),
    )
    fresh = analysis_started(waiting, revision=NEWER, at=T0)
    assert (fresh.confirm_type, fresh.confirm_asked_at, fresh.confirm_timed_out) == ("", "", ())
    # Without the webhook's reset too: only the revision changed.
    gate = hook("approve", "confirm-rollout", maxWait="10m")
    world = World(
        spec(webhooks=[gate]),
        replace(waiting, canary_revision=NEWER),
        route=(70, 30),
        answers={"approve": "fail"},
    )
    world.canary = ready(NEWER)
    world.tick()
    world.tick()
    assert world.status.phase == "Waiting"
    assert (world.status.confirm_type, world.status.confirm_asked_at) == (
        "confirm-rollout",
        timestamp(T0 + world.interval),
    )
    assert world.status.confirm_timed_out == ()


# --------------------------------------------------------------------------------------------
# needs(), timestamps
# --------------------------------------------------------------------------------------------

ALL_GATES = spec(
    webhooks=[
        hook("approve", "confirm-rollout"),
        hook("smoke", "pre-rollout"),
        hook("more", "confirm-traffic-increase"),
        hook("load", "rollout"),
        hook("ship", "confirm-promotion"),
        hook("kill", "rollback"),
        hook("done", "post-rollout"),
        hook("audit", "event"),
    ]
)


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (started(), Needs(gates=("rollback", "confirm-rollout"))),
        (
            analysing(0, gates_done=("confirm-rollout",), canary_unready_since=timestamp(T0)),
            Needs(gates=("rollback",)),
        ),
        (
            analysing(0, gates_done=("confirm-rollout",)),
            Needs(gates=("rollback", "pre-rollout", "confirm-traffic-increase")),
        ),
        (
            analysing(10, gates_done=("confirm-rollout", "pre-rollout")),
            Needs(metrics=True, gates=("rollback", "rollout", "confirm-traffic-increase")),
        ),
        (analysing(30), Needs(metrics=True, gates=("rollback", "rollout", "confirm-promotion"))),
        (
            analysing(30, phase="WaitingPromotion"),
            Needs(metrics=True, gates=("rollback", "rollout", "confirm-promotion")),
        ),
        (analysing(10, paused=True), Needs(gates=("rollback",))),
        (analysing(30, phase="Promoting"), Needs()),
        (analysing(0, phase="Succeeded"), Needs()),
        (analysing(0, phase="Failed"), Needs()),
        (initialized(revision=STABLE, at=T0), Needs()),
    ],
)
def test_needs(status: CanaryStatus, expected: Needs) -> None:
    assert needs(ALL_GATES, status, now=T0) == expected


def test_transitions_are_stamped_with_the_tick_time() -> None:
    world = World(spec(), started(at=T0 - timedelta(minutes=5)))
    world.tick()
    assert world.status.last_transition_time == timestamp(T0)  # weight 0 -> 10
    assert world.status.phase_entered_at == timestamp(T0 - timedelta(minutes=5))
    world.tick()
    world.tick()
    promoted_at = world.now
    world.tick()
    assert world.status.phase == "Promoting"
    assert world.status.phase_entered_at == timestamp(promoted_at)
    assert world.status.conditions[0]["reason"] == "Promoting"
    paused = replace(world.status, paused=True)
    world.status = paused
    world.tick()
    assert world.status == paused  # nothing changed, nothing stamped


# --------------------------------------------------------------------------------------------
# No data, per metric (onNoData); MetricTemplates that cannot be used; muteAlert on halts
# --------------------------------------------------------------------------------------------

NO_DATA = MetricResult(
    "request-success-rate", "no-data", None, "no data for metric request-success-rate"
)
ERRORS_QUIET = {"name": "error-count", "query": "sum(x)", "thresholdRange": {"max": 0}}


def quiet_errors(policy: str | None, **more: Any) -> dict[str, Any]:
    """A custom error counter that has no series at all while there are no errors."""
    metric = {**ERRORS_QUIET, **more}
    if policy is not None:
        metric["onNoData"] = policy
    return metric


def test_no_data_fails_by_default_and_reads_no_data_never_a_number() -> None:
    world = World(spec(), analysing(10))
    world.metrics["request-success-rate"] = NO_DATA
    actions = world.tick()
    assert warnings(actions) == [
        "Halt podinfo.test advancement no data for metric request-success-rate"
    ]
    (halt,) = [a.message for a in of(Notify, actions)]
    assert halt == (
        "Halt podinfo.test advancement no data for metric request-success-rate (failed checks 1/3)"
    )
    assert (world.status.canary_weight, world.status.failed_checks) == (10, 1)


def test_on_no_data_pass_lets_a_quiet_error_counter_pass() -> None:
    world = World(
        spec(
            metrics=[
                {"name": "request-success-rate", "thresholdRange": {"min": 99}},
                quiet_errors("pass"),
            ]
        ),
        analysing(10),
    )
    world.metrics["error-count"] = MetricResult(
        "error-count", "no-data", None, "no data for metric error-count"
    )
    while world.status.phase != "Succeeded":
        actions = world.tick()
        assert not warnings(actions), warnings(actions)
    assert world.status.failed_checks == 0
    # Data again: judged as any value is (a pass policy never hides a real failure).
    world = World(spec(metrics=[quiet_errors("pass")]), analysing(10))
    world.metrics["error-count"] = MetricResult("error-count", "fail", 3.0, "error-count 3.00 > 0")
    assert warnings(world.tick()) == ["Halt podinfo.test advancement error-count 3.00 > 0"]


def test_on_no_data_skip_leaves_the_metric_out_and_the_others_decide() -> None:
    world = World(
        spec(
            metrics=[
                {"name": "request-success-rate", "thresholdRange": {"min": 99}},
                quiet_errors("skip"),
            ]
        ),
        analysing(10),
    )
    world.metrics["error-count"] = MetricResult("error-count", "no-data", None, "")
    actions = world.tick()
    assert of(SetWeights, actions) == [SetWeights(80, 20)]
    assert not warnings(actions)


def test_an_interval_no_metric_could_judge_holds_without_a_failed_check_and_never_promotes() -> (
    None
):
    world = World(spec(metrics=[quiet_errors("skip")]), analysing(30))
    world.metrics["error-count"] = MetricResult("error-count", "no-data", None, "")
    for _ in range(5):
        actions = world.tick()
        assert warnings(actions) == [
            "Halt podinfo.test advancement no data for metric error-count (onNoData: skip): "
            "no metric could be judged this interval"
        ]
        assert notified(actions) == ["halted"]
        assert not of(SetWeights, actions) and not of(PromoteTemplate, actions)
        assert (world.status.phase, world.status.canary_weight) == ("Progressing", 30)
        assert world.status.failed_checks == 0
    # Once it has data it is judged again, and the canary goes on.
    world.metrics["error-count"] = MetricResult("error-count", "pass", 0.0, "error-count 0.00")
    world.tick()
    assert world.status.phase == "Promoting"


@pytest.mark.parametrize("policy", ["pass", "skip"])
def test_a_no_data_policy_never_excuses_an_error(policy: str) -> None:
    world = World(spec(metrics=[quiet_errors(policy)]), analysing(10))
    world.metrics["error-count"] = MetricResult(
        "error-count", "error", None, "Prometheus query failed: HTTP 401: Unauthorized"
    )
    actions = world.tick()
    assert warnings(actions) == [
        "Halt podinfo.test advancement Prometheus query failed: HTTP 401: Unauthorized"
    ]
    assert world.status.failed_checks == 1


@pytest.mark.parametrize(
    "message",
    [
        "metric error-rate: MetricTemplate error-rate.test not found",
        "metric error-rate: MetricTemplate error-rate.test: unknown placeholder "
        "{{ variables.region }} (known: interval, name, namespace, target)",
        "metric error-rate: cannot read Secret prom-auth.test of MetricTemplate error-rate.test: "
        "Kubernetes API answered 403 Forbidden",
    ],
)
def test_an_unusable_metric_template_fails_with_its_message_and_never_promotes(
    message: str,
) -> None:
    metric = {"name": "error-rate", "templateRef": {"name": "error-rate"}, "onNoData": "pass"}
    world = World(spec(metrics=[{**metric, "thresholdRange": {"max": 1}}]), analysing(20))
    world.metrics["error-rate"] = MetricResult("error-rate", "error", None, message)
    halts = []
    while world.status.phase == "Progressing":
        halts += warnings(world.tick())
    assert halts[0] == f"Halt podinfo.test advancement {message}"
    assert halts.count(halts[0]) == 3
    assert world.status.phase == "Failed"
    assert not any(isinstance(a, PromoteTemplate) for a in world.performed)


def test_a_halt_caused_only_by_muted_gates_sends_no_alert() -> None:
    gates = [hook("smoke", "rollout", muteAlert=True), hook("load", "rollout")]
    world = World(spec(webhooks=gates), analysing(10), answers={"smoke": "fail"})
    actions = world.tick()
    # Still a failed check, and still an event; no notification.
    assert warnings(actions) == [
        "Halt podinfo.test advancement external check smoke failed HTTP 500 Internal Server Error"
    ]
    assert world.status.failed_checks == 1
    assert notified(actions) == []
    # An unmuted problem in the same halt is announced, and only it.
    world.answers["load"] = "fail"
    world.metrics["request-success-rate"] = LOW_SUCCESS
    actions = world.tick()
    assert len(warnings(actions)) == 3
    (alert,) = [a.message for a in of(Notify, actions)]
    assert alert == (
        "Halt podinfo.test advancement success rate 61.39% < 99%; external check load failed "
        "HTTP 500 Internal Server Error (failed checks 2/3)"
    )
    # The rollback is announced whatever caused it.
    world.answers.pop("load")
    world.metrics["request-success-rate"] = PASSING["request-success-rate"]
    actions = world.tick()
    assert world.status.phase == "Failed"
    assert notified(actions) == ["failed"]


def test_a_muted_pre_rollout_gate_halts_without_an_alert() -> None:
    gates = [hook("migrate", "pre-rollout", muteAlert=True)]
    world = World(spec(webhooks=gates), started(), answers={"migrate": "fail"})
    world.tick()  # taken up; pre-rollout waits for a ready canary seen at the previous tick
    actions = world.tick()
    assert "Halt podinfo.test advancement pre-rollout check migrate failed" in " ".join(
        warnings(actions)
    )
    assert world.status.failed_checks == 1
    assert "halted" not in notified(actions)
