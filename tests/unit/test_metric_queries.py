"""The builtin PromQL, template rendering and the judging of values, as pure functions.

What Prometheus makes of these queries is in tests/integration/test_prometheus_metrics.py; here
the text itself, which a Flagger user compares with Flagger's and which must stay the same.
"""

from __future__ import annotations

import math

import pytest

from analyzer.metrics.judge import format_duration_ms, judge, judge_relative
from analyzer.metrics.queries import (
    ENVOY,
    ISTIO,
    QUERY_SETS,
    TemplateError,
    builtin_query,
    query_set_for,
    render_template,
)
from perch.spec import Metric, ThresholdRange, parse_spec
from tests.seed import SEED_SPEC_CURRENT, SEED_SPEC_EARLY

# Flagger's queries (pkg/metrics/observers/istio.go) rendered for Perch's canary of podinfo.test,
# whitespace collapsed. Its success rate is FLAGGER_NON_5XX / FLAGGER_ALL * 100.
FLAGGER_NON_5XX = (
    'sum(rate(istio_requests_total{reporter="destination",destination_workload_namespace="test",'
    'destination_workload=~"podinfo-canary",response_code!~"5.*"}[1m]))'
)
FLAGGER_ALL = (
    'sum(rate(istio_requests_total{reporter="destination",destination_workload_namespace="test",'
    'destination_workload=~"podinfo-canary"}[1m]))'
)
FLAGGER_SUCCESS_RATE = f"{FLAGGER_NON_5XX} / {FLAGGER_ALL} * 100"
FLAGGER_DURATION = (
    "histogram_quantile(0.99, sum(rate(istio_request_duration_milliseconds_bucket{"
    'reporter="destination",destination_workload_namespace="test",'
    'destination_workload=~"podinfo-canary"}[1m])) by (le))'
)

SUCCESS_RATE = Metric(
    name="request-success-rate",
    builtin="request-success-rate",
    threshold_range=ThresholdRange(min=99),
)
DURATION = Metric(
    name="request-duration",
    builtin="request-duration",
    histogram_unit="milliseconds",
    threshold_range=ThresholdRange(max=500),
)
CUSTOM = Metric(
    name="error-ratio",
    query="sum(x)",
    threshold_range=ThresholdRange(max=2),
)


# --- builtin queries -------------------------------------------------------------------------


def guarded(non_5xx: str, every: str) -> str:
    """Flagger's success rate with Perch's guard: 0 non-5xx, not none, where all were 5xx."""
    return f"({non_5xx} or {every} * 0) / {every} * 100"


def test_single_target_success_rate_is_flaggers_query_with_the_5xx_guard() -> None:
    query = builtin_query(
        "request-success-rate", namespace="test", targets=["podinfo-canary"], interval="1m"
    )
    # Flagger's two sums, unchanged; only the numerator is guarded.
    assert query.promql == guarded(FLAGGER_NON_5XX, FLAGGER_ALL)
    assert query.promql != FLAGGER_SUCCESS_RATE
    assert query.target_label is None
    assert query.scale == 1.0


def test_single_target_duration_is_flaggers_query_in_milliseconds() -> None:
    query = builtin_query(
        "request-duration",
        namespace="test",
        targets=["podinfo-canary"],
        interval="1m",
        histogram_unit="milliseconds",
    )
    assert query.promql == FLAGGER_DURATION
    assert query.scale == 1.0


def test_the_default_histogram_is_milliseconds() -> None:
    query = builtin_query(
        "request-duration", namespace="test", targets=["podinfo-canary"], interval="1m"
    )
    assert query.promql == FLAGGER_DURATION


def test_seconds_histogram_reads_the_seed_series_and_converts_to_milliseconds() -> None:
    query = builtin_query(
        "request-duration",
        namespace="test",
        targets=["podinfo-canary"],
        interval="30s",
        histogram_unit="seconds",
    )
    assert query.promql == FLAGGER_DURATION.replace("milliseconds", "seconds").replace(
        "[1m]", "[30s]"
    )
    assert query.scale == 1000.0


def test_batched_success_rate_keeps_the_workload_on_both_sides_of_the_division() -> None:
    query = builtin_query(
        "request-success-rate",
        namespace="test",
        targets=["a-canary", "b-canary", "a-canary"],
        interval="1m",
    )
    assert query.targets == ("a-canary", "b-canary")
    assert query.target_label == "destination_workload"
    # The guard's zero keeps the workload label too, so it fills in exactly the canaries that
    # answered only 5xx.
    assert query.promql == guarded(
        'sum(rate(istio_requests_total{reporter="destination",destination_workload_namespace='
        '"test",destination_workload=~"a-canary|b-canary",response_code!~"5.*"}[1m])) '
        "by (destination_workload)",
        'sum(rate(istio_requests_total{reporter="destination",destination_workload_namespace='
        '"test",destination_workload=~"a-canary|b-canary"}[1m])) by (destination_workload)',
    )


def test_batched_duration_aggregates_by_le_and_workload() -> None:
    query = builtin_query(
        "request-duration",
        namespace="test",
        targets=["a-canary", "a"],
        interval="1m",
        histogram_unit="seconds",
    )
    assert query.promql == (
        "histogram_quantile(0.99, sum(rate(istio_request_duration_seconds_bucket{"
        'reporter="destination",destination_workload_namespace="test",'
        'destination_workload=~"a-canary|a"}[1m])) by (le, destination_workload))'
    )
    assert query.scale == 1000.0


def test_envoy_queries_follow_flaggers_contour_naming_for_the_canary_service() -> None:
    single = builtin_query(
        "request-success-rate",
        namespace="test",
        targets=["podinfo-canary"],
        interval="1m",
        query_set=ENVOY,
    )
    assert single.promql == guarded(
        'sum(rate(envoy_cluster_upstream_rq{envoy_cluster_name=~"test_podinfo-canary_'
        '[0-9a-zA-Z-]+",envoy_response_code!~"5.*"}[1m]))',
        "sum(rate(envoy_cluster_upstream_rq{"
        'envoy_cluster_name=~"test_podinfo-canary_[0-9a-zA-Z-]+"}[1m]))',
    )
    duration = builtin_query(
        "request-duration",
        namespace="test",
        targets=["podinfo-canary"],
        interval="1m",
        histogram_unit="seconds",  # Envoy's histogram is in ms whatever the spec says
        query_set=ENVOY,
    )
    assert duration.promql == (
        "histogram_quantile(0.99, sum(rate(envoy_cluster_upstream_rq_time_bucket{"
        'envoy_cluster_name=~"test_podinfo-canary_[0-9a-zA-Z-]+"}[1m])) by (le))'
    )
    assert duration.scale == 1.0


def test_batched_envoy_query_lifts_the_service_into_a_label() -> None:
    query = builtin_query(
        "request-duration",
        namespace="test",
        targets=["a-canary", "b-canary"],
        interval="1m",
        query_set=ENVOY,
    )
    assert query.target_label == "perch_target"
    assert 'envoy_cluster_name=~"test_(?:a-canary|b-canary)_[0-9a-zA-Z-]+"' in query.promql
    assert '"perch_target", "$1", "envoy_cluster_name", "test_(a-canary|b-canary)_' in query.promql
    assert "sum by (le, perch_target)" in query.promql


def test_query_sets_by_provider() -> None:
    assert query_set_for("istio") == "istio"
    assert query_set_for("gatewayapi") == "envoy"
    assert QUERY_SETS["istio"] is ISTIO
    assert QUERY_SETS["envoy"] is ENVOY


def test_a_dot_in_a_deployment_name_is_matched_literally() -> None:
    query = builtin_query(
        "request-success-rate", namespace="test", targets=["web.v2-canary"], interval="1m"
    )
    # A backslash doubled for the PromQL string: the regex sees \. and matches only a dot.
    assert 'destination_workload=~"web\\\\.v2-canary"' in query.promql


@pytest.mark.parametrize(
    ("namespace", "target"),
    [
        ('test"} or vector(1) #', "podinfo-canary"),
        ("test", 'podinfo"}'),
        ("test", "Podinfo"),
        ("test", ""),
        ("", "podinfo-canary"),
    ],
)
def test_names_that_could_break_out_of_the_selector_are_refused(
    namespace: str, target: str
) -> None:
    with pytest.raises(ValueError, match="is not a Kubernetes object name"):
        builtin_query("request-success-rate", namespace=namespace, targets=[target], interval="1m")


def test_no_target_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one target"):
        builtin_query("request-success-rate", namespace="test", targets=[], interval="1m")


# --- templates -------------------------------------------------------------------------------


def test_render_substitutes_flaggers_placeholders_with_or_without_spaces() -> None:
    rendered = render_template(
        'rate(x{ns="{{ namespace }}",w="{{target}}",n="{{ name }}",d="{{ variables.dir }}"}'
        "[{{  interval }}])",
        namespace="test",
        target="podinfo-canary",
        interval="30s",
        name="podinfo",
        variables={"dir": "inbound"},
    )
    assert rendered == 'rate(x{ns="test",w="podinfo-canary",n="podinfo",d="inbound"}[30s])'


def test_render_leaves_promql_braces_alone() -> None:
    template = 'sum(x{a=~"[0-9]{3}"}) by (a)'
    assert render_template(template, namespace="n", target="t", interval="1m") == template


def test_unknown_placeholders_are_named_all_at_once() -> None:
    with pytest.raises(TemplateError) as caught:
        render_template(
            'x{a="{{ nmespace }}",b="{{ variables.region }}",c="{{ nmespace }}"}',
            namespace="test",
            target="t",
            interval="1m",
            variables={"zone": "a"},
        )
    assert caught.value.placeholders == ("nmespace", "variables.region")
    message = str(caught.value)
    assert "{{ nmespace }}" in message
    assert "{{ variables.region }}" in message
    assert "variables.zone" in message  # what is known, to spot the typo


def test_flaggers_service_placeholder_gets_a_hint() -> None:
    with pytest.raises(TemplateError, match=r"use \{\{ target \}\}"):
        render_template('x{s="{{ service }}"}', namespace="n", target="t", interval="1m")


def test_name_is_unknown_unless_given() -> None:
    with pytest.raises(TemplateError, match="name"):
        render_template('x{s="{{ name }}"}', namespace="n", target="t", interval="1m")


@pytest.mark.parametrize(
    "template",
    ['x{a="{{ .Namespace }}"}', "{{ if true }}x{{ end }}", 'x{a="{{ namespace "}'],
)
def test_go_template_actions_are_not_evaluated(template: str) -> None:
    with pytest.raises(TemplateError, match="unsupported template syntax"):
        render_template(template, namespace="n", target="t", interval="1m")


# --- judging against the threshold range -----------------------------------------------------


def test_success_rate_below_the_minimum_fails_in_flaggers_words() -> None:
    result = judge(SUCCESS_RATE, 61.389999999999965)
    assert result.outcome == "fail"
    assert result.message == "success rate 61.39% < 99%"
    assert result.value == pytest.approx(61.39)


def test_success_rate_above_a_maximum_fails_too() -> None:
    metric = Metric(
        name="request-success-rate",
        builtin="request-success-rate",
        threshold_range=ThresholdRange(min=90, max=99.5),
    )
    assert judge(metric, 99.9).message == "success rate 99.90% > 99.5%"


def test_duration_above_the_maximum_fails_in_seconds_from_one_second() -> None:
    result = judge(DURATION, 1515.2)
    assert result.outcome == "fail"
    assert result.message == "request duration 1.515s > 500ms"


def test_duration_below_a_second_is_in_milliseconds() -> None:
    metric = Metric(
        name="request-duration",
        builtin="request-duration",
        threshold_range=ThresholdRange(max=250),
    )
    assert judge(metric, 250.4).message == "request duration 250.4ms > 250ms"
    assert judge(metric, 120).outcome == "pass"


def test_duration_below_a_minimum() -> None:
    metric = Metric(
        name="request-duration",
        builtin="request-duration",
        threshold_range=ThresholdRange(min=5),
    )
    assert judge(metric, 0.5).message == "request duration 0.5ms < 5ms"


def test_custom_metric_wording() -> None:
    assert judge(CUSTOM, 3.2).message == "error-ratio 3.20 > 2"
    low = Metric(name="rps", query="x", threshold_range=ThresholdRange(min=10.5))
    assert judge(low, 3).message == "rps 3.00 < 10.5"


def test_bounds_are_inclusive() -> None:
    assert judge(SUCCESS_RATE, 99.0).outcome == "pass"
    assert judge(DURATION, 500.0).outcome == "pass"


def test_pass_carries_the_value_and_says_it() -> None:
    result = judge(SUCCESS_RATE, 99.8)
    assert result.outcome == "pass"
    assert result.value == 99.8
    assert result.message == "success rate 99.80%"


@pytest.mark.parametrize("value", [None, math.nan, math.inf, -math.inf])
def test_no_number_is_no_data_never_a_pass(value: float | None) -> None:
    result = judge(SUCCESS_RATE, value)
    assert result.outcome == "no-data"
    assert result.value is None
    assert result.message == "no data for metric request-success-rate"


def test_seed_metrics_are_judged_with_the_builtin_wording() -> None:
    for text in (SEED_SPEC_EARLY, SEED_SPEC_CURRENT):
        rate, duration = parse_spec(text).analysis.metrics
        assert judge(rate, 61.39).message == "success rate 61.39% < 99%"
        assert judge(duration, 1500.0).message == "request duration 1.500s > 500ms"


@pytest.mark.parametrize(
    ("ms", "text"),
    [(1500, "1.500s"), (1000, "1.000s"), (999.999, "1000ms"), (49.75, "49.75ms"), (0, "0ms")],
)
def test_duration_format(ms: float, text: str) -> None:
    assert format_duration_ms(ms) == text


# --- judging against the primary -------------------------------------------------------------


def test_error_rate_points_above_the_primary() -> None:
    result = judge_relative(61.39, 99.9, metric=SUCCESS_RATE, max_delta=1)
    assert result.outcome == "fail"
    assert result.value == 61.39
    assert result.message == (
        "error rate 38.61% is 38.51 points above the primary's 0.10% (max 1 point)"
    )


def test_error_rate_within_the_allowed_points_passes() -> None:
    result = judge_relative(99.5, 99.9, metric=SUCCESS_RATE, max_delta=0.5)
    assert result.outcome == "pass"
    assert result.message == "error rate 0.50% against the primary's 0.10%"


def test_float_noise_at_the_limit_is_within_it() -> None:
    # 100 - 98.8 is 1.2000000000000028.
    assert judge_relative(98.8, 100.0, metric=SUCCESS_RATE, max_delta=1.2).outcome == "pass"


def test_p99_times_the_primary() -> None:
    result = judge_relative(1500.0, 49.75, metric=DURATION, max_ratio=2)
    assert result.outcome == "fail"
    assert result.message == "request duration 1.500s is 30.15× the primary's 49.75ms (max 2×)"
    assert judge_relative(90.0, 49.75, metric=DURATION, max_ratio=2).outcome == "pass"


def test_duration_delta_is_in_milliseconds() -> None:
    result = judge_relative(1500.0, 49.75, metric=DURATION, max_delta=100)
    assert result.message == (
        "request duration 1.500s is 1.450s above the primary's 49.75ms (max 100ms)"
    )


def test_both_limits_must_hold() -> None:
    assert judge_relative(200.0, 100.0, metric=DURATION, max_delta=500, max_ratio=1.5).outcome == (
        "fail"
    )
    assert judge_relative(120.0, 100.0, metric=DURATION, max_delta=10, max_ratio=1.5).outcome == (
        "fail"
    )
    assert judge_relative(105.0, 100.0, metric=DURATION, max_delta=10, max_ratio=1.5).outcome == (
        "pass"
    )


def test_a_ratio_against_a_zero_primary_passes_only_zero() -> None:
    assert judge_relative(100.0, 100.0, metric=SUCCESS_RATE, max_ratio=2).outcome == "pass"
    result = judge_relative(99.9, 100.0, metric=SUCCESS_RATE, max_ratio=2)
    assert result.outcome == "fail"
    assert result.message == "error rate 0.10% is more than 2× the primary's 0.00% (max 2×)"


def test_custom_metrics_are_lower_is_better() -> None:
    result = judge_relative(3.2, 2.0, metric=CUSTOM, max_delta=1)
    assert result.message == "error-ratio 3.20 is 1.2 above the primary's 2.00 (max 1)"
    negative = judge_relative(1.0, -2.0, metric=CUSTOM, max_ratio=2)
    assert negative.outcome == "error"


def test_missing_values_are_no_data_and_say_whose() -> None:
    assert judge_relative(None, 99.0, metric=SUCCESS_RATE, max_delta=1).message == (
        "no data for metric request-success-rate"
    )
    result = judge_relative(99.0, math.nan, metric=SUCCESS_RATE, max_delta=1)
    assert result.outcome == "no-data"
    assert result.message == "no data for metric request-success-rate of the primary"


def test_a_comparison_needs_a_limit() -> None:
    with pytest.raises(ValueError, match="max_delta, max_ratio or both"):
        judge_relative(1.0, 1.0, metric=CUSTOM)
    with pytest.raises(ValueError, match="max_ratio"):
        judge_relative(1.0, 1.0, metric=CUSTOM, max_ratio=-1)
