"""`kubectl perch status NAME`: one release at a glance, rendered from the Canary object and the
Deployment's spec, in every phase and for each strategy; colour only where it belongs; following a
release until it ends."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator, Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import ProtocolError

from perch.plugin.glance import glance, plan, render
from perch.plugin.render import Style, colour_wanted, duration
from perch.plugin.status import Gone, Screen, follow, status_table
from perch.status import (
    CanaryStatus,
    LastCheck,
    Phase,
    analysis_started,
    entered,
    initialized,
)
from perch.status import timestamp as stamp
from tests.seed import SEED_SPEC_CURRENT, podinfo

NOW = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)
STABLE = "v1-3f9c2a0e11d4b7c8"
REV = "v1-1c0f3e8a9b7d2e44"
SEED_STEPS = tuple(range(5, 55, 5))

AB_SPEC = """\
service: {port: 9898}
analysis:
  interval: 1m
  threshold: 2
  iterations: 10
  match:
  - headers: {x-canary: {exact: insider}}
  metrics:
  - name: request-success-rate
    thresholdRange: {min: 99}
"""
BLUE_GREEN_SPEC = """\
service: {port: 9898}
analysis:
  interval: 1m
  threshold: 2
  iterations: 5
  mirror: true
  mirrorWeight: 50
"""
GATED_SPEC = """\
service: {port: 9898}
analysis:
  interval: 30s
  threshold: 5
  stepWeights: [1, 5, 25, 50]
  metrics:
  - name: error-ratio
    query: sum(rate(errors[1m]))
    thresholdRange: {max: 2}
    onNoData: skip
  - name: request-duration
    thresholdRange: {max: 500}
    primary: {maxRatio: 1.5}
  webhooks:
  - {name: approve, type: confirm-rollout, url: http://gates.test/approve}
  - {name: smoke, type: pre-rollout, url: http://gates.test/smoke}
  - {name: load-test, type: rollout, url: http://gates.test/load}
  - {name: ship-it, type: confirm-promotion, url: http://gates.test/ship, maxWait: 10m}
  - {name: announce, type: post-rollout, url: http://gates.test/announce}
"""


def status_in(phase: Phase, *, ago: timedelta = timedelta(minutes=2, seconds=13), **fields: Any):
    base = analysis_started(initialized(revision=STABLE, at=NOW), revision=REV, at=NOW)
    base = replace(base, analysed_revision=REV, **fields)
    return entered(base, phase, at=NOW - ago)


def canary(status: CanaryStatus) -> dict[str, Any]:
    return {
        "apiVersion": "perch.dev/v1alpha1",
        "kind": "Canary",
        "metadata": {"name": "podinfo", "namespace": "test", "resourceVersion": "7"},
        "spec": {"targetRef": {"name": "podinfo"}},
        "status": status.to_wire(),
    }


def show(status: CanaryStatus, spec: str | None = SEED_SPEC_CURRENT, **kw: Any) -> str:
    deployment = podinfo(spec=spec) if spec is not None else None
    return render(glance(canary(status), deployment, **kw), now=NOW)


def field(text: str, label: str) -> str:
    for line in text.splitlines():
        if line.startswith(label + ":"):
            return line[len(label) + 1 :].strip()
    raise AssertionError(f"no {label} in\n{text}")


def section(text: str, label: str) -> list[str]:
    """The indented lines under `Label:`."""
    lines = text.splitlines()
    start = lines.index(label + ":") + 1
    body = []
    for line in lines[start:]:
        if not line.startswith("  "):
            break
        body.append(line.split())
    return [" ".join(words) for words in body]


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("weight", "shown"),
    [
        (0, "[0] 5 10 ... 50"),
        (5, "[5] 10 ... 50"),
        (15, "5 10 [15] 20 ... 50"),
        (30, "5 10 ... 25 [30] 35 ... 50"),
        (45, "5 10 ... 40 [45] 50"),
        (50, "5 10 ... 45 [50]"),
        # Not a step (a route restored, a promotion's route back): the plan, unmarked.
        (12, "5 10 ... 50"),
    ],
)
def test_the_seed_plan_around_the_current_step(weight: int, shown: str) -> None:
    assert plan(SEED_STEPS, weight, started=True) == shown


def test_a_short_plan_is_shown_whole() -> None:
    assert plan((1, 5, 25, 50), 25) == "1 5 [25] 50"
    assert plan((1, 5, 25, 50), 0, started=True) == "[0] 1 5 25 50"
    # Outside an analysis (no release, or after one) weight 0 is not a step of the plan.
    assert plan((1, 5, 25, 50), 0) == "1 5 25 50"
    assert plan((), 0) == ""


# --------------------------------------------------------------------------------------------
# Each phase
# --------------------------------------------------------------------------------------------


def test_progressing_at_a_glance() -> None:
    status = status_in(
        "Progressing",
        canary_weight=15,
        failed_checks=1,
        last_checks=(
            LastCheck("request-success-rate", "pass", value=99.87, min=99),
            LastCheck("request-duration", "fail", value=612.3, max=500, message="request duration"),
        ),
    )
    status = replace(status, last_transition_time=stamp(NOW - timedelta(seconds=12)))
    text = show(status)
    assert text.splitlines()[:3] == [
        "Name:           podinfo",
        "Namespace:      test",
        "Phase:          Progressing for 2m13s (last change 12s ago)",
    ]
    assert field(text, "Canary") == REV
    assert field(text, "Primary") == f"{STABLE} (last good)"
    assert field(text, "Strategy") == "canary"
    assert field(text, "Steps") == "5 10 [15] 20 ... 50"
    assert field(text, "Traffic") == "canary 15%, primary 85%"
    assert field(text, "Failed checks") == "1/10"
    assert section(text, "Metrics") == [
        "request-success-rate 99.87% >= 99% pass",
        "request-duration 612.3ms <= 500ms fail",
    ]
    # The seed's rollout gate, before any judged interval.
    assert section(text, "Gates") == ["rollout load-test each step"]
    assert field(text, "Message") == "New revision detected, progressing canary analysis."


def test_before_any_metric_was_judged() -> None:
    text = show(status_in("Progressing"))
    assert field(text, "Steps") == "[0] 5 10 ... 50"
    assert section(text, "Metrics") == [
        "request-success-rate - >= 99% not measured yet",
        "request-duration - <= 500ms not measured yet",
    ]


def test_paused() -> None:
    text = show(status_in("Progressing", canary_weight=20, paused=True))
    assert field(text, "Phase").startswith("Progressing (paused) for ")


def test_initialized_has_no_release() -> None:
    status = entered(
        initialized(revision=STABLE, at=NOW), "Initialized", at=NOW - timedelta(days=3)
    )
    text = show(status)
    assert field(text, "Phase") == "Initialized for 3d"
    assert "Canary:" not in text
    assert field(text, "Primary") == f"{STABLE} (last good)"
    assert "Gates:" not in text


def test_initializing_from_an_empty_status() -> None:
    text = show(CanaryStatus())
    assert field(text, "Phase") == "Initializing"
    assert field(text, "Failed checks") == "0/10"


def test_waiting_for_confirm_rollout() -> None:
    status = status_in("Waiting", confirm_type="confirm-rollout", confirm_asked_at=stamp(NOW))
    status = entered(
        status, "Waiting", at=NOW - timedelta(minutes=4), message="Waiting for approval approve."
    )
    text = show(status, GATED_SPEC)
    assert field(text, "Phase") == "Waiting for 4m"
    assert field(text, "Steps") == "[0] 1 5 25 50"
    assert section(text, "Gates") == [
        "confirm-rollout approve waiting for approval",
        "pre-rollout smoke pending",
        "rollout load-test each step",
        "confirm-promotion ship-it pending: before the promotion",
        "post-rollout announce after the release",
    ]
    assert field(text, "Message") == "Waiting for approval approve."


def test_gates_passed_and_rollout_outcomes() -> None:
    status = status_in(
        "Progressing",
        canary_weight=25,
        failed_checks=2,
        gates_done=("confirm-rollout", "pre-rollout"),
        last_checks=(
            LastCheck("error-ratio", "no-data", max=2, message="no data for metric error-ratio"),
            LastCheck(
                "request-duration",
                "fail",
                value=900,
                max=500,
                message="request duration 900ms is 2.00× the primary's 450ms (max 1.5×)",
            ),
            LastCheck("load-test", "fail", kind="gate", message="HTTP 500"),
        ),
    )
    text = show(status, GATED_SPEC)
    assert field(text, "Steps") == "1 5 [25] 50"
    assert field(text, "Failed checks") == "2/5"
    assert section(text, "Metrics") == [
        "error-ratio - <= 2 no data (onNoData: skip)",
        "request-duration 900ms <= 500ms, vs primary fail: request duration 900ms is 2.00× "
        "the primary's 450ms (max 1.5×)",
    ]
    assert section(text, "Gates")[:3] == [
        "confirm-rollout approve passed",
        "pre-rollout smoke passed",
        "rollout load-test each step; last: fail (HTTP 500)",
    ]


def test_waiting_promotion_past_its_max_wait() -> None:
    status = status_in(
        "WaitingPromotion",
        canary_weight=50,
        gates_done=("confirm-rollout", "pre-rollout"),
        confirm_type="confirm-promotion",
        confirm_asked_at=stamp(NOW - timedelta(minutes=12)),
        confirm_timed_out=("ship-it",),
    )
    text = show(status, GATED_SPEC)
    assert field(text, "Steps") == "1 5 25 [50]"
    assert "confirm-promotion ship-it waiting for approval (maxWait 10m passed)" in section(
        text, "Gates"
    )


@pytest.mark.parametrize("phase", ["Promoting", "Finalising"])
def test_promoting_and_finalising(phase: Phase) -> None:
    status = status_in(phase, canary_weight=50, handoff_revision=REV, ago=timedelta(seconds=40))
    text = show(status, GATED_SPEC)
    assert field(text, "Phase") == f"{phase} for 40s"
    assert section(text, "Gates")[:4] == [
        "confirm-rollout approve passed",
        "pre-rollout smoke passed",
        "rollout load-test each step",
        "confirm-promotion ship-it passed",
    ]


def test_succeeded() -> None:
    status = status_in(
        "Succeeded",
        last_applied_revision=REV,
        ago=timedelta(seconds=5),
        last_checks=(LastCheck("request-success-rate", "pass", value=100.0, min=99),),
    )
    text = show(status)
    assert field(text, "Phase") == "Succeeded for 5s"
    assert field(text, "Canary") == f"{REV} (promoted)"
    assert field(text, "Steps") == "5 10 ... 50"
    assert field(text, "Traffic") == "canary 0%, primary 100%"
    assert section(text, "Metrics")[0] == "request-success-rate 100% >= 99% pass"
    assert "Gates:" not in text


def test_failed_keeps_the_checks_that_failed_it() -> None:
    status = status_in(
        "Failed",
        failed_checks=10,
        failed_revision=REV,
        last_checks=(LastCheck("request-success-rate", "fail", value=61.39, min=99),),
    )
    text = show(status)
    assert field(text, "Canary") == f"{REV} (failed)"
    assert field(text, "Failed checks") == "10/10"
    assert section(text, "Metrics")[0] == "request-success-rate 61.39% >= 99% fail"
    assert field(text, "Message") == "Canary analysis failed, Deployment scaled to zero."


def test_terminated() -> None:
    assert field(show(status_in("Terminated")), "Phase").startswith("Terminated for ")


# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------


def test_ab_testing_counts_iterations() -> None:
    text = show(status_in("Progressing", iterations=3), AB_SPEC)
    assert field(text, "Strategy") == (
        "A/B testing: requests matching analysis.match go to the canary"
    )
    assert field(text, "Iterations") == "3/10"
    assert "Steps:" not in text
    assert field(text, "Failed checks") == "0/2"


def test_blue_green_with_mirroring_then_all_traffic() -> None:
    text = show(status_in("Progressing", iterations=2), BLUE_GREEN_SPEC)
    assert field(text, "Strategy") == "blue/green, mirroring 50% of the requests to the canary"
    assert field(text, "Iterations") == "2/5"
    switched = show(status_in("Progressing", iterations=6, canary_weight=100), BLUE_GREEN_SPEC)
    assert field(switched, "Iterations") == "5/5, all traffic on the canary"
    assert field(switched, "Traffic") == "canary 100%, primary 0%"


def test_without_a_readable_spec_the_status_alone() -> None:
    status = status_in(
        "Progressing",
        canary_weight=15,
        failed_checks=3,
        last_checks=(LastCheck("request-success-rate", "pass", value=99.5, min=99),),
    )
    missing = show(status, None)
    assert field(missing, "Spec") == "deployment test/podinfo not found"
    assert field(missing, "Failed checks") == "3"
    assert field(missing, "Traffic") == "canary 15%, primary 85%"
    assert "Steps:" not in missing
    assert section(missing, "Metrics") == ["request-success-rate 99.5% >= 99% pass"]
    broken = show(status, "analysis: [1")
    assert field(broken, "Spec").startswith("deployment test/podinfo: invalid perch.dev/spec:")
    forbidden = render(
        glance(canary(status), None, problem="cannot read deployment test/podinfo: forbidden"),
        now=NOW,
    )
    assert field(forbidden, "Spec") == "cannot read deployment test/podinfo: forbidden"


# --------------------------------------------------------------------------------------------
# Colour
# --------------------------------------------------------------------------------------------


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("stream", "env", "wanted"),
    [
        (Tty(), {}, True),
        (Tty(), {"NO_COLOR": "1"}, False),
        # no-color.org: set to a non-empty string; an empty one does not count.
        (Tty(), {"NO_COLOR": ""}, True),
        (Tty(), {"TERM": "dumb"}, False),
        (io.StringIO(), {}, False),
    ],
)
def test_colour_only_on_a_terminal_without_no_color(
    stream: io.StringIO, env: dict[str, str], wanted: bool
) -> None:
    assert colour_wanted(stream, env) is wanted


def test_colour_underlines_what_the_words_say() -> None:
    status = status_in(
        "Failed",
        failed_checks=10,
        failed_revision=REV,
        last_checks=(LastCheck("request-success-rate", "fail", value=61.39, min=99),),
    )
    view = glance(canary(status), podinfo(spec=SEED_SPEC_CURRENT))
    plain = render(view, now=NOW, style=Style(colour=False))
    coloured = render(view, now=NOW, style=Style(colour=True))
    assert "\x1b[" not in plain
    assert "\x1b[31mFailed\x1b[0m" in coloured
    assert "\x1b[31m10/10\x1b[0m" in coloured
    assert "\x1b[31mfail\x1b[0m" in coloured
    # The same layout once the colour is taken away.
    assert re.sub(r"\x1b\[[0-9;]*m", "", coloured) == plain


@pytest.mark.parametrize(
    ("phase", "code"),
    [
        ("Succeeded", "32"),
        ("Progressing", "36"),
        ("WaitingPromotion", "33"),
        ("Terminated", "2"),
    ],
)
def test_phase_colours(phase: Phase, code: str) -> None:
    view = glance(canary(status_in(phase)), podinfo(spec=SEED_SPEC_CURRENT))
    assert f"\x1b[{code}m{phase}\x1b[0m" in render(view, now=NOW, style=Style(colour=True))


def test_the_table_keeps_its_columns_with_or_without_colour() -> None:
    objs = [canary(status_in("Progressing", canary_weight=15, paused=True))]
    plain = status_table(objs).splitlines()
    assert plain[0].split() == [
        "NAMESPACE",
        "NAME",
        "STATUS",
        "WEIGHT",
        "FAILEDCHECKS",
        "REVISION",
        "LASTTRANSITIONTIME",
    ]
    assert plain[1].split()[:6] == ["test", "podinfo", "Progressing", "(paused)", "15", "0"]
    coloured = status_table(objs, Style(colour=True)).splitlines()
    assert coloured[1] == plain[1]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (59, "59s"), (60, "1m"), (133, "2m13s"), (7500, "2h5m"), (90000, "1d1h")],
)
def test_durations(seconds: float, text: str) -> None:
    assert duration(seconds) == text


# --------------------------------------------------------------------------------------------
# Following a release
# --------------------------------------------------------------------------------------------


def version(obj: dict[str, Any], rv: str) -> dict[str, Any]:
    obj["metadata"]["resourceVersion"] = rv
    return obj


def test_follow_shows_each_change_until_the_release_ends() -> None:
    first = canary(status_in("Progressing", canary_weight=5))
    steps = [
        {
            "type": "MODIFIED",
            "object": version(canary(status_in("Progressing", canary_weight=10)), "8"),
        },
        # Only metadata changed: nothing new to show.
        {
            "type": "MODIFIED",
            "object": version(canary(status_in("Progressing", canary_weight=10)), "9"),
        },
        {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "10"}}},
        {"type": "MODIFIED", "object": version(canary(status_in("Succeeded")), "11")},
        {"type": "MODIFIED", "object": version(canary(status_in("Progressing")), "12")},
    ]
    seen: list[str] = []
    shown: list[Mapping[str, Any]] = []

    def watch(rv: str) -> Iterator[Mapping[str, Any]]:
        seen.append(rv)
        yield from steps

    last = follow(first, watch=watch, reread=lambda: None, changed=shown.append)
    assert CanaryStatus.from_wire(last["status"]).phase == "Succeeded"
    assert seen == ["7"]
    assert [CanaryStatus.from_wire(o["status"]).canary_weight for o in shown] == [10, 0]


def test_follow_resumes_where_the_server_closed_the_watch() -> None:
    first = canary(status_in("Progressing"))
    rounds = [
        [
            {
                "type": "MODIFIED",
                "object": version(canary(status_in("Progressing", canary_weight=5)), "8"),
            }
        ],
        [],
        [{"type": "MODIFIED", "object": version(canary(status_in("Failed")), "9")}],
    ]
    seen: list[str] = []

    def watch(rv: str) -> Iterator[Mapping[str, Any]]:
        seen.append(rv)
        yield from rounds.pop(0)

    last = follow(first, watch=watch, reread=lambda: None, changed=lambda _: None)
    assert CanaryStatus.from_wire(last["status"]).phase == "Failed"
    assert seen == ["7", "8", "8"]


def test_follow_rereads_after_410_and_retries_a_dropped_connection() -> None:
    first = canary(status_in("Progressing"))
    newer = version(canary(status_in("Progressing", canary_weight=20)), "40")
    calls: list[str] = []

    def watch(rv: str) -> Iterator[Mapping[str, Any]]:
        calls.append(rv)
        if len(calls) == 1:
            raise ApiException(status=410, reason="Expired")
        if len(calls) == 2:
            raise ProtocolError("connection reset")
        yield {"type": "MODIFIED", "object": version(canary(status_in("Succeeded")), "41")}

    shown: list[Mapping[str, Any]] = []
    last = follow(
        first, watch=watch, reread=lambda: newer, changed=shown.append, sleep=lambda _: None
    )
    assert calls == ["7", "40", "40"]
    assert [CanaryStatus.from_wire(o["status"]).phase for o in shown] == [
        "Progressing",
        "Succeeded",
    ]
    assert CanaryStatus.from_wire(last["status"]).phase == "Succeeded"


def test_follow_gives_up_after_repeated_connection_errors() -> None:
    def watch(rv: str) -> Iterator[Mapping[str, Any]]:
        raise ProtocolError("connection refused")
        yield {}

    with pytest.raises(ProtocolError):
        follow(
            canary(status_in("Progressing")),
            watch=watch,
            reread=lambda: None,
            changed=lambda _: None,
            sleep=lambda _: None,
        )


def test_follow_stops_when_the_canary_is_deleted() -> None:
    def watch(rv: str) -> Iterator[Mapping[str, Any]]:
        yield {"type": "DELETED", "object": canary(status_in("Progressing"))}

    with pytest.raises(Gone):
        follow(
            canary(status_in("Progressing")),
            watch=watch,
            reread=lambda: None,
            changed=lambda _: None,
        )


def test_follow_returns_at_once_for_a_release_that_already_ended() -> None:
    def watch(rv: str) -> Iterator[Mapping[str, Any]]:
        raise AssertionError("no watch needed")

    done = canary(status_in("Failed"))
    assert follow(done, watch=watch, reread=lambda: None, changed=lambda _: None) is done


def test_screen_redraws_in_place_on_a_terminal() -> None:
    out = io.StringIO()
    screen = Screen(out, terminal=True, columns=10)
    screen.show("one\ntwo")
    screen.show("a line longer than ten\nx")
    screen.show("z")
    assert out.getvalue() == (
        "one\ntwo\n"
        "\x1b[2F\x1b[J" + "a line longer than ten\nx\n"
        # Three rows for the wrapped line, one for x.
        "\x1b[4F\x1b[J" + "z\n"
    )


def test_screen_appends_elsewhere() -> None:
    out = io.StringIO()
    screen = Screen(out, terminal=False)
    screen.show("one")
    screen.show("two")
    assert out.getvalue() == "one\n\ntwo\n"
