"""Comparative checks end to end: ``primary: {maxDelta, maxRatio}`` in the spec, judged by the
analyzer's MetricBatcher against a real Prometheus server, and the halt line step() writes.

Istio series for the primary ``podinfo`` and its canary ``podinfo-canary`` (namespace ``test``)
are backfilled at fixed past times with promtool and every check is evaluated ``at`` a fixed
instant, so the numbers are the same on every run. The primary answers 0.20 % of requests with 500
and takes 50 ms for all of them (p99 49.75 ms, as ``histogram_quantile`` interpolates in Istio's
25-50 ms bucket) from T0 for 70 minutes. The canary:

* CLOSE (T0 + 9 min): 0.50 % errors, 1.25 % of requests at 75 ms: p99 60 ms (1.21x the primary's);
* WORSE (T0 + 1 h 9 min): 3.10 % errors, every request at 75 ms: p99 99.5 ms (2x the primary's);
* ALONE (T0 + 2 h 9 min): as in CLOSE, but the primary has no series any more.

The combination of a thresholdRange check with a comparison (``MetricBatcher.combine``) is also
checked without Prometheus, and so is the batcher's sharing of one measurement between canaries
with different thresholds.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from analyzer.metrics import PrometheusProvider
from analyzer.model import Event, MetricOutcome, MetricResult, Observations, Workload
from analyzer.service import MetricBatcher
from analyzer.step import step
from perch.spec import CanarySpec, Metric, parse_spec
from perch.status import analysis_started, initialized
from tests.support.prometheus import (
    PrometheusServer,
    Traffic,
    istio_openmetrics,
    missing_binaries,
)

needs_prometheus = pytest.mark.skipif(
    missing_binaries() is not None, reason=str(missing_binaries())
)

T0 = datetime(2024, 6, 3, 12, 0, tzinfo=UTC)
WINDOW = timedelta(minutes=10)
CLOSE_AT = T0 + timedelta(minutes=9)
WORSE_AT = T0 + timedelta(hours=1, minutes=9)
ALONE_AT = T0 + timedelta(hours=2, minutes=9)

PRIMARY = Traffic("podinfo", error_ratio=0.002)
CANARY_CLOSE = Traffic(
    "podinfo-canary", error_ratio=0.005, latencies_ms={50.0: 0.9875, 75.0: 0.0125}
)
CANARY_WORSE = Traffic("podinfo-canary", error_ratio=0.031, latencies_ms={75.0: 1.0})


def spec_with(*metrics: dict[str, Any]) -> CanarySpec:
    """The seed's shape (30 s interval, 1 m metric windows) with the given metrics."""
    document = {
        "service": {"port": 9898},
        "analysis": {
            "interval": "30s",
            "threshold": 3,
            "maxWeight": 50,
            "stepWeight": 10,
            "metrics": [{"interval": "1m", **metric} for metric in metrics],
        },
    }
    return parse_spec(json.dumps(document))


def error_rate(**more: Any) -> dict[str, Any]:
    return {"name": "request-success-rate", "primary": {"maxDelta": 1}, **more}


def p99(**more: Any) -> dict[str, Any]:
    return {"name": "request-duration", "primary": {"maxRatio": 1.5}, **more}


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    server = PrometheusServer(tmp_path_factory.mktemp("prometheus-comparative"))
    server.backfill(istio_openmetrics([PRIMARY], start=T0, end=T0 + timedelta(minutes=70)))
    for start, canary in (
        (T0, CANARY_CLOSE),
        (T0 + timedelta(hours=1), CANARY_WORSE),
        (T0 + timedelta(hours=2), CANARY_CLOSE),
    ):
        server.backfill(istio_openmetrics([canary], start=start, end=start + WINDOW))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def provider(prometheus: PrometheusServer) -> Iterator[PrometheusProvider]:
    client = PrometheusProvider(prometheus.url)
    yield client
    client.close()


@pytest.fixture
def batcher(provider: PrometheusProvider) -> MetricBatcher:
    # Another canary in the namespace, so that the thresholdRange query is a batched one.
    return MetricBatcher(provider, canaries=lambda namespace: ["podinfo-canary", "other-canary"])


def judged(batcher: MetricBatcher, spec: CanarySpec, at: datetime) -> MetricResult:
    (metric,) = spec.analysis.metrics
    return batcher.evaluate("test", spec, metric, target="podinfo-canary", primary="podinfo", at=at)


# --- the comparison alone ------------------------------------------------------------------


@needs_prometheus
@pytest.mark.parametrize(
    ("metric", "at", "outcome", "value", "message"),
    [
        pytest.param(
            error_rate(),
            CLOSE_AT,
            "pass",
            99.5,
            "error rate 0.50% against the primary's 0.20%",
            id="error-rate-0.3-points-above-passes-max-delta-1",
        ),
        pytest.param(
            error_rate(),
            WORSE_AT,
            "fail",
            96.9,
            "error rate 3.10% is 2.9 points above the primary's 0.20% (max 1 point)",
            id="error-rate-2.9-points-above-fails-max-delta-1",
        ),
        pytest.param(
            p99(),
            CLOSE_AT,
            "pass",
            60.0,
            "request duration 60ms against the primary's 49.75ms",
            id="p99-1.2x-passes-max-ratio-1.5",
        ),
        pytest.param(
            p99(),
            WORSE_AT,
            "fail",
            99.5,
            "request duration 99.5ms is 2.00× the primary's 49.75ms (max 1.5×)",
            id="p99-2x-fails-max-ratio-1.5",
        ),
        pytest.param(
            error_rate(),
            ALONE_AT,
            "no-data",
            None,
            "no data for metric request-success-rate of the primary",
            id="primary-without-data",
        ),
        pytest.param(
            p99(),
            ALONE_AT,
            "no-data",
            None,
            "no data for metric request-duration of the primary",
            id="primary-without-latency-data",
        ),
    ],
)
def test_canary_judged_against_the_primary(
    batcher: MetricBatcher,
    provider: PrometheusProvider,
    metric: dict[str, Any],
    at: datetime,
    outcome: MetricOutcome,
    value: float | None,
    message: str,
) -> None:
    before = provider.calls
    result = judged(batcher, spec_with(metric), at)
    assert (result.outcome, result.message) == (outcome, message)
    assert result.name == metric["name"]
    assert result.value == (None if value is None else pytest.approx(value))
    # Without thresholdRange only the comparison runs: one query for canary and primary.
    assert provider.calls == before + 1


@needs_prometheus
def test_provider_compare_gives_the_same_verdicts(provider: PrometheusProvider) -> None:
    (rate,) = spec_with(error_rate()).analysis.metrics
    (latency,) = spec_with(p99()).analysis.metrics

    def compare(
        metric: Metric,
        at: datetime,
        *,
        max_delta: float | None = None,
        max_ratio: float | None = None,
    ) -> MetricResult:
        return provider.compare(
            "test",
            metric,
            canary="podinfo-canary",
            primary="podinfo",
            max_delta=max_delta,
            max_ratio=max_ratio,
            at=at,
        )

    assert compare(rate, CLOSE_AT, max_delta=1).outcome == "pass"
    assert compare(rate, WORSE_AT, max_delta=1).outcome == "fail"
    # 2.9 points is within a looser limit.
    assert compare(rate, WORSE_AT, max_delta=3).outcome == "pass"
    assert compare(latency, CLOSE_AT, max_ratio=1.5).outcome == "pass"
    assert compare(latency, WORSE_AT, max_ratio=1.5).outcome == "fail"
    assert compare(latency, WORSE_AT, max_ratio=2).outcome == "pass"  # exactly 2x
    assert compare(latency, CLOSE_AT, max_delta=5).message == (
        "request duration 60ms is 10.25ms above the primary's 49.75ms (max 5ms)"
    )


# --- thresholdRange and comparison together ------------------------------------------------


@needs_prometheus
@pytest.mark.parametrize(
    ("metric", "at", "outcome", "message"),
    [
        pytest.param(
            error_rate(thresholdRange={"min": 99}),
            CLOSE_AT,
            "pass",
            "success rate 99.50%; error rate 0.50% against the primary's 0.20%",
            id="both-pass",
        ),
        pytest.param(
            error_rate(thresholdRange={"min": 99.9}),
            CLOSE_AT,
            "fail",
            "success rate 99.50% < 99.9%",
            id="only-the-range-fails",
        ),
        pytest.param(
            error_rate(thresholdRange={"min": 90}),
            WORSE_AT,
            "fail",
            "error rate 3.10% is 2.9 points above the primary's 0.20% (max 1 point)",
            id="only-the-comparison-fails",
        ),
        pytest.param(
            error_rate(thresholdRange={"min": 99}),
            WORSE_AT,
            "fail",
            "success rate 96.90% < 99%; "
            "error rate 3.10% is 2.9 points above the primary's 0.20% (max 1 point)",
            id="both-fail",
        ),
        pytest.param(
            p99(thresholdRange={"max": 500}),
            WORSE_AT,
            "fail",
            "request duration 99.5ms is 2.00× the primary's 49.75ms (max 1.5×)",
            id="p99-within-500ms-but-2x-the-primary",
        ),
        pytest.param(
            error_rate(thresholdRange={"min": 99}),
            ALONE_AT,
            "no-data",
            "no data for metric request-success-rate of the primary",
            id="range-passes-primary-without-data",
        ),
        pytest.param(
            # Flagger's early form: a single threshold, here with a comparison.
            {"name": "istio_requests_total", "threshold": 99, "primary": {"maxDelta": 1}},
            WORSE_AT,
            "fail",
            "success rate 96.90% < 99%; "
            "error rate 3.10% is 2.9 points above the primary's 0.20% (max 1 point)",
            id="early-threshold-and-comparison",
        ),
    ],
)
def test_range_and_comparison_are_one_result(
    batcher: MetricBatcher,
    provider: PrometheusProvider,
    metric: dict[str, Any],
    at: datetime,
    outcome: MetricOutcome,
    message: str,
) -> None:
    before = provider.calls
    result = judged(batcher, spec_with(metric), at)
    assert (result.outcome, result.message) == (outcome, message)
    # One batched query for the range (every canary of the namespace), one for the comparison.
    assert provider.calls == before + 2


@needs_prometheus
def test_step_halts_with_the_comparison_and_never_advances(batcher: MetricBatcher) -> None:
    spec = spec_with(error_rate(), p99())
    results = tuple(
        batcher.evaluate(
            "test", spec, metric, target="podinfo-canary", primary="podinfo", at=WORSE_AT
        )
        for metric in spec.analysis.metrics
    )
    # One Flagger-style line per failing metric.
    assert halt_lines(spec, results) == [
        "Halt podinfo.test advancement "
        "error rate 3.10% is 2.9 points above the primary's 0.20% (max 1 point)",
        "Halt podinfo.test advancement "
        "request duration 99.5ms is 2.00× the primary's 49.75ms (max 1.5×)",
    ]


@needs_prometheus
def test_step_treats_a_primary_without_data_as_a_failed_check(batcher: MetricBatcher) -> None:
    spec = spec_with(error_rate())
    (metric,) = spec.analysis.metrics
    result = batcher.evaluate(
        "test", spec, metric, target="podinfo-canary", primary="podinfo", at=ALONE_AT
    )
    assert halt_lines(spec, (result,)) == [
        "Halt podinfo.test advancement no data for metric request-success-rate of the primary"
    ]


@needs_prometheus
def test_primary_defaults_to_the_canary_name_without_its_suffix(
    batcher: MetricBatcher,
) -> None:
    spec = spec_with(error_rate())
    (metric,) = spec.analysis.metrics
    result = batcher.evaluate("test", spec, metric, target="podinfo-canary", at=WORSE_AT)
    assert result.message == (
        "error rate 3.10% is 2.9 points above the primary's 0.20% (max 1 point)"
    )


REV, STABLE = "v1-canary1111", "v1-stable0000"


def halt_lines(spec: CanarySpec, results: Sequence[MetricResult]) -> list[str]:
    """The warnings step() emits for a canary at 10 % whose interval has elapsed."""
    started = analysis_started(initialized(revision=STABLE, at=T0), revision=REV, at=T0)
    status = replace(started, canary_weight=10, analysed_revision=REV)
    ready = Workload(desired=2, ready=2, updated=2, rolled_out=True, revision=REV)
    obs = Observations(
        now=T0 + timedelta(minutes=5),
        canary=ready,
        primary=replace(ready, revision=STABLE),
        route_weights=(90, 10),
        metrics=tuple(results),
    )
    after, actions = step(spec, status, obs, name="podinfo", namespace="test")
    assert after.canary_weight == 10, "a failing comparison must not give the canary weight"
    assert after.failed_checks == status.failed_checks + 1
    return [a.message for a in actions if isinstance(a, Event) and a.type == "Warning"]


# --- the combination, without Prometheus ----------------------------------------------------


def result(outcome: MetricOutcome, message: str, value: float | None = 96.9) -> MetricResult:
    return MetricResult("request-success-rate", outcome, value, message)


RANGE_PASS = result("pass", "success rate 99.50%", 99.5)
RANGE_FAIL = result("fail", "success rate 96.90% < 99%")
RELATIVE_PASS = result("pass", "error rate 0.50% against the primary's 0.20%", 99.5)
RELATIVE_FAIL = result(
    "fail", "error rate 3.10% is 2.9 points above the primary's 0.20% (max 1 point)"
)
CANARY_NO_DATA = result("no-data", "no data for metric request-success-rate", None)
PRIMARY_NO_DATA = result("no-data", "no data for metric request-success-rate of the primary", None)
DOWN = result("error", "Prometheus query failed: cannot connect to http://p:9090: refused", None)


@pytest.mark.parametrize(
    ("absolute", "relative", "outcome", "message"),
    [
        (RANGE_PASS, RELATIVE_PASS, "pass", f"{RANGE_PASS.message}; {RELATIVE_PASS.message}"),
        (RANGE_FAIL, RELATIVE_PASS, "fail", RANGE_FAIL.message),
        (RANGE_PASS, RELATIVE_FAIL, "fail", RELATIVE_FAIL.message),
        (RANGE_FAIL, RELATIVE_FAIL, "fail", f"{RANGE_FAIL.message}; {RELATIVE_FAIL.message}"),
        (RANGE_PASS, PRIMARY_NO_DATA, "no-data", PRIMARY_NO_DATA.message),
        (RANGE_FAIL, PRIMARY_NO_DATA, "fail", f"{RANGE_FAIL.message}; {PRIMARY_NO_DATA.message}"),
        (CANARY_NO_DATA, CANARY_NO_DATA, "no-data", CANARY_NO_DATA.message),
        (DOWN, DOWN, "error", DOWN.message),
        (DOWN, RELATIVE_FAIL, "fail", f"{DOWN.message}; {RELATIVE_FAIL.message}"),
        (CANARY_NO_DATA, DOWN, "error", f"{CANARY_NO_DATA.message}; {DOWN.message}"),
    ],
    ids=[
        "both-pass",
        "range-fails",
        "comparison-fails",
        "both-fail",
        "primary-no-data",
        "range-fails-primary-no-data",
        "canary-no-data-said-once",
        "outage-said-once",
        "fail-beats-error",
        "error-beats-no-data",
    ],
)
def test_combine(
    absolute: MetricResult, relative: MetricResult, outcome: MetricOutcome, message: str
) -> None:
    combined = MetricBatcher.combine(absolute, relative)
    assert (combined.name, combined.outcome, combined.message) == (
        "request-success-rate",
        outcome,
        message,
    )
    # The value is the canary's (both checks measure the same one).
    expected = absolute.value if absolute.value is not None else relative.value
    assert combined.value == expected


class CountingProvider:
    """Stands in for PrometheusProvider.measure: one number per target, calls counted."""

    def __init__(self, values: dict[str, float]) -> None:
        self.values = values
        self.measured: list[list[str]] = []

    def measure(
        self, namespace: str, metric: Metric, targets: Sequence[str], **_: Any
    ) -> dict[str, float]:
        self.measured.append(list(targets))
        return {target: self.values[target] for target in targets}


def test_a_shared_measurement_is_judged_by_each_canarys_own_threshold() -> None:
    stub = CountingProvider({"strict-canary": 95.0, "lenient-canary": 95.0})
    batcher = MetricBatcher(
        stub,  # type: ignore[arg-type]
        canaries=lambda namespace: ["strict-canary", "lenient-canary"],
    )
    strict = spec_with({"name": "request-success-rate", "thresholdRange": {"min": 99}})
    lenient = spec_with({"name": "request-success-rate", "thresholdRange": {"min": 90}})
    first = batcher.evaluate("shop", strict, strict.analysis.metrics[0], target="strict-canary")
    second = batcher.evaluate("shop", lenient, lenient.analysis.metrics[0], target="lenient-canary")
    assert (first.outcome, first.message) == ("fail", "success rate 95.00% < 99%")
    assert (second.outcome, second.message) == ("pass", "success rate 95.00%")
    assert stub.measured == [["lenient-canary", "strict-canary"]]  # one query for both
