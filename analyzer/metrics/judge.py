"""Turn a measured value into a :class:`~analyzer.model.MetricResult`, in Flagger's words.

Flagger halts with "Halt podinfo.test advancement success rate 61.39% < 99%"; the message here is
the part after "advancement" (the analyzer adds the rest), so the event line reads the same:

* request-success-rate: ``success rate 61.39% < 99%`` (value with two decimals, bound as given);
* request-duration: ``request duration 1.500s > 500ms`` (Flagger prints Go durations; here a
  duration of a second or more is in seconds with three decimals, a shorter one in
  milliseconds);
* custom metrics: ``error-ratio 3.20 > 2``;
* no data: ``no data for metric request-success-rate`` (Flagger says "no values found"; Perch
  names the outcome, which is not a number and which a metric's ``onNoData`` may turn into a pass
  or a skip).

Comparative checks (beyond Flagger) judge the canary against the primary over the same window:
:func:`judge_relative`.

Pure: no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from analyzer.model import MetricResult
from perch.spec import Metric

__all__ = [
    "format_bound",
    "format_duration_ms",
    "format_value",
    "judge",
    "judge_relative",
    "no_data",
    "query_failed",
]


def format_bound(value: float) -> str:
    """A threshold as Go's ``%v`` prints a float64: ``99``, ``99.5``, ``0.001``."""
    # float(): the spec may hold ints, which have no is_integer() before Python 3.12.
    number = float(value)
    if number.is_integer() and abs(number) < 1e21:
        return str(int(number))
    return repr(number)


def format_duration_ms(ms: float) -> str:
    """``1.500s`` from 1500, ``250ms`` from 250, ``0.5ms`` from 0.5."""
    if abs(ms) >= 1000:
        return f"{ms / 1000:.3f}s"
    # Two decimals at most, so that 500.4 > 500 does not print as "500ms > 500ms".
    text = f"{ms:.2f}".rstrip("0").rstrip(".")
    return f"{text}ms"


def format_value(metric: Metric, value: float) -> str:
    """The measured value in the metric's wording: ``success rate 61.39%``."""
    if metric.builtin == "request-success-rate":
        return f"success rate {value:.2f}%"
    if metric.builtin == "request-duration":
        return f"request duration {format_duration_ms(value)}"
    return f"{metric.name} {value:.2f}"


def _format_threshold(metric: Metric, bound: float) -> str:
    if metric.builtin == "request-success-rate":
        return f"{format_bound(bound)}%"
    if metric.builtin == "request-duration":
        return format_duration_ms(bound)
    return format_bound(bound)


def no_data(name: str, *, of: str | None = None) -> MetricResult:
    """The empty result: no series, or NaN/Inf (no traffic in the window)."""
    suffix = f" of the {of}" if of else ""
    return MetricResult(
        name=name,
        outcome="no-data",
        value=None,
        message=f"no data for metric {name}{suffix}",
    )


def query_failed(name: str, reason: str) -> MetricResult:
    """Prometheus could not answer: unreachable, an HTTP error, a timeout, a malformed answer."""
    return MetricResult(
        name=name, outcome="error", value=None, message=f"Prometheus query failed: {reason}"
    )


def _exceeds(value: float, limit: float) -> bool:
    # 100 - 98.8 is 1.2000000000000028: a value at the limit, give or take float rounding, is
    # within it.
    return value > limit and not math.isclose(value, limit, rel_tol=1e-9, abs_tol=1e-9)


def _percent(value: float) -> str:
    return f"{value:.2f}%"


def _two_decimals(value: float) -> str:
    return f"{value:.2f}"


def judge(metric: Metric, value: float | None) -> MetricResult:
    """Judge a value (in the metric's unit) against the metric's thresholdRange.

    None, NaN and ±Inf are "no-data": Prometheus yields NaN for a ratio or a quantile over a
    window without requests, and Flagger would compare NaN and let it pass.
    """
    if value is None or not math.isfinite(value):
        return no_data(metric.name)
    bounds = metric.threshold_range
    if bounds.min is not None and value < bounds.min:
        message = f"{format_value(metric, value)} < {_format_threshold(metric, bounds.min)}"
        return MetricResult(name=metric.name, outcome="fail", value=value, message=message)
    if bounds.max is not None and value > bounds.max:
        message = f"{format_value(metric, value)} > {_format_threshold(metric, bounds.max)}"
        return MetricResult(name=metric.name, outcome="fail", value=value, message=message)
    return MetricResult(
        name=metric.name, outcome="pass", value=value, message=format_value(metric, value)
    )


def judge_relative(
    canary_value: float | None,
    primary_value: float | None,
    *,
    metric: Metric,
    max_delta: float | None = None,
    max_ratio: float | None = None,
) -> MetricResult:
    """Judge the canary against the primary over the same window.

    ``max_delta``: how much worse the canary may be, in the metric's unit. ``max_ratio``: how many
    times the primary's value the canary may reach. Worse means higher, except for
    request-success-rate, which is judged on its error rate (100 - success rate) so that both
    limits read naturally: "error rate at most 1 point above the primary's", "p99 at most 1.5
    times the primary's". A ratio against a primary of 0 passes only a canary at 0 too (use
    ``max_delta`` for error rates, which are often 0); a ratio against a negative primary is an
    "error". The result's value is the canary's, in the metric's own unit.
    """
    if max_delta is None and max_ratio is None:
        raise ValueError("judge_relative needs max_delta, max_ratio or both")
    for limit, label in ((max_delta, "max_delta"), (max_ratio, "max_ratio")):
        if limit is not None and (not math.isfinite(limit) or limit < 0):
            raise ValueError(f"{label} must be a finite number >= 0, got {limit!r}")
    if canary_value is None or not math.isfinite(canary_value):
        return no_data(metric.name)
    if primary_value is None or not math.isfinite(primary_value):
        return no_data(metric.name, of="primary")

    show: Callable[[float], str]
    show_delta: Callable[[float], str]
    if metric.builtin == "request-success-rate":
        canary, primary = 100.0 - canary_value, 100.0 - primary_value
        subject, show, show_delta, delta_unit = "error rate", _percent, format_bound, " points"
    elif metric.builtin == "request-duration":
        canary, primary = canary_value, primary_value
        subject, show, show_delta, delta_unit = (
            "request duration",
            format_duration_ms,
            format_duration_ms,
            "",
        )
    else:
        canary, primary = canary_value, primary_value
        subject, show, show_delta, delta_unit = metric.name, _two_decimals, format_bound, ""
    if max_ratio is not None and primary < 0:
        return MetricResult(
            name=metric.name,
            outcome="error",
            value=canary_value,
            message=f"cannot compare {subject} as a ratio: the primary's value {show(primary)} "
            "is negative",
        )

    against = f"the primary's {show(primary)}"
    excess = canary - primary
    if max_delta is not None and _exceeds(excess, max_delta):
        unit = delta_unit
        if delta_unit and max_delta == 1:
            unit = delta_unit.rstrip("s")
        return MetricResult(
            name=metric.name,
            outcome="fail",
            value=canary_value,
            message=f"{subject} {show(canary)} is {show_delta(round(excess, 2))}{delta_unit} "
            f"above {against} (max {show_delta(max_delta)}{unit})",
        )
    if max_ratio is not None and _exceeds(canary, max_ratio * primary):
        # A zero baseline has no finite ratio; say what was exceeded instead.
        times = (
            f"{canary / primary:.2f}×" if primary > 0 else f"more than {format_bound(max_ratio)}×"
        )
        return MetricResult(
            name=metric.name,
            outcome="fail",
            value=canary_value,
            message=f"{subject} {show(canary)} is {times} {against} "
            f"(max {format_bound(max_ratio)}×)",
        )
    return MetricResult(
        name=metric.name,
        outcome="pass",
        value=canary_value,
        message=f"{subject} {show(canary)} against {against}",
    )
