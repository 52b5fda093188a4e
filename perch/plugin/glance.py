"""One release at a glance: what `kubectl perch status NAME` shows, from the Canary object and the
Deployment's spec.

The Canary's status says where the release is (phase, weight, iterations, failed checks, the
gates passed, the last checks); the spec on the Deployment says where it is going (the steps, the
threshold, the gates still to come), as the analyzer reads it at each tick. Without a readable
spec the view shows what the status alone says. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from perch.names import ANNOTATION_SPEC
from perch.plugin.render import Style, Tone, duration, fields, milliseconds, number, table
from perch.spec import CanarySpec, Metric, SpecError, WebhookType
from perch.speccache import cached_parse_spec
from perch.status import ACTIVE_PHASES, ANALYSING_PHASES, CanaryStatus, LastCheck

# The phases that end a release: `status -w` stops at them.
DONE_PHASES = frozenset({"Succeeded", "Failed", "Terminated"})

_PHASE_TONE: dict[str, Tone] = {
    "Succeeded": "good",
    "Failed": "bad",
    "Waiting": "warn",
    "WaitingPromotion": "warn",
    "Progressing": "active",
    "Promoting": "active",
    "Finalising": "active",
    "Terminated": "muted",
}
_OUTCOME_TONE: dict[str, Tone] = {
    "pass": "good",
    "fail": "bad",
    "error": "bad",
    "timeout": "bad",
    "no-data": "warn",
}
# A plan longer than this is shown around the current step: 5 10 [15] 20 ... 50.
FULL_PLAN_STEPS = 7


@dataclass(frozen=True, slots=True)
class MetricRow:
    name: str
    # None: not measured yet in this analysis.
    check: LastCheck | None
    min: float | None
    max: float | None
    unit: str  # "%", "ms" or "" (the metric's own unit)
    against_primary: bool = False
    on_no_data: str = "fail"


@dataclass(frozen=True, slots=True)
class GateRow:
    type: WebhookType
    name: str
    state: str
    tone: Tone = ""


@dataclass(frozen=True, slots=True)
class Glance:
    namespace: str
    name: str
    status: CanaryStatus
    spec: CanarySpec | None
    # Why the spec could not be read ("" when it was): the plan is then what the status says.
    spec_problem: str
    metrics: tuple[MetricRow, ...]
    gates: tuple[GateRow, ...]

    @property
    def done(self) -> bool:
        return self.status.phase in DONE_PHASES


def glance(
    canary: Mapping[str, Any], deployment: Mapping[str, Any] | None, *, problem: str = ""
) -> Glance:
    """The view of the release that `canary` (a Canary object) records, with the spec of its
    Deployment (None when it could not be read; `problem` then says why)."""
    meta = canary.get("metadata") or {}
    namespace, name = str(meta.get("namespace") or ""), str(meta.get("name") or "")
    status = CanaryStatus.from_wire(canary.get("status"))
    spec: CanarySpec | None = None
    if deployment is None:
        problem = problem or f"deployment {namespace}/{name} not found"
    else:
        annotations = (deployment.get("metadata") or {}).get("annotations") or {}
        try:
            spec = cached_parse_spec(annotations.get(ANNOTATION_SPEC))
        except SpecError as err:
            problem = f"deployment {namespace}/{name}: invalid {err}"
    return Glance(
        namespace=namespace,
        name=name,
        status=status,
        spec=spec,
        spec_problem=problem,
        metrics=_metric_rows(spec, status),
        gates=_gate_rows(spec, status) if spec is not None else (),
    )


# The builtins' names, also in Flagger's early form, for checks whose spec is not at hand.
_PERCENT_NAMES = ("request-success-rate", "istio_requests_total")
_MS_NAMES = ("request-duration", "istio_request_duration_seconds_bucket")


def _unit(metric: Metric | None, name: str) -> str:
    """The unit of the builtins' values and thresholds; a custom query's is its own."""
    builtin = metric.builtin if metric is not None else None
    if builtin == "request-success-rate" or (builtin is None and name in _PERCENT_NAMES):
        return "%"
    if builtin == "request-duration" or (builtin is None and name in _MS_NAMES):
        return "ms"
    return ""


def _metric_rows(spec: CanarySpec | None, status: CanaryStatus) -> tuple[MetricRow, ...]:
    checks = {c.name: c for c in status.last_checks if c.kind == "metric"}
    rows: list[MetricRow] = []
    for metric in spec.analysis.metrics if spec is not None else ():
        bounds = metric.threshold_range
        rows.append(
            MetricRow(
                name=metric.name,
                check=checks.pop(metric.name, None),
                min=bounds.min,
                max=bounds.max,
                unit=_unit(metric, metric.name),
                against_primary=metric.primary is not None,
                on_no_data=metric.on_no_data,
            )
        )
    # Checks the spec no longer names (it changed since), or all of them without a spec.
    for check in checks.values():
        rows.append(
            MetricRow(
                name=check.name,
                check=check,
                min=check.min,
                max=check.max,
                unit=_unit(None, check.name),
            )
        )
    return tuple(rows)


_ONE_SHOT: tuple[WebhookType, ...] = ("confirm-rollout", "pre-rollout")


def _gate_rows(spec: CanarySpec, status: CanaryStatus) -> tuple[GateRow, ...]:
    """Each gate of the spec and where it stands, while a release is in progress."""
    if status.phase not in ACTIVE_PHASES:
        return ()
    copied = status.phase in ("Promoting", "Finalising")
    last = {c.name: c for c in status.last_checks if c.kind == "gate"}
    rows: list[GateRow] = []
    for hook in spec.analysis.webhooks:
        kind = hook.type
        state: str
        tone: Tone
        if status.confirm_type == kind:
            state, tone = "waiting for approval", "warn"
            if hook.name in status.confirm_timed_out:
                state += f" (maxWait {hook.max_wait} passed)"
        elif kind in _ONE_SHOT:
            passed = kind in status.gates_done or copied
            state, tone = ("passed", "good") if passed else ("pending", "warn")
        elif kind == "confirm-promotion":
            if copied:
                state, tone = "passed", "good"
            elif status.phase == "WaitingPromotion":
                state, tone = "waiting for approval", "warn"
            else:
                state, tone = "pending: before the promotion", ""
        elif kind == "confirm-traffic-increase":
            state, tone = ("passed", "good") if copied else ("before each step", "")
        elif kind == "rollout":
            check = last.get(hook.name)
            if check is None:
                state, tone = "each step", ""
            else:
                state = f"each step; last: {check.outcome}"
                if check.message:
                    state += f" ({check.message})"
                tone = _OUTCOME_TONE.get(check.outcome, "")
        elif kind == "rollback":
            state, tone = "asked each step (2xx rolls back)", ""
        elif kind == "post-rollout":
            state, tone = "after the release", "muted"
        else:
            state, tone = "on each event", "muted"
        rows.append(GateRow(type=kind, name=hook.name, state=state, tone=tone))
    return tuple(rows)


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------


def plan(
    steps: Sequence[int], weight: int, *, started: bool = False, full: int = FULL_PLAN_STEPS
) -> str:
    """The weights with the current one in brackets: `5 10 [15] 20 ... 50`; `[0] 5 10 ... 50`
    before the first step of an analysis (`started`). A long plan keeps its first two, the
    neighbours of the current step and the last."""
    if not steps:
        return ""
    current = steps.index(weight) if weight in steps else -1
    shown = set(range(len(steps))) if len(steps) <= full else {0, 1, len(steps) - 1}
    if current >= 0:
        shown |= {i for i in (current - 1, current, current + 1) if 0 <= i < len(steps)}
    words = ["[0]"] if weight == 0 and started else []
    previous = -1
    for i in sorted(shown):
        if i > previous + 1:
            words.append("...")
        words.append(f"[{steps[i]}]" if i == current else str(steps[i]))
        previous = i
    return " ".join(words)


def _since(stamp: str, now: datetime) -> float | None:
    try:
        at = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return None
    at = at if at.tzinfo is not None else at.replace(tzinfo=UTC)
    return (now - at).total_seconds()


def _phase_entered(status: CanaryStatus) -> str:
    if status.phase_entered_at:
        return status.phase_entered_at
    for condition in status.conditions:
        if condition.get("type") == "Promoted" and condition.get("lastTransitionTime"):
            return str(condition["lastTransitionTime"])
    return status.last_transition_time


def _value(value: float, unit: str) -> str:
    if unit == "ms":
        return milliseconds(value)
    return number(value) + unit


def _threshold(row: MetricRow) -> str:
    def bound(value: float) -> str:
        return _value(value, row.unit)

    parts = []
    if row.min is not None:
        parts.append(f">= {bound(row.min)}")
    if row.max is not None:
        parts.append(f"<= {bound(row.max)}")
    if row.against_primary:
        parts.append("vs primary")
    return ", ".join(parts) or "-"


def _result(row: MetricRow, style: Style) -> str:
    check = row.check
    if check is None:
        return style("not measured yet", "muted")
    outcome = check.outcome
    words = "no data" if outcome == "no-data" else outcome
    if outcome == "no-data" and row.on_no_data != "fail":
        words += f" (onNoData: {row.on_no_data})"
    text = style(words, _OUTCOME_TONE.get(outcome, ""))
    # A pass's or a threshold failure's message only repeats the value; others explain.
    explains = outcome in ("error", "timeout") or (outcome == "fail" and row.against_primary)
    if explains and check.message:
        text += f": {check.message}"
    return text


def _strategy(spec: CanarySpec) -> str:
    analysis = spec.analysis
    if analysis.strategy == "ab-testing":
        return "A/B testing: requests matching analysis.match go to the canary"
    if analysis.strategy == "blue-green":
        if analysis.mirror:
            share = analysis.mirror_weight if analysis.mirror_weight is not None else 100
            return f"blue/green, mirroring {share}% of the requests to the canary"
        return "blue/green"
    words = "canary"
    if analysis.session_affinity is not None:
        words += ", session affinity"
    return words


def _progress(g: Glance) -> list[tuple[str, str]]:
    s, spec = g.status, g.spec
    traffic = f"canary {s.canary_weight}%, primary {100 - s.canary_weight}%"
    if spec is None:
        iterations = [("Iterations", str(s.iterations))] if s.iterations else []
        return [*iterations, ("Traffic", traffic)]
    analysis = spec.analysis
    rows = [("Strategy", _strategy(spec))]
    if analysis.strategy == "canary":
        analysing = s.phase in ANALYSING_PHASES
        rows.append(("Steps", plan(analysis.steps, s.canary_weight, started=analysing)))
    else:
        total = analysis.iterations or 0
        done = f"{min(s.iterations, total)}/{total}"
        if analysis.strategy == "blue-green" and s.iterations > total:
            done += ", all traffic on the canary"
        rows.append(("Iterations", done))
    rows.append(("Traffic", traffic))
    return rows


def render(g: Glance, *, now: datetime, style: Style | None = None) -> str:
    """The view as text, times counted back from `now`."""
    style = style or Style()
    s = g.status
    phase = style(s.phase, _PHASE_TONE.get(s.phase, ""))
    if s.paused:
        phase += " " + style("(paused)", "warn")
    entered = _since(_phase_entered(s), now)
    if entered is not None:
        phase += f" for {duration(entered)}"
    changed = _since(s.last_transition_time, now)
    if changed is not None and s.last_transition_time != _phase_entered(s):
        phase += style(f" (last change {duration(changed)} ago)", "muted")

    pairs: list[tuple[str, str]] = [("Name", g.name), ("Namespace", g.namespace), ("Phase", phase)]
    if s.canary_revision:
        canary = s.canary_revision
        if s.failed_revision == s.canary_revision:
            canary += " " + style("(failed)", "bad")
        elif s.phase == "Succeeded" and s.last_applied_revision == s.canary_revision:
            canary += " " + style("(promoted)", "good")
        pairs.append(("Canary", canary))
    if s.last_applied_revision:
        pairs.append(("Primary", f"{s.last_applied_revision} (last good)"))
    if s.analysis_restarts:
        replaced = "a newer revision replaced the one under analysis"
        pairs.append(("Restarts", f"{s.analysis_restarts} ({replaced})"))
    pairs += _progress(g)
    threshold = g.spec.analysis.threshold if g.spec is not None else None
    failed = str(s.failed_checks) + (f"/{threshold}" if threshold is not None else "")
    tone: Tone = ""
    if s.failed_checks:
        tone = "bad" if threshold is not None and s.failed_checks >= threshold else "warn"
    pairs.append(("Failed checks", style(failed, tone)))

    tail: list[tuple[str, str]] = []
    message = next((str(c.get("message")) for c in s.conditions if c.get("type") == "Promoted"), "")
    if message:
        tail.append(("Message", message))
    if g.spec_problem:
        tail.append(("Spec", style(g.spec_problem, "warn")))
    width = max(len(label) for label, _ in (*pairs, *tail)) + 3

    lines = fields(pairs, width=width)
    if g.metrics:
        lines.append("Metrics:")
        rows = [
            (
                row.name,
                _value(row.check.value, row.unit)
                if row.check is not None and row.check.value is not None
                else "-",
                _threshold(row),
                _result(row, style),
            )
            for row in g.metrics
        ]
        lines += table(rows, indent="  ")
    if g.gates:
        lines.append("Gates:")
        lines += table(
            [(gate.type, gate.name, style(gate.state, gate.tone)) for gate in g.gates], indent="  "
        )
    lines += fields(tail, width=width)
    return "\n".join(lines)
