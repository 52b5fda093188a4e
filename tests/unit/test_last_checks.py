"""status.lastChecks: what the last judged interval measured, for people (kubectl perch status).

The analyzer's step records it; the webhook and a retry drop it when another analysis starts; it
survives the wire and fits the Canary CRD; a status written before the field existed reads as
having none.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from analyzer.model import MetricResult
from analyzer.step import step
from perch.status import CanaryStatus, LastCheck, analysis_started
from tests.unit.test_step import (
    LOW_SUCCESS,
    NEWER,
    REV,
    SLOW,
    World,
    analysing,
    hook,
    spec,
)
from tests.validation import validate


def _canary(status: CanaryStatus) -> dict[str, object]:
    return {
        "apiVersion": "perch.dev/v1alpha1",
        "kind": "Canary",
        "metadata": {"name": "podinfo", "namespace": "test"},
        "spec": {"targetRef": {"name": "podinfo"}},
        "status": json.loads(json.dumps(status.to_wire(), allow_nan=False)),
    }


def test_a_judged_interval_records_each_metric_and_rollout_gate() -> None:
    world = World(
        spec(
            metrics=[
                {"name": "request-success-rate", "thresholdRange": {"min": 99}},
                {"name": "request-duration", "thresholdRange": {"max": 500}},
            ],
            webhooks=[hook("load-test", "rollout")],
        ),
        analysing(10),
        answers={"load-test": "fail"},
    )
    world.metrics["request-duration"] = SLOW
    world.tick()
    assert world.status.failed_checks == 1
    assert world.status.last_checks == (
        LastCheck(
            "request-success-rate",
            "pass",
            value=99.9,
            min=99.0,
            message="success rate 99.90%",
        ),
        LastCheck(
            "request-duration",
            "fail",
            value=1515.0,
            max=500.0,
            message="request duration 1.515s > 500ms",
        ),
        LastCheck("load-test", "fail", kind="gate", message="HTTP 500 Internal Server Error"),
    )
    validate(_canary(world.status))


def test_the_last_checks_are_those_of_the_latest_interval() -> None:
    world = World(spec(), analysing(10))
    world.metrics["request-success-rate"] = LOW_SUCCESS
    world.tick()
    assert [c.outcome for c in world.status.last_checks] == ["fail"]
    world.metrics["request-success-rate"] = MetricResult(
        "request-success-rate", "pass", 99.5, "success rate 99.50%"
    )
    world.tick()
    assert [(c.outcome, c.value) for c in world.status.last_checks] == [("pass", 99.5)]
    assert world.status.canary_weight == 20


def test_the_first_step_judges_no_metric_and_records_none() -> None:
    world = World(spec(), analysing(0))
    world.tick()
    assert world.status.canary_weight == 10
    assert world.status.last_checks == ()


def test_no_data_and_errors_are_recorded_without_a_value() -> None:
    world = World(spec(), analysing(10))
    world.metrics["request-success-rate"] = MetricResult(
        "request-success-rate", "no-data", None, "no data for metric request-success-rate"
    )
    world.tick()
    (check,) = world.status.last_checks
    assert (check.outcome, check.value, check.min) == ("no-data", None, 99.0)
    assert "value" not in check.to_wire()


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_value_json_cannot_carry_is_dropped(value: float) -> None:
    check = LastCheck("error-ratio", "no-data", value=value, max=2)
    assert check.value is None
    json.dumps(check.to_wire(), allow_nan=False)


def test_a_long_message_is_cut() -> None:
    check = LastCheck("m", "error", message="x" * 5000)
    assert len(check.to_wire()["message"]) == 300


def test_the_status_keeps_them_across_the_wire_and_old_statuses_have_none() -> None:
    status = analysing(
        20,
        last_checks=(
            LastCheck("request-success-rate", "pass", value=99.87, min=99),
            LastCheck("load-test", "timeout", kind="gate", message="timed out after 5s"),
        ),
    )
    assert CanaryStatus.from_wire(json.loads(json.dumps(status.to_wire()))) == status
    old = status.to_wire()
    del old["lastChecks"]
    assert CanaryStatus.from_wire(old).last_checks == ()
    validate(_canary(status))


def test_a_new_revision_drops_the_previous_analysis_checks() -> None:
    status = analysing(20, last_checks=(LastCheck("request-success-rate", "fail", value=61.4),))
    restarted = analysis_started(status, revision=NEWER, at=datetime(2026, 11, 26, tzinfo=UTC))
    assert restarted.last_checks == ()
    # A status whose revision changed by any other way: the step drops them too.
    changed = replace(status, canary_revision=NEWER)
    new, _ = step(spec(), changed, World(spec(), changed).observe(), name="p", namespace="t")
    assert new.last_checks == ()


def test_a_retry_drops_the_failed_analysis_checks() -> None:
    world = World(spec(threshold=1), analysing(10))
    world.metrics["request-success-rate"] = LOW_SUCCESS
    world.tick()
    assert world.status.phase == "Failed"
    assert world.status.last_checks[0].outcome == "fail"
    world.control = "retry"
    world.tick()
    assert world.status.phase == "Progressing"
    assert world.status.canary_revision == REV
    assert world.status.last_checks == ()
