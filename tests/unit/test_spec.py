"""perch.spec and perch.durations: the perch.dev/spec annotation into a typed, frozen spec."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import time
import tracemalloc

import pytest
import yaml

from perch.durations import DurationError, format_duration, parse_duration
from perch.spec import (
    DEFAULT_CANARY_READY_THRESHOLD,
    DEFAULT_INTERVAL,
    DEFAULT_MAX_WEIGHT,
    DEFAULT_METRIC_INTERVAL,
    DEFAULT_ON_NO_DATA,
    DEFAULT_PORT_NAME,
    DEFAULT_PRIMARY_READY_THRESHOLD,
    DEFAULT_PROGRESS_DEADLINE_SECONDS,
    DEFAULT_PROVIDER,
    DEFAULT_STEP_WEIGHT,
    DEFAULT_THRESHOLD,
    DEFAULT_WEBHOOK_TIMEOUT,
    DEFAULT_WEBHOOK_TYPE,
    MAX_DEPTH,
    MAX_SPEC_BYTES,
    Analysis,
    AutoscalerRef,
    CanarySpec,
    CrossNamespaceRef,
    FrozenDict,
    Metric,
    PrimaryComparison,
    Service,
    SessionAffinity,
    SpecError,
    ThresholdRange,
    Webhook,
    parse_spec,
    to_plain,
)
from tests.seed import SEED_SPEC_EARLY

# The seed article's spec, verbatim (minus targetRef): Flagger's early form.
SEED_EARLY = SEED_SPEC_EARLY

# The same release in the current, documented form.
SEED_CURRENT = """\
provider: istio
autoscalerRef:
  apiVersion: autoscaling/v2beta1
  kind: HorizontalPodAutoscaler
  name: podinfo
service:
  port: 9898
  gateways:
  - public-gateway.istio-system.svc.cluster.local
  hosts:
  - app.example.com
analysis:
  interval: 30s
  threshold: 10
  maxWeight: 50
  stepWeight: 5
  metrics:
  - name: request-success-rate
    thresholdRange:
      min: 99
    interval: 30s
  - name: request-duration
    thresholdRange:
      max: 500
    interval: 30s
  webhooks:
    - name: load-test
      type: rollout
      url: http://flagger-loadtester.test/
      timeout: 5s
      metadata:
        cmd: "hey -z 1m -q 10 -c 2 http://podinfo.test:9898/"
"""

HEY = "hey -z 1m -q 10 -c 2 http://podinfo.test:9898/"

EXPECTED_SEED = CanarySpec(
    provider="istio",
    progress_deadline_seconds=600,
    autoscaler_ref=AutoscalerRef(
        api_version="autoscaling/v2beta1", kind="HorizontalPodAutoscaler", name="podinfo"
    ),
    service=Service(
        port=9898,
        target_port=9898,
        gateways=("public-gateway.istio-system.svc.cluster.local",),
        hosts=("app.example.com",),
    ),
    analysis=Analysis(
        interval="30s",
        interval_seconds=30.0,
        threshold=10,
        max_weight=50,
        step_weight=5,
        metrics=(
            Metric(
                name="request-success-rate",
                builtin="request-success-rate",
                threshold_range=ThresholdRange(min=99.0),
                interval="30s",
                interval_seconds=30.0,
            ),
            Metric(
                name="request-duration",
                builtin="request-duration",
                histogram_unit="seconds",
                threshold_range=ThresholdRange(max=500.0),
                interval="30s",
                interval_seconds=30.0,
            ),
        ),
        webhooks=(
            Webhook(
                name="load-test",
                type="rollout",
                url="http://flagger-loadtester.test/",
                timeout="5s",
                timeout_seconds=5.0,
                metadata=FrozenDict({"cmd": HEY}),
            ),
        ),
    ),
    form="canaryAnalysis",
)

MINIMAL = "service: {port: 9898}\n"


def with_analysis(body: str) -> str:
    """A minimal valid spec with the given (YAML) analysis section."""
    return MINIMAL + "analysis:\n" + "".join(f"  {line}\n" for line in body.splitlines())


def metric(body: str) -> str:
    return with_analysis("metrics:\n- " + body)


def webhook(body: str) -> str:
    return with_analysis("webhooks:\n- " + body)


# --------------------------------------------------------------------------------------------
# The seed, in both forms
# --------------------------------------------------------------------------------------------


def test_seed_early_form_parses_with_the_articles_meaning():
    spec = parse_spec(SEED_EARLY)
    assert spec == EXPECTED_SEED
    success, latency = spec.analysis.metrics
    # threshold 99 on istio_requests_total is a minimum success rate in percent ...
    assert success.threshold_range == ThresholdRange(min=99.0, max=None)
    assert success.threshold_range.contains(99.5)
    assert not success.threshold_range.contains(61.39)
    # ... and threshold 500 on the seconds histogram is a maximum latency in milliseconds,
    # read from the seconds histogram that the seed's Istio exported.
    assert latency.threshold_range == ThresholdRange(min=None, max=500.0)
    assert latency.histogram_unit == "seconds"
    assert not latency.threshold_range.contains(1500.0)
    # webhooks without a type are rollout gates
    assert spec.analysis.webhooks[0].type == "rollout"
    assert spec.analysis.webhooks_of("rollout") == spec.analysis.webhooks
    assert spec.steps == (5, 10, 15, 20, 25, 30, 35, 40, 45, 50)
    assert spec.form == "canaryAnalysis"
    assert any("canaryAnalysis" in warning for warning in spec.warnings)


def test_seed_current_form_means_the_same_apart_from_the_histogram():
    early = parse_spec(SEED_EARLY)
    current = parse_spec(SEED_CURRENT)
    assert current.form == "analysis"
    # The documented request-duration reads Istio's milliseconds histogram (Istio >= 1.5) ...
    assert current.analysis.metrics[1].histogram_unit == "milliseconds"
    seconds = dataclasses.replace(current.analysis.metrics[1], histogram_unit="seconds")
    analysis = dataclasses.replace(current.analysis, metrics=(current.analysis.metrics[0], seconds))
    assert dataclasses.replace(current, analysis=analysis, form="canaryAnalysis") == early


def test_seed_current_form_with_the_seconds_histogram_is_equal_apart_from_the_form():
    # ... and naming the seed's histogram in the current form asks for exactly the seed's query.
    text = SEED_CURRENT.replace(
        "name: request-duration", "name: istio_request_duration_seconds_bucket"
    )
    assert dataclasses.replace(parse_spec(text), form="canaryAnalysis") == parse_spec(SEED_EARLY)


def test_seed_as_json_equals_seed_as_yaml():
    as_json = json.dumps(yaml.safe_load(SEED_EARLY), indent="\t")
    assert parse_spec(as_json) == parse_spec(SEED_EARLY)


def test_spec_is_frozen_and_hashable():
    spec = parse_spec(SEED_EARLY)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.analysis.threshold = 1  # type: ignore[misc]
    assert hash(spec) == hash(parse_spec(SEED_EARLY))
    assert isinstance(spec.analysis.metrics, tuple)
    assert isinstance(spec.service.hosts, tuple)
    with pytest.raises(TypeError):
        spec.analysis.webhooks[0].metadata["cmd"] = "rm -rf /"  # type: ignore[index]


# --------------------------------------------------------------------------------------------
# Defaults
# --------------------------------------------------------------------------------------------


def test_defaults():
    spec = parse_spec(MINIMAL)
    assert spec.provider == DEFAULT_PROVIDER == "istio"
    assert spec.gateway_api_version is None
    assert spec.progress_deadline_seconds == DEFAULT_PROGRESS_DEADLINE_SECONDS == 600
    assert spec.autoscaler_ref is None
    assert spec.target_ref is None
    assert (spec.skip_analysis, spec.suspend, spec.revert_on_deletion) == (False, False, False)
    svc = spec.service
    assert (svc.port, svc.target_port, svc.port_name) == (9898, 9898, DEFAULT_PORT_NAME)
    assert DEFAULT_PORT_NAME == "http"
    assert svc.gateways == svc.hosts == svc.match == ()
    assert svc.gateway_refs == ()
    assert svc.traffic_policy is None
    assert svc.timeout is None
    assert svc.retries is None
    a = spec.analysis
    assert (a.interval, a.interval_seconds) == (DEFAULT_INTERVAL, 60.0)
    assert a.threshold == DEFAULT_THRESHOLD == 1
    assert a.max_weight == DEFAULT_MAX_WEIGHT == 50
    assert a.step_weight == DEFAULT_STEP_WEIGHT == 10
    assert a.primary_ready_threshold == DEFAULT_PRIMARY_READY_THRESHOLD == 100
    assert a.canary_ready_threshold == DEFAULT_CANARY_READY_THRESHOLD == 100
    assert a.strategy == "canary"
    assert a.metrics == a.webhooks == a.alerts == ()
    assert spec.steps == (10, 20, 30, 40, 50)
    assert spec.analysis == Analysis()
    assert any("no metrics" in warning for warning in spec.warnings)


def test_metric_and_webhook_defaults():
    spec = parse_spec(
        with_analysis(
            "metrics:\n- name: request-success-rate\n  thresholdRange: {min: 99}\n"
            "webhooks:\n- name: gate\n  url: https://gate.example/\n- name: empty-type\n"
            "  type: ''\n  url: http://x/"
        )
    )
    m = spec.analysis.metrics[0]
    assert (m.interval, m.interval_seconds) == (DEFAULT_METRIC_INTERVAL, 60.0)
    assert m.histogram_unit is None
    assert m.query is None
    assert m.template_ref is None
    for hook in spec.analysis.webhooks:
        assert hook.type == DEFAULT_WEBHOOK_TYPE == "rollout"
        assert (hook.timeout, hook.timeout_seconds) == (DEFAULT_WEBHOOK_TIMEOUT, 10.0)
        assert hook.metadata == {}
        assert hook.mute_alert is False


def test_template_ref_with_variables_and_the_no_data_policy():
    spec = parse_spec(
        with_analysis(
            "metrics:\n"
            "- name: error-rate\n"
            "  templateRef: {name: error-rate, namespace: monitoring}\n"
            "  templateVariables: {code: '5..', direction: inbound}\n"
            "  thresholdRange: {max: 1}\n"
            "  onNoData: pass\n"
            "- name: request-success-rate\n"
            "  thresholdRange: {min: 99}\n"
            "  onNoData: skip\n"
            "- name: request-duration\n"
            "  thresholdRange: {max: 500}\n"
        )
    )
    errors = spec.analysis.metrics[0]
    assert errors.builtin is None and errors.query is None
    assert errors.template_ref == CrossNamespaceRef(name="error-rate", namespace="monitoring")
    assert errors.template_variables == {"code": "5..", "direction": "inbound"}
    assert [m.on_no_data for m in spec.analysis.metrics] == ["pass", "skip", "fail"]
    assert DEFAULT_ON_NO_DATA == "fail"
    # Part of the spec's value: a changed policy is a changed spec.
    assert errors != dataclasses.replace(errors, on_no_data="fail")
    hash(spec)


def test_confirm_gates_max_wait_and_on_timeout():
    spec = parse_spec(
        with_analysis(
            "webhooks:\n"
            "- {name: approve, type: confirm-rollout, url: 'http://x/', maxWait: 10m}\n"
            "- {name: more, type: confirm-traffic-increase, url: 'http://x/', maxWait: 90,"
            " onTimeout: wait}\n"
            "- {name: ship, type: confirm-promotion, url: 'http://x/', maxWait: 1h30m,"
            " onTimeout: proceed}\n"
            "- {name: forever, type: confirm-promotion, url: 'http://x/', maxWait: null,"
            " onTimeout: null}\n"
            "- {name: load, url: 'http://x/'}"
        )
    )
    got = [
        (hook.name, hook.max_wait, hook.max_wait_seconds, hook.on_timeout)
        for hook in spec.analysis.webhooks
    ]
    assert got == [
        ("approve", "10m", 600.0, "abort"),  # onTimeout defaults to abort with maxWait
        ("more", "90s", 90.0, "wait"),  # a bare number of seconds, as for timeout
        ("ship", "1h30m", 5400.0, "proceed"),
        ("forever", None, None, "abort"),  # null is absent: waits for ever
        ("load", None, None, "abort"),
    ]
    assert Webhook(name="h", url="http://x/").max_wait is None


@pytest.mark.parametrize("text", [None, "", "   \n", "# only a comment\n", "~\n", "null"])
def test_missing_or_empty_annotation_is_refused_naming_service_port(text: str | None):
    with pytest.raises(SpecError) as info:
        parse_spec(text)
    assert info.value.path == "service.port"
    assert "required" in info.value.reason


def test_error_message_format():
    text = with_analysis(
        "metrics:\n- {name: request-success-rate, thresholdRange: {min: 99}}\n"
        "- {name: request-duration, interval: 30s}"
    )
    with pytest.raises(SpecError) as info:
        parse_spec(text)
    assert info.value.path == "analysis.metrics[1].thresholdRange"
    assert str(info.value) == (
        "perch.dev/spec: analysis.metrics[1].thresholdRange: "
        "a metric needs thresholdRange (min or max), primary (maxDelta or maxRatio) to judge it "
        "against the primary, or both"
    )
    assert isinstance(info.value, ValueError)


# --------------------------------------------------------------------------------------------
# Everything else that parses
# --------------------------------------------------------------------------------------------


def test_full_current_form():
    spec = parse_spec(
        """\
provider: gatewayapi:v1beta1
progressDeadlineSeconds: 120
autoscalerRef:
  apiVersion: autoscaling/v2
  kind: HorizontalPodAutoscaler
  name: podinfo
  primaryScalerReplicas: {minReplicas: 2, maxReplicas: 4}
service:
  name: podinfo-svc
  port: 80
  targetPort: http
  portName: web
  portDiscovery: true
  appProtocol: http
  gatewayRefs:
  - name: public
    namespace: istio-ingress
    sectionName: https
    port: 443
  hosts: [app.example.com]
  trafficPolicy:
    tls: {mode: ISTIO_MUTUAL}
    loadBalancer: {consistentHash: {httpCookie: {name: user, ttl: 0s}}}
  timeout: 1m30s
  retries: {attempts: 3, perTryTimeout: 5s, retryOn: "gateway-error,connect-failure"}
  headers:
    request:
      set: {x-perch: "1"}
      remove: [x-debug]
  match:
  - uri: {prefix: /api}
  rewrite: {uri: /, type: ReplacePrefixMatch}
  corsPolicy: {allowOrigins: [{exact: "https://example.com"}], maxAge: 24h}
analysis:
  interval: 1m
  threshold: 5
  stepWeights: [1, 5, 10, 25, 60]
  stepWeightPromotion: 50
  mirror: false
  primaryReadyThreshold: 80
  canaryReadyThreshold: 90
  metrics:
  - name: error-ratio
    templateRef: {name: error-ratio, namespace: flagger}
    templateVariables: {route: podinfo}
    thresholdRange: {max: 1}
    interval: 2m
  - name: p99
    query: histogram_quantile(0.99, sum(rate(x[{{ interval }}])) by (le))
    thresholdRange: {min: 0, max: 0.25}
  webhooks:
  - name: approve
    type: confirm-promotion
    url: https://gate.example.com:8443/approve?x=1
    timeout: 30s
    muteAlert: true
    retries: 2
    disableTLS: true
  alerts:
  - name: on-call
    severity: error
    providerRef: {name: pagerduty, namespace: flagger}
skipAnalysis: false
suspend: true
revertOnDeletion: true
"""
    )
    assert (spec.provider, spec.gateway_api_version) == ("gatewayapi", "v1beta1")
    assert spec.progress_deadline_seconds == 120
    assert spec.suspend
    assert spec.revert_on_deletion
    assert spec.autoscaler_ref is not None
    replicas = spec.autoscaler_ref.primary_scaler_replicas
    assert replicas is not None
    assert (replicas.min_replicas, replicas.max_replicas) == (2, 4)
    svc = spec.service
    assert (svc.name, svc.port, svc.target_port, svc.port_name) == (
        "podinfo-svc",
        80,
        "http",
        "web",
    )
    assert svc.port_discovery
    assert svc.app_protocol == "http"
    ref = svc.gateway_refs[0]
    assert (ref.name, ref.namespace, ref.section_name, ref.port) == (
        "public",
        "istio-ingress",
        "https",
        443,
    )
    assert ref.to_wire() == {
        "group": "gateway.networking.k8s.io",
        "kind": "Gateway",
        "name": "public",
        "namespace": "istio-ingress",
        "sectionName": "https",
        "port": 443,
    }
    assert svc.traffic_policy is not None
    assert to_plain(svc.traffic_policy) == {
        "tls": {"mode": "ISTIO_MUTUAL"},
        "loadBalancer": {"consistentHash": {"httpCookie": {"name": "user", "ttl": "0s"}}},
    }
    # nested free-form values are frozen all the way down
    nested = svc.traffic_policy["loadBalancer"]
    assert isinstance(nested, FrozenDict)
    assert hash(svc.traffic_policy)
    assert (svc.timeout, svc.timeout_seconds) == ("1m30s", 90.0)
    assert svc.retries is not None
    assert svc.retries.per_try_timeout_seconds == 5.0
    assert svc.retries.to_wire() == {
        "attempts": 3,
        "perTryTimeout": "5s",
        "retryOn": "gateway-error,connect-failure",
    }
    assert svc.headers is not None
    assert svc.headers.to_wire() == {"request": {"set": {"x-perch": "1"}, "remove": ["x-debug"]}}
    assert [to_plain(m) for m in svc.match] == [{"uri": {"prefix": "/api"}}]
    assert svc.rewrite is not None
    assert svc.rewrite.to_wire() == {
        "uri": "/",
        "type": "ReplacePrefixMatch",
    }
    assert svc.cors_policy is not None
    assert svc.cors_policy["maxAge"] == "24h"
    a = spec.analysis
    assert a.step_weights == (1, 5, 10, 25, 60)
    assert a.max_weight == 60
    assert spec.steps == (1, 5, 10, 25, 60)
    assert a.step_weight_promotion == 50
    assert (a.primary_ready_threshold, a.canary_ready_threshold) == (80, 90)
    template, query = a.metrics
    assert template.builtin is None
    assert template.template_ref is not None
    assert (template.template_ref.name, template.template_ref.namespace) == (
        "error-ratio",
        "flagger",
    )
    assert template.template_variables == {"route": "podinfo"}
    assert (template.interval, template.interval_seconds) == ("2m", 120.0)
    assert query.query is not None
    assert "{{ interval }}" in query.query
    assert query.threshold_range == ThresholdRange(min=0.0, max=0.25)
    hook = a.webhooks[0]
    assert (hook.type, hook.timeout_seconds, hook.mute_alert, hook.retries, hook.disable_tls) == (
        "confirm-promotion", 30.0, True, 2, True,
    )  # fmt: skip
    alert = a.alerts[0]
    assert (alert.name, alert.severity, alert.provider_ref.name) == (
        "on-call",
        "error",
        "pagerduty",
    )
    assert not any("gateway" in w for w in spec.warnings)


@pytest.mark.parametrize(
    ("spelling", "provider", "version"),
    [
        ("istio", "istio", None),
        ("gatewayapi", "gatewayapi", None),
        ("gatewayapi:v1", "gatewayapi", "v1"),
        ("gatewayapi:v1beta1", "gatewayapi", "v1beta1"),
    ],
)
def test_provider_spellings(spelling: str, provider: str, version: str | None):
    spec = parse_spec(f"provider: {spelling}\n{MINIMAL}")
    assert (spec.provider, spec.gateway_api_version) == (provider, version)


@pytest.mark.parametrize(
    ("name", "builtin", "unit"),
    [
        ("request-success-rate", "request-success-rate", None),
        ("istio_requests_total", "request-success-rate", None),
        ("request-duration", "request-duration", "milliseconds"),
        ("istio_request_duration_seconds_bucket", "request-duration", "seconds"),
        ("istio_request_duration_milliseconds_bucket", "request-duration", "milliseconds"),
    ],
)
def test_builtin_metric_names(name: str, builtin: str, unit: str | None):
    m = parse_spec(metric(f"{{name: {name}, thresholdRange: {{max: 100}}}}")).analysis.metrics[0]
    assert (m.name, m.builtin, m.histogram_unit) == (builtin, builtin, unit)


@pytest.mark.parametrize(
    ("name", "threshold", "expected"),
    [
        ("istio_requests_total", 99, ThresholdRange(min=99.0)),
        ("request-success-rate", 99.5, ThresholdRange(min=99.5)),
        ("istio_request_duration_seconds_bucket", 500, ThresholdRange(max=500.0)),
        ("request-duration", 250, ThresholdRange(max=250.0)),
    ],
)
def test_early_threshold_means_min_for_success_rate_and_max_for_latency(
    name: str, threshold: float, expected: ThresholdRange
):
    text = metric(f"{{name: {name}, threshold: {threshold}}}")
    assert parse_spec(text).analysis.metrics[0].threshold_range == expected


def test_early_threshold_on_a_custom_metric_is_a_maximum_with_a_warning():
    spec = parse_spec(metric("{name: errors, query: 'sum(x)', threshold: 5}"))
    assert spec.analysis.metrics[0].threshold_range == ThresholdRange(max=5.0)
    assert any("thresholdRange.max" in w for w in spec.warnings)


def test_nulls_count_as_absent_and_bare_seconds_become_promql_durations():
    spec = parse_spec(
        "service: {port: 9898, hosts: null, timeout: ~}\nanalysis:\n  interval: 45\n"
        "  metrics:\n  - {name: request-duration, thresholdRange: {max: 1e3}, interval: '90'}\n"
    )
    assert spec.service.hosts == ()
    assert spec.service.timeout is None
    assert (spec.analysis.interval, spec.analysis.interval_seconds) == ("45s", 45.0)
    m = spec.analysis.metrics[0]
    assert (m.interval, m.interval_seconds) == ("90s", 90.0)
    assert m.threshold_range.max == 1000.0  # 1e3 is a number, as in JSON


def test_yaml_timestamps_and_base60_stay_strings():
    spec = parse_spec("service: {port: 9898, hosts: [2024-01-01, '1:30', 1:30]}")
    assert spec.service.hosts == ("2024-01-01", "1:30", "1:30")


def test_json_with_flow_yaml_fallback():
    # Starts like JSON but is YAML flow style: read as YAML (which also allows a trailing comma).
    assert parse_spec("{service: {port: 9898}}").service.port == 9898
    assert parse_spec('{"service": {"port": 9898},}').service.port == 9898


def test_target_ref_is_tolerated_with_a_warning():
    spec = parse_spec(
        "targetRef: {apiVersion: apps/v1, kind: Deployment, name: podinfo}\n" + MINIMAL
    )
    assert spec.target_ref is not None
    assert spec.target_ref.name == "podinfo"
    assert any("targetRef" in w for w in spec.warnings)


def test_stepweight_alongside_stepweights_is_ignored_with_a_warning():
    spec = parse_spec(with_analysis("stepWeight: 5\nstepWeights: [10, 20]"))
    assert spec.steps == (10, 20)
    assert any("stepWeight" in w for w in spec.warnings)


def test_warnings_do_not_take_part_in_equality():
    assert parse_spec(MINIMAL) == dataclasses.replace(parse_spec(MINIMAL), warnings=())


# --------------------------------------------------------------------------------------------
# Comparative checks: primary {maxDelta, maxRatio}
# --------------------------------------------------------------------------------------------

NO_RANGE = ThresholdRange()


@pytest.mark.parametrize(
    ("body", "threshold_range", "primary"),
    [
        pytest.param(
            "{name: request-success-rate, primary: {maxDelta: 1}}",
            NO_RANGE,
            PrimaryComparison(max_delta=1.0),
            id="error-rate-delta-alone",
        ),
        pytest.param(
            "{name: request-duration, primary: {maxRatio: 1.5}}",
            NO_RANGE,
            PrimaryComparison(max_ratio=1.5),
            id="p99-ratio-alone",
        ),
        pytest.param(
            "{name: request-duration, thresholdRange: {max: 500}, "
            "primary: {maxDelta: 100, maxRatio: 1.5}}",
            ThresholdRange(max=500.0),
            PrimaryComparison(max_delta=100.0, max_ratio=1.5),
            id="range-and-both-limits",
        ),
        pytest.param(
            "{name: istio_requests_total, threshold: 99, primary: {maxDelta: 0}}",
            ThresholdRange(min=99.0),
            PrimaryComparison(max_delta=0.0),
            id="early-threshold-and-zero-delta",
        ),
        pytest.param(
            "{name: errors, query: 'sum(x)', primary: {maxRatio: 0, maxDelta: null}}",
            NO_RANGE,
            PrimaryComparison(max_ratio=0.0),
            id="custom-query-zero-ratio-null-delta",
        ),
        pytest.param(
            "{name: request-success-rate, thresholdRange: {min: 99}, primary: null}",
            ThresholdRange(min=99.0),
            None,
            id="null-primary-is-absent",
        ),
        pytest.param(
            "{name: request-success-rate, thresholdRange: {min: 99}}",
            ThresholdRange(min=99.0),
            None,
            id="no-primary",
        ),
    ],
)
def test_primary_comparison(
    body: str, threshold_range: ThresholdRange, primary: PrimaryComparison | None
):
    m = parse_spec(metric(body)).analysis.metrics[0]
    assert (m.threshold_range, m.primary) == (threshold_range, primary)
    assert m.threshold_range.has_bounds == (threshold_range != NO_RANGE)
    if m.primary is not None:
        limits = (m.primary.max_delta, m.primary.max_ratio)
        assert all(isinstance(limit, float) for limit in limits if limit is not None)


def test_primary_comparison_in_json_equals_yaml_and_is_hashable():
    yaml_text = metric(
        "{name: request-duration, thresholdRange: {max: 500}, primary: {maxRatio: 1.5}}"
    )
    json_text = json.dumps(yaml.safe_load(yaml_text))
    assert parse_spec(json_text) == parse_spec(yaml_text)
    hash(parse_spec(json_text))
    comparison = parse_spec(json_text).analysis.metrics[0].primary
    assert comparison is not None
    with pytest.raises(dataclasses.FrozenInstanceError):
        comparison.max_ratio = 2.0  # type: ignore[misc]


def test_primary_comparison_defaults_to_none():
    assert Metric(name="m", query="x", threshold_range=ThresholdRange(max=1)).primary is None
    assert PrimaryComparison() == PrimaryComparison(max_delta=None, max_ratio=None)


COMPARISON_REFUSED = [
    pytest.param(
        metric("{name: request-duration, primary: {maxRatio: 1.5, maxDelay: 10}}"),
        "analysis.metrics[0].primary.maxDelay",
        'unknown field "maxDelay"; did you mean maxDelta?',
        id="unknown-field-typo",
    ),
    pytest.param(
        metric("{name: request-duration, primary: {maxRatio: 1.5, minRatio: 0.5}}"),
        "analysis.metrics[0].primary.minRatio",
        'unknown field "minRatio"',
        id="unknown-field",
    ),
    pytest.param(
        metric("{name: request-success-rate, primary: {maxDelta: -1}}"),
        "analysis.metrics[0].primary.maxDelta",
        "must be 0 or more, got -1",
        id="negative-delta",
    ),
    pytest.param(
        with_analysis(
            "metrics:\n- {name: request-success-rate, thresholdRange: {min: 99}}\n"
            "- {name: request-duration, primary: {maxRatio: -0.5}}"
        ),
        "analysis.metrics[1].primary.maxRatio",
        "must be 0 or more, got -0.5",
        id="negative-ratio",
    ),
    pytest.param(
        metric("{name: request-duration, primary: {}}"),
        "analysis.metrics[0].primary",
        "give maxDelta (how much worse than the primary, in the metric's unit), maxRatio "
        "(how many times the primary's value), or both",
        id="neither-limit",
    ),
    pytest.param(
        metric("{name: request-duration, primary: {maxDelta: null, maxRatio: ~}}"),
        "analysis.metrics[0].primary",
        "give maxDelta",
        id="both-limits-null",
    ),
    pytest.param(
        metric("{name: request-duration, thresholdRange: {max: 500}, primary: {}}"),
        "analysis.metrics[0].primary",
        "give maxDelta",
        id="neither-limit-with-range",
    ),
    pytest.param(
        metric("{name: request-duration, primary: {maxRatio: '1.5'}}"),
        "analysis.metrics[0].primary.maxRatio",
        'expected a number, got the string "1.5"; write numbers without quotes',
        id="quoted-number",
    ),
    pytest.param(
        metric("{name: request-duration, primary: {maxDelta: yes}}"),
        "analysis.metrics[0].primary.maxDelta",
        "expected a number, got a boolean (true)",
        id="boolean-limit",
    ),
    pytest.param(
        metric("{name: request-duration, primary: {maxRatio: [1.5]}}"),
        "analysis.metrics[0].primary.maxRatio",
        "expected a number, got a list",
        id="list-limit",
    ),
    pytest.param(
        metric("{name: request-duration, primary: 1.5}"),
        "analysis.metrics[0].primary",
        "expected a mapping of fields, got the number 1.5",
        id="primary-not-a-mapping",
    ),
    pytest.param(
        metric("{name: request-duration, primary: podinfo}"),
        "analysis.metrics[0].primary",
        'expected a mapping of fields, got the string "podinfo"',
        id="primary-a-name",
    ),
    pytest.param(
        metric("{name: request-duration, primary: {maxRatio: .inf}}"),
        "analysis.metrics[0].primary.maxRatio",
        "not a finite number",
        id="infinite-ratio",
    ),
    pytest.param(
        metric("{name: request-duration, thresholdRange: {}, primary: {maxRatio: 2}}"),
        "analysis.metrics[0].thresholdRange",
        "thresholdRange needs min or max; leave it out to judge the metric against the "
        "primary alone",
        id="empty-range-with-primary",
    ),
    pytest.param(
        metric(
            "{name: request-duration, thresholdRange: {min: 5, max: 1}, primary: {maxRatio: 2}}"
        ),
        "analysis.metrics[0].thresholdRange",
        "min 5 is more than max 1",
        id="range-still-checked-with-primary",
    ),
    pytest.param(
        metric("{name: request-duration, interval: 30s}"),
        "analysis.metrics[0].thresholdRange",
        "a metric needs thresholdRange (min or max), primary (maxDelta or maxRatio) to judge it "
        "against the primary, or both",
        id="neither-range-nor-primary",
    ),
]


@pytest.mark.parametrize(("text", "path", "reason"), COMPARISON_REFUSED)
def test_primary_comparison_refused(text: str, path: str, reason: str):
    with pytest.raises(SpecError) as info:
        parse_spec(text)
    assert info.value.path == path, info.value.reason
    assert reason in info.value.reason
    assert str(info.value) == f"perch.dev/spec: {path}: {info.value.reason}"


# --------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("analysis", "steps"),
    [
        pytest.param(
            "stepWeight: 5\nmaxWeight: 50", (5, 10, 15, 20, 25, 30, 35, 40, 45, 50), id="seed"
        ),
        pytest.param("{}", (10, 20, 30, 40, 50), id="defaults"),
        pytest.param("stepWeight: 30\nmaxWeight: 50", (30, 50), id="last-step-capped"),
        pytest.param("stepWeight: 50\nmaxWeight: 50", (50,), id="one-step"),
        pytest.param("stepWeight: 20\nmaxWeight: 100", (20, 40, 60, 80, 100), id="to-100"),
        pytest.param("stepWeight: 1\nmaxWeight: 3", (1, 2, 3), id="small"),
        pytest.param("stepWeights: [1, 2, 10, 80]", (1, 2, 10, 80), id="step-weights"),
        pytest.param("stepWeights: [5, 25]\nmaxWeight: 50", (5, 25), id="step-weights-below-max"),
        pytest.param("stepWeights: [5, 50]\nmaxWeight: 50", (5, 50), id="step-weights-at-max"),
        pytest.param("iterations: 10", (), id="blue-green"),
        pytest.param("iterations: 10\nmatch: [{headers: {x-canary: {exact: 'yes'}}}]", (), id="ab"),
        pytest.param("iterations: 10\nstepWeight: 25", (25, 50), id="iterations-ignored"),
    ],
)
def test_steps(analysis: str, steps: tuple[int, ...]):
    assert parse_spec(with_analysis(analysis)).steps == steps


@pytest.mark.parametrize(
    ("analysis", "strategy"),
    [
        ("{}", "canary"),
        ("iterations: 10", "blue-green"),
        ("iterations: 10\nmatch: [{headers: {x-canary: {exact: 'yes'}}}]", "ab-testing"),
        ("iterations: 10\nstepWeights: [10, 20]", "canary"),
    ],
)
def test_strategy(analysis: str, strategy: str):
    assert parse_spec(with_analysis(analysis)).analysis.strategy == strategy


def test_steps_of_analysis_built_directly_cap_at_max_weight():
    assert Analysis(step_weights=(10, 40, 80), max_weight=50).steps == (10, 40, 50)


# --------------------------------------------------------------------------------------------
# Durations
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30.0),
        ("1m", 60.0),
        ("1m30s", 90.0),
        ("500ms", 0.5),
        ("5m", 300.0),
        ("5ms", 0.005),
        ("2h", 7200.0),
        ("1h30m", 5400.0),
        ("1d", 86400.0),
        ("1w", 604800.0),
        ("1y", 31536000.0),
        ("1h1m1s1ms", 3661.001),
        ("30", 30.0),
        (30, 30.0),
        ("0", 0.0),
        ("0s", 0.0),
    ],
)
def test_parse_duration(text: str | int, seconds: float):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("-30s", "negative"),
        (-1, "negative"),
        ("1.5s", "whole numbers"),
        ("30sec", 'unknown unit "sec"'),
        ("30 s", "expected a Prometheus-style duration"),
        ("30s1m", "largest first"),
        ("1m1m", "largest first"),
        ("", "empty"),
        ("abc", "expected a Prometheus-style duration"),
        ("9" * 30 + "s", "too large"),
    ],
)
def test_parse_duration_refuses(text: str | int, fragment: str):
    with pytest.raises(DurationError, match=fragment):
        parse_duration(text)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.5, "500ms"),
        (1, "1s"),
        (90, "1m30s"),
        (3600, "1h"),
        (86400, "24h"),
        (5400.25, "1h30m250ms"),
    ],
)
def test_format_duration(seconds: float, text: str):
    assert format_duration(seconds) == text
    assert parse_duration(text) == pytest.approx(seconds)


# --------------------------------------------------------------------------------------------
# Refusals: each names the field and the reason
# --------------------------------------------------------------------------------------------

BILLION_LAUGHS = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
service: {port: 9898, hosts: *i}
"""

INVALID = [
    # syntax
    pytest.param(
        "service: {port: 9898\n", "", "not valid YAML: line 2, column 1", id="yaml-syntax"
    ),
    pytest.param(
        '{"service": {"port": 9898}', "", "not valid JSON: line 1, column 27", id="json-syntax"
    ),
    pytest.param("a: 1\n---\nb: 2\n", "", "not valid YAML: line 2", id="two-documents"),
    pytest.param("service: {port: 9898}\x00", "", "not valid YAML", id="control-character"),
    # the document
    pytest.param(
        "- service\n- analysis\n", "", "must be a mapping of fields, got a list", id="list"
    ),
    pytest.param(
        "podinfo\n", "", 'must be a mapping of fields, got the string "podinfo"', id="scalar"
    ),
    pytest.param("42", "", "must be a mapping of fields, got the number 42", id="number"),
    # unknown fields
    pytest.param(
        MINIMAL + "provder: istio\n", "provder", "did you mean provider?", id="unknown-top"
    ),
    pytest.param(
        with_analysis("stepweight: 5"),
        "analysis.stepweight",
        'unknown field "stepweight"; did you mean stepWeight?',
        id="unknown-case",
    ),
    pytest.param(
        with_analysis("step_weight: 5"),
        "analysis.step_weight",
        "did you mean stepWeight?",
        id="unknown-snake",
    ),
    pytest.param(
        with_analysis("treshold: 5"),
        "analysis.treshold",
        "did you mean threshold?",
        id="unknown-typo",
    ),
    pytest.param(
        with_analysis("colour: blue"),
        "analysis.colour",
        'unknown field "colour"; the fields here are interval',
        id="unknown-no-suggestion",
    ),
    pytest.param(
        metric("{name: request-duration, thresholdRnage: {max: 1}}"),
        "analysis.metrics[0].thresholdRnage",
        "did you mean thresholdRange?",
        id="unknown-in-metric",
    ),
    pytest.param(
        "service: {port: 9898, headless: true}",
        "service.headless",
        "not supported",
        id="flagger-only-field",
    ),
    pytest.param(
        MINIMAL + "metricsServer: http://prometheus:9090\n",
        "metricsServer",
        "not supported",
        id="metrics-server",
    ),
    pytest.param(
        "apiVersion: flagger.app/v1beta1\nkind: Canary\nspec:\n  service: {port: 9898}\n",
        "apiVersion",
        "only the spec of a Canary",
        id="whole-canary",
    ),
    pytest.param(
        MINIMAL + "analysis: {}\ncanaryAnalysis: {}\n",
        "canaryAnalysis",
        "either analysis or canaryAnalysis",
        id="both-forms",
    ),
    # wrong types
    pytest.param(
        "service: [9898]", "service", "expected a mapping of fields, got a list", id="service-list"
    ),
    pytest.param(
        'service: {port: "9898"}',
        "service.port",
        'got the string "9898"; write numbers without quotes',
        id="port-string",
    ),
    pytest.param(
        '{"service": {"port": "9898"}}',
        "service.port",
        "write numbers without quotes",
        id="port-string-json",
    ),
    pytest.param(
        "service: {port: yes}",
        "service.port",
        "got a boolean (true); note that YAML reads unquoted yes",
        id="port-yes",
    ),
    pytest.param(
        '{"service": {"port": true}}', "service.port", "got a boolean (true)", id="port-json-true"
    ),
    pytest.param(
        "service: {port: 98.5}",
        "service.port",
        "expected a whole number, got 98.5",
        id="port-fraction",
    ),
    pytest.param(
        with_analysis("threshold: '10'"),
        "analysis.threshold",
        "write numbers without quotes",
        id="threshold-string",
    ),
    pytest.param(
        with_analysis("threshold: on"), "analysis.threshold", "got a boolean", id="threshold-on"
    ),
    pytest.param(
        with_analysis("maxWeight: '50'"),
        "analysis.maxWeight",
        "write numbers without quotes",
        id="max-weight-string",
    ),
    pytest.param(
        metric("{name: request-duration, thresholdRange: {max: '500'}}"),
        "analysis.metrics[0].thresholdRange.max",
        "write numbers without quotes",
        id="threshold-range-string",
    ),
    pytest.param(
        metric("{name: istio_requests_total, threshold: yes}"),
        "analysis.metrics[0].threshold",
        "got a boolean",
        id="early-threshold-yes",
    ),
    pytest.param(
        "service: {port: 9898, hosts: [1]}",
        "service.hosts[0]",
        "expected a string, got the number 1; quote the value",
        id="host-number",
    ),
    pytest.param(
        "service: {port: 9898, hosts: app.example.com}",
        "service.hosts",
        "expected a list",
        id="hosts-not-list",
    ),
    pytest.param(
        "service: {port: 9898, portName: on}",
        "service.portName",
        "quote the value",
        id="port-name-on",
    ),
    pytest.param(
        "service: {port: 9898, trafficPolicy: [1]}",
        "service.trafficPolicy",
        "expected a mapping",
        id="traffic-policy-list",
    ),
    pytest.param(
        MINIMAL + "skipAnalysis: 'true'\n",
        "skipAnalysis",
        "expected a boolean",
        id="skip-analysis-string",
    ),
    pytest.param(MINIMAL + "suspend: 1\n", "suspend", "expected a boolean", id="suspend-number"),
    pytest.param(
        webhook("{name: t, url: 'http://x/', metadata: {count: 5}}"),
        "analysis.webhooks[0].metadata.count",
        "quote the value",
        id="metadata-number",
    ),
    pytest.param(
        webhook("{name: t, url: 'http://x/', metadata: [cmd]}"),
        "analysis.webhooks[0].metadata",
        "expected a mapping of strings",
        id="metadata-list",
    ),
    # ports and names
    pytest.param("service: {hosts: [a]}", "service.port", "required", id="port-missing"),
    pytest.param(
        "service: {port: 0}", "service.port", "must be from 1 to 65535, got 0", id="port-zero"
    ),
    pytest.param(
        "service: {port: 70000}", "service.port", "must be from 1 to 65535", id="port-too-big"
    ),
    pytest.param(
        "service: {port: 9898, targetPort: 0}",
        "service.targetPort",
        "from 1 to 65535",
        id="target-port-zero",
    ),
    pytest.param(
        "service: {port: 9898, targetPort: HTTP_port}",
        "service.targetPort",
        "is not a port name",
        id="target-port-name",
    ),
    pytest.param(
        "service: {port: 9898, name: Podinfo}",
        "service.name",
        "is not a DNS-1035 label",
        id="service-name",
    ),
    pytest.param(
        MINIMAL + "progressDeadlineSeconds: 0\n",
        "progressDeadlineSeconds",
        "must be 1 or more",
        id="deadline-zero",
    ),
    pytest.param(
        MINIMAL + "progressDeadlineSeconds: -60\n",
        "progressDeadlineSeconds",
        "must be 1 or more",
        id="deadline-negative",
    ),
    # weights
    pytest.param(
        with_analysis("stepWeight: 60"),
        "analysis.stepWeight",
        "stepWeight 60 is more than maxWeight 50 (the default)",
        id="step-over-default-max",
    ),
    pytest.param(
        with_analysis("stepWeight: 30\nmaxWeight: 20"),
        "analysis.stepWeight",
        "stepWeight 30 is more than maxWeight 20",
        id="step-over-max",
    ),
    pytest.param(
        with_analysis("maxWeight: 5"),
        "analysis.maxWeight",
        "less than stepWeight 10 (the default)",
        id="max-under-default-step",
    ),
    pytest.param(
        with_analysis("maxWeight: 101"),
        "analysis.maxWeight",
        "a weight is a percentage from 1 to 100, got 101",
        id="max-over-100",
    ),
    pytest.param(
        with_analysis("maxWeight: 0"), "analysis.maxWeight", "from 1 to 100, got 0", id="max-zero"
    ),
    pytest.param(
        with_analysis("stepWeight: -5"),
        "analysis.stepWeight",
        "from 1 to 100, got -5",
        id="step-negative",
    ),
    pytest.param(
        with_analysis("stepWeights: [10, 5]"),
        "analysis.stepWeights[1]",
        "must increase strictly, but 5 follows 10",
        id="step-weights-decreasing",
    ),
    pytest.param(
        with_analysis("stepWeights: [10, 10]"),
        "analysis.stepWeights[1]",
        "must increase strictly",
        id="step-weights-equal",
    ),
    pytest.param(
        with_analysis("stepWeights: [10, 120]"),
        "analysis.stepWeights[1]",
        "from 1 to 100, got 120",
        id="step-weights-over-100",
    ),
    pytest.param(
        with_analysis("stepWeights: [0, 10]"),
        "analysis.stepWeights[0]",
        "from 1 to 100, got 0",
        id="step-weights-zero",
    ),
    pytest.param(
        with_analysis("stepWeights: [10, 80]\nmaxWeight: 50"),
        "analysis.stepWeights[1]",
        "step weight 80 is more than maxWeight 50",
        id="step-weights-over-max",
    ),
    pytest.param(
        with_analysis("stepWeights: 10"),
        "analysis.stepWeights",
        "expected a list",
        id="step-weights-not-list",
    ),
    pytest.param(
        with_analysis("stepWeightPromotion: 200"),
        "analysis.stepWeightPromotion",
        "percentage from 1 to 100",
        id="promotion-weight",
    ),
    pytest.param(
        with_analysis("mirrorWeight: 101"),
        "analysis.mirrorWeight",
        "percentage from 1 to 100",
        id="mirror-weight",
    ),
    pytest.param(
        with_analysis("primaryReadyThreshold: 120"),
        "analysis.primaryReadyThreshold",
        "from 0 to 100",
        id="ready-threshold",
    ),
    pytest.param(
        with_analysis("threshold: 0"),
        "analysis.threshold",
        "must be 1 or more, got 0",
        id="threshold-zero",
    ),
    pytest.param(
        with_analysis("iterations: 0"),
        "analysis.iterations",
        "must be 1 or more",
        id="iterations-zero",
    ),
    # durations
    pytest.param(
        with_analysis("interval: -30s"),
        "analysis.interval",
        'negative duration "-30s"',
        id="interval-negative",
    ),
    pytest.param(
        with_analysis("interval: 30 seconds"),
        "analysis.interval",
        'invalid duration "30 seconds"',
        id="interval-unparsable",
    ),
    pytest.param(
        with_analysis("interval: 0s"),
        "analysis.interval",
        "must be more than 0",
        id="interval-zero",
    ),
    pytest.param(
        with_analysis("interval: 500ms"),
        "analysis.interval",
        "at least 1s",
        id="interval-too-short",
    ),
    pytest.param(
        with_analysis("interval: 1.5m"),
        "analysis.interval",
        "whole numbers",
        id="interval-fraction",
    ),
    pytest.param(
        with_analysis("interval: 1.5"),
        "analysis.interval",
        "expected a duration",
        id="interval-float",
    ),
    pytest.param(
        with_analysis("interval: -30"),
        "analysis.interval",
        "negative duration -30",
        id="interval-negative-int",
    ),
    pytest.param(
        metric("{name: request-duration, thresholdRange: {max: 1}, interval: -1m}"),
        "analysis.metrics[0].interval",
        "negative",
        id="metric-interval-negative",
    ),
    pytest.param(
        metric("{name: request-duration, thresholdRange: {max: 1}, interval: 1min}"),
        "analysis.metrics[0].interval",
        'unknown unit "min"',
        id="metric-interval-unit",
    ),
    pytest.param(
        webhook("{name: t, url: 'http://x/', timeout: soon}"),
        "analysis.webhooks[0].timeout",
        "invalid duration",
        id="webhook-timeout",
    ),
    pytest.param(
        "service: {port: 9898, timeout: -1s}", "service.timeout", "negative", id="service-timeout"
    ),
    pytest.param(
        "service: {port: 9898, retries: {perTryTimeout: 2x}}",
        "service.retries.perTryTimeout",
        'unknown unit "x"',
        id="per-try-timeout",
    ),
    # metrics
    pytest.param(
        metric("{name: request-success-rate}"),
        "analysis.metrics[0].thresholdRange",
        "a metric needs thresholdRange (min or max), primary (maxDelta or maxRatio)",
        id="metric-without-threshold",
    ),
    pytest.param(
        metric("{name: request-success-rate, thresholdRange: {}}"),
        "analysis.metrics[0].thresholdRange",
        "a metric needs thresholdRange (min or max), primary (maxDelta or maxRatio)",
        id="metric-empty-range",
    ),
    pytest.param(
        metric("{name: request-success-rate, thresholdRange: {min: null}}"),
        "analysis.metrics[0].thresholdRange",
        "needs thresholdRange (min or max), primary",
        id="metric-null-bounds",
    ),
    pytest.param(
        metric("{name: request-success-rate, thresholdRange: {min: null}, primary: null}"),
        "analysis.metrics[0].thresholdRange",
        "needs thresholdRange (min or max), primary",
        id="metric-null-bounds-null-primary",
    ),
    pytest.param(
        metric("{name: errors, query: 'sum(x)'}"),
        "analysis.metrics[0].thresholdRange",
        "needs thresholdRange",
        id="custom-without-threshold",
    ),
    pytest.param(
        metric("{name: request-duration, thresholdRange: {min: 5, max: 1}}"),
        "analysis.metrics[0].thresholdRange",
        "min 5 is more than max 1",
        id="range-inverted",
    ),
    pytest.param(
        metric("{name: request-success-rate, thresholdRange: {min: 199}}"),
        "analysis.metrics[0].thresholdRange",
        "percentage from 0 to 100",
        id="success-rate-over-100",
    ),
    pytest.param(
        metric("{name: request-duration, thresholdRange: {max: -1}}"),
        "analysis.metrics[0].thresholdRange",
        "cannot be negative",
        id="duration-negative",
    ),
    pytest.param(
        metric("{name: istio_requests_total, threshold: 99, thresholdRange: {min: 99}}"),
        "analysis.metrics[0].threshold",
        "either threshold",
        id="threshold-and-range",
    ),
    pytest.param(
        metric("{name: request-sucess-rate, thresholdRange: {min: 99}}"),
        "analysis.metrics[0].name",
        'unknown builtin metric "request-sucess-rate"; did you mean request-success-rate?',
        id="unknown-builtin-typo",
    ),
    pytest.param(
        metric("{name: error-rate, thresholdRange: {max: 1}}"),
        "analysis.metrics[0].name",
        "for a custom metric give query or templateRef",
        id="unknown-builtin",
    ),
    pytest.param(
        metric("{thresholdRange: {max: 1}}"),
        "analysis.metrics[0].name",
        "required",
        id="metric-without-name",
    ),
    pytest.param(
        metric("{name: e, query: x, templateRef: {name: t}, thresholdRange: {max: 1}}"),
        "analysis.metrics[0].query",
        "either query or templateRef",
        id="query-and-template",
    ),
    pytest.param(
        metric("{name: e, templateRef: {namespace: flagger}, thresholdRange: {max: 1}}"),
        "analysis.metrics[0].templateRef.name",
        "required",
        id="template-without-name",
    ),
    pytest.param(
        metric("{name: request-success-rate, thresholdRange: {min: 99}, onNoData: ignore}"),
        "analysis.metrics[0].onNoData",
        'unknown onNoData policy "ignore" (one of: fail, pass, skip)',
        id="no-data-policy-unknown",
    ),
    pytest.param(
        metric("{name: request-success-rate, thresholdRange: {min: 99}, onNoData: Pass}"),
        "analysis.metrics[0].onNoData",
        "did you mean pass?",
        id="no-data-policy-case",
    ),
    pytest.param(
        metric("{name: request-success-rate, thresholdRange: {min: 99}, onNoData: true}"),
        "analysis.metrics[0].onNoData",
        "expected a string",
        id="no-data-policy-boolean",
    ),
    pytest.param(
        metric("{name: e, templateRef: {name: t}, thresholdRange: {max: 1}, noData: pass}"),
        "analysis.metrics[0].noData",
        "unknown field",
        id="no-data-policy-misnamed",
    ),
    pytest.param(
        metric("{name: request-duration, thresholdRange: {max: 1}, templateVariables: {a: b}}"),
        "analysis.metrics[0].templateVariables",
        "only apply to a metric with templateRef or query",
        id="template-variables-on-a-builtin",
    ),
    pytest.param(
        metric(
            "{name: e, templateRef: {name: t}, thresholdRange: {max: 1}, "
            'templateVariables: {"my region": eu}}'
        ),
        'analysis.metrics[0].templateVariables["my region"]',
        "cannot be named in a query as {{ variables.<key> }}",
        id="template-variable-key-with-a-space",
    ),
    pytest.param(
        metric(
            "{name: e, templateRef: {name: t}, thresholdRange: {max: 1}, "
            "templateVariables: {code: 500}}"
        ),
        "analysis.metrics[0].templateVariables.code",
        "expected a string",
        id="template-variable-not-a-string",
    ),
    pytest.param(
        with_analysis(
            "metrics:\n- {name: request-duration, thresholdRange: {max: 1}}\n"
            "- {name: istio_request_duration_seconds_bucket, threshold: 5}"
        ),
        "analysis.metrics[1].name",
        "duplicate metric request-duration",
        id="duplicate-metric",
    ),
    pytest.param(
        with_analysis("metrics: {name: request-duration}"),
        "analysis.metrics",
        "expected a list",
        id="metrics-not-list",
    ),
    pytest.param(
        with_analysis("metrics: [request-duration]"),
        "analysis.metrics[0]",
        "expected a mapping of fields",
        id="metric-not-mapping",
    ),
    # webhooks
    pytest.param(
        webhook("{name: t, url: flagger-loadtester.test/}"),
        "analysis.webhooks[0].url",
        "must start with http:// or https://",
        id="url-no-scheme",
    ),
    pytest.param(
        webhook("{name: t, url: 'ftp://x/'}"),
        "analysis.webhooks[0].url",
        "malformed URL",
        id="url-ftp",
    ),
    pytest.param(
        webhook("{name: t, url: 'http://'}"),
        "analysis.webhooks[0].url",
        "it has no host",
        id="url-no-host",
    ),
    pytest.param(
        webhook("{name: t, url: 'http:///path'}"),
        "analysis.webhooks[0].url",
        "it has no host",
        id="url-empty-host",
    ),
    pytest.param(
        webhook("{name: t, url: 'http://exa mple/'}"),
        "analysis.webhooks[0].url",
        "whitespace",
        id="url-space",
    ),
    pytest.param(
        webhook("{name: t, url: 'http://host:99999/'}"),
        "analysis.webhooks[0].url",
        "malformed URL",
        id="url-port",
    ),
    pytest.param(
        webhook("{name: t, url: 'http://[::1/'}"),
        "analysis.webhooks[0].url",
        "malformed URL",
        id="url-bracket",
    ),
    pytest.param(webhook("{name: t}"), "analysis.webhooks[0].url", "required", id="url-missing"),
    pytest.param(
        webhook("{url: 'http://x/'}"),
        "analysis.webhooks[0].name",
        "required",
        id="webhook-name-missing",
    ),
    pytest.param(
        webhook("{name: t, url: 'http://x/', type: pre-rolout}"),
        "analysis.webhooks[0].type",
        'unknown webhook type "pre-rolout"; did you mean pre-rollout?',
        id="webhook-type-typo",
    ),
    pytest.param(
        webhook("{name: t, url: 'http://x/', type: smoke}"),
        "analysis.webhooks[0].type",
        'unknown webhook type "smoke"',
        id="webhook-type-unknown",
    ),
    pytest.param(
        webhook("{name: t, url: 'http://x/', retries: -1}"),
        "analysis.webhooks[0].retries",
        "must be 0 or more",
        id="webhook-retries",
    ),
    # maxWait and onTimeout: confirm gates only
    *(
        pytest.param(
            webhook(f"{{name: t, url: 'http://x/', {type_}maxWait: 10m}}"),
            "analysis.webhooks[0].maxWait",
            "maxWait only applies to confirm gates (confirm-rollout, confirm-traffic-increase, "
            f"confirm-promotion), not to type {shown}",
            id=f"max-wait-on-{shown}",
        )
        for type_, shown in (
            ("", "rollout"),
            ("type: pre-rollout, ", "pre-rollout"),
            ("type: rollback, ", "rollback"),
            ("type: post-rollout, ", "post-rollout"),
            ("type: event, ", "event"),
        )
    ),
    pytest.param(
        webhook("{name: t, url: 'http://x/', type: rollout, onTimeout: proceed}"),
        "analysis.webhooks[0].onTimeout",
        "onTimeout only applies to confirm gates",
        id="on-timeout-on-rollout",
    ),
    pytest.param(
        webhook("{name: t, url: 'http://x/', type: confirm-promotion, onTimeout: proceed}"),
        "analysis.webhooks[0].onTimeout",
        "onTimeout needs maxWait",
        id="on-timeout-without-max-wait",
    ),
    pytest.param(
        webhook(
            "{name: t, url: 'http://x/', type: confirm-rollout, maxWait: 10m, onTimeout: skip}"
        ),
        "analysis.webhooks[0].onTimeout",
        'unknown onTimeout action "skip" (one of: abort, proceed, wait)',
        id="on-timeout-unknown",
    ),
    pytest.param(
        webhook(
            "{name: t, url: 'http://x/', type: confirm-rollout, maxWait: 10m, onTimeout: Wait}"
        ),
        "analysis.webhooks[0].onTimeout",
        "did you mean wait?",
        id="on-timeout-case",
    ),
    pytest.param(
        webhook(
            "{name: t, url: 'http://x/', type: confirm-rollout, maxWait: 10m, onTimeout: true}"
        ),
        "analysis.webhooks[0].onTimeout",
        "expected a string, got a boolean (true)",
        id="on-timeout-boolean",
    ),
    pytest.param(
        webhook("{name: t, url: 'http://x/', type: confirm-traffic-increase, maxWait: 0s}"),
        "analysis.webhooks[0].maxWait",
        "must be more than 0",
        id="max-wait-zero",
    ),
    pytest.param(
        webhook("{name: t, url: 'http://x/', type: confirm-traffic-increase, maxWait: -5m}"),
        "analysis.webhooks[0].maxWait",
        'negative duration "-5m"',
        id="max-wait-negative",
    ),
    pytest.param(
        webhook("{name: t, url: 'http://x/', type: confirm-promotion, maxWait: soon}"),
        "analysis.webhooks[0].maxWait",
        'invalid duration "soon"',
        id="max-wait-not-a-duration",
    ),
    pytest.param(
        webhook("{name: t, url: 'http://x/', type: confirm-promotion, maxWait: [10m]}"),
        "analysis.webhooks[0].maxWait",
        "expected a duration such as 30s, 1m30s or 500ms, got a list",
        id="max-wait-list",
    ),
    # alerts
    pytest.param(
        with_analysis("alerts: [{name: a, severity: critical, providerRef: {name: p}}]"),
        "analysis.alerts[0].severity",
        'unknown severity "critical"',
        id="severity",
    ),
    pytest.param(
        with_analysis("alerts: [{name: a}]"),
        "analysis.alerts[0].providerRef",
        "required",
        id="alert-without-provider",
    ),
    # provider and references
    pytest.param(
        "provider: linkerd\n" + MINIMAL,
        "provider",
        "Flagger's provider linkerd is not supported by Perch",
        id="provider-flagger-only",
    ),
    pytest.param(
        "provider: Istio\n" + MINIMAL,
        "provider",
        'unknown provider "Istio"; did you mean istio?',
        id="provider-case",
    ),
    pytest.param(
        "provider: envoy\n" + MINIMAL, "provider", 'unknown provider "envoy"', id="provider-unknown"
    ),
    pytest.param(
        "provider: [istio]\n" + MINIMAL,
        "provider",
        "expected a string, got a list",
        id="provider-list",
    ),
    pytest.param(
        MINIMAL
        + "autoscalerRef: {apiVersion: autoscaling/v2, kind: VerticalPodAutoscaler, name: p}\n",
        "autoscalerRef.kind",
        'unknown autoscaler kind "VerticalPodAutoscaler"',
        id="autoscaler-kind",
    ),
    pytest.param(
        MINIMAL + "autoscalerRef: {apiVersion: apps/v1, kind: HorizontalPodAutoscaler, name: p}\n",
        "autoscalerRef.apiVersion",
        "autoscaling/<version>",
        id="autoscaler-api-version",
    ),
    pytest.param(
        MINIMAL + "autoscalerRef: {apiVersion: autoscaling/v2, kind: HorizontalPodAutoscaler}\n",
        "autoscalerRef.name",
        "required",
        id="autoscaler-name",
    ),
    pytest.param(
        MINIMAL
        + "autoscalerRef: {apiVersion: autoscaling/v2, kind: HorizontalPodAutoscaler, name: p, "
        "primaryScalerReplicas: {minReplicas: 5, maxReplicas: 2}}\n",
        "autoscalerRef.primaryScalerReplicas.minReplicas",
        "more than maxReplicas",
        id="scaler-replicas",
    ),
    pytest.param(
        "targetRef: {kind: DaemonSet, name: x}\n" + MINIMAL,
        "targetRef.kind",
        "target is a Deployment",
        id="target-ref-kind",
    ),
    pytest.param(
        "service: {port: 9898, gatewayRefs: [{namespace: x}]}",
        "service.gatewayRefs[0].name",
        "required",
        id="gateway-ref-name",
    ),
    pytest.param(
        "service: {port: 9898, gatewayRefs: [{name: gw, port: 0}]}",
        "service.gatewayRefs[0].port",
        "from 1 to 65535",
        id="gateway-ref-port",
    ),
    # YAML hazards
    pytest.param(
        BILLION_LAUGHS,
        "b[0]",
        "YAML aliases are not allowed (*a at line 2, column 8)",
        id="billion-laughs",
    ),
    pytest.param(
        "service: &s {port: 9898}\nanalysis: *s\n",
        "analysis",
        "YAML aliases are not allowed",
        id="alias",
    ),
    pytest.param(
        "base: &b {port: 9898}\nservice:\n  <<: {port: 9898}\n",
        "service",
        "merge keys (<<) are not allowed",
        id="merge-key",
    ),
    pytest.param(
        "service:\n  port: 9898\n  port: 9899\n",
        "service.port",
        'duplicate key "port" (line 3, column 3; first at line 2, column 3)',
        id="duplicate-key-yaml",
    ),
    pytest.param(
        '{"service": {"port": 9898, "port": 9899}}',
        "service.port",
        'duplicate key "port"',
        id="duplicate-key-json",
    ),
    pytest.param(
        MINIMAL + "analysis: {interval: 30s}\nanalysis: {interval: 1m}\n",
        "analysis",
        "duplicate key",
        id="duplicate-section",
    ),
    pytest.param(
        "service: {port: 9898, hosts: [!!timestamp 2024-01-01]}",
        "service.hosts[0]",
        "YAML tag !!timestamp is not allowed",
        id="explicit-timestamp",
    ),
    pytest.param(
        "service: {port: 9898, hosts: [!!binary aGVsbG8=]}",
        "service.hosts[0]",
        "YAML tag !!binary is not allowed",
        id="binary",
    ),
    pytest.param(
        "service: {port: 9898, hosts: !!set {a: null}}",
        "service.hosts",
        "YAML tag !!set is not allowed",
        id="set",
    ),
    pytest.param(
        "service: {port: 9898, hosts: !!omap [a: 1]}",
        "service.hosts",
        "YAML tag !!omap is not allowed",
        id="omap",
    ),
    pytest.param(
        "service: !custom {port: 9898}",
        "service",
        "YAML tag !custom is not allowed",
        id="custom-tag",
    ),
    pytest.param(
        "service: {port: !!python/object:os.system [ls]}",
        "service.port",
        "YAML tag !!python/object:os.system is not allowed",
        id="python-tag",
    ),
    pytest.param(
        metric("{name: request-duration, thresholdRange: {max: .inf}}"),
        "analysis.metrics[0].thresholdRange.max",
        "not a finite number",
        id="yaml-inf",
    ),
    pytest.param(
        metric("{name: request-duration, thresholdRange: {max: .nan}}"),
        "analysis.metrics[0].thresholdRange.max",
        "not a finite number",
        id="yaml-nan",
    ),
    pytest.param('{"service": {"port": NaN}}', "", "NaN is not a JSON number", id="json-nan"),
    pytest.param('{"service": {"port": 1e999}}', "service.port", "too large", id="json-huge-float"),
    pytest.param(
        "service: {port: 9898}\n1: one\n",
        "",
        "mapping keys must be strings, got the number 1",
        id="int-key",
    ),
    pytest.param(
        "service: {port: 9898}\n? [a, b]\n: c\n", "", "mapping keys must be strings", id="list-key"
    ),
    pytest.param(
        "service: {port: " + "9" * 5000 + "}",
        "service.port",
        "not a valid number or is too large",
        id="huge-int-yaml",
    ),
    pytest.param('{"service": {"port": ' + "9" * 5000 + "}}", "", "too large", id="huge-int-json"),
]


@pytest.mark.parametrize(("text", "path", "fragment"), INVALID)
def test_refused(text: str, path: str, fragment: str):
    with pytest.raises(SpecError) as info:
        parse_spec(text)
    error = info.value
    assert error.path == path, error.reason
    assert fragment in error.reason
    assert str(error).startswith("perch.dev/spec: " + (f"{path}: " if path else ""))


# --------------------------------------------------------------------------------------------
# Hostile documents fail fast and small
# --------------------------------------------------------------------------------------------


def refused_quickly(text: str, *, seconds: float = 1.0, megabytes: float = 20.0) -> SpecError:
    """Refused within `seconds`, and allocating at most `megabytes` meanwhile.

    Timed and measured in two runs, because tracemalloc slows Python code down several times.
    """
    started = time.perf_counter()
    with pytest.raises(SpecError) as info:
        parse_spec(text)
    elapsed = time.perf_counter() - started
    assert elapsed < seconds, f"took {elapsed:.2f}s"
    tracemalloc.start()
    try:
        with pytest.raises(SpecError):
            parse_spec(text)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < megabytes * 2**20, f"peaked at {peak / 2**20:.1f} MiB"
    return info.value


def test_billion_laughs_fails_fast_with_little_memory():
    error = refused_quickly(BILLION_LAUGHS, megabytes=2)
    assert "aliases are not allowed" in error.reason


def test_alias_bomb_in_json_looking_flow_yaml_fails_fast():
    bomb = "{a: &a [x, x, x, x, x, x, x, x], b: &b [*a, *a, *a, *a, *a, *a, *a, *a], c: [*b, *b]}"
    assert "aliases are not allowed" in refused_quickly(bomb, megabytes=2).reason


@pytest.mark.parametrize(
    ("text", "path"),
    [
        pytest.param(
            "a: " + "[" * 60_000 + "]" * 0, "a" + "[0]" * (MAX_DEPTH - 1), id="yaml-flow-60000"
        ),
        pytest.param(
            "service: " + "{a: " * 40 + "1" + "}" * 40,
            "service" + ".a" * (MAX_DEPTH - 1),
            id="yaml-flow-maps",
        ),
        pytest.param(
            "".join("  " * i + f"k{i}:\n" for i in range(40)) + "  " * 40 + "v\n",
            ".".join(f"k{i}" for i in range(MAX_DEPTH)),
            id="yaml-block",
        ),
        pytest.param('{"service": ' + "[" * 30_000 + "]" * 30_000 + "}", "", id="json-30000"),
        pytest.param(
            '{"service": ' + "[" * 40 + "]" * 40 + "}",
            "service" + "[0]" * (MAX_DEPTH - 1),
            id="json-40",
        ),
    ],
)
def test_deep_nesting_is_refused_fast(text: str, path: str):
    assert len(text.encode()) <= MAX_SPEC_BYTES
    error = refused_quickly(text)
    assert "nested deeper than 32 levels" in error.reason
    assert error.path == path


def test_nesting_up_to_the_limit_is_fine():
    # 32 levels: the document, service, trafficPolicy and 29 more.
    policy = "{a: " * 29 + "1" + "}" * 29
    spec = parse_spec(f"service: {{port: 9898, trafficPolicy: {policy}}}")
    assert spec.service.traffic_policy is not None


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(MINIMAL + "#" * MAX_SPEC_BYTES, id="ascii"),
        pytest.param(MINIMAL + "# " + "é" * (MAX_SPEC_BYTES // 2), id="multibyte"),
        pytest.param("[" * (10 * MAX_SPEC_BYTES), id="huge-nesting"),
        pytest.param("a: " + "x" * (50 * MAX_SPEC_BYTES), id="50x"),
    ],
)
def test_documents_over_64_kib_are_refused_before_parsing(text: str):
    error = refused_quickly(text, seconds=0.5, megabytes=60)
    assert error.path == ""
    assert "larger than 64 KiB" in error.reason


def test_a_document_of_exactly_64_kib_is_parsed():
    text = MINIMAL + "#" * (MAX_SPEC_BYTES - len(MINIMAL))
    assert len(text.encode()) == MAX_SPEC_BYTES
    assert parse_spec(text).service.port == 9898


def test_mutated_seeds_never_raise_anything_but_spec_error():
    rng = random.Random(20240601)
    alphabet = "{}[]:,-&*!|>'\"#%@`\t\n ?0123456789aZ~."
    for base in (SEED_EARLY, SEED_CURRENT, json.dumps(yaml.safe_load(SEED_CURRENT))):
        for _ in range(150):
            chars = list(base)
            for _ in range(rng.randint(1, 4)):
                at = rng.randrange(len(chars))
                operation = rng.choice(("insert", "delete", "replace"))
                if operation == "insert":
                    chars.insert(at, rng.choice(alphabet))
                elif operation == "delete":
                    del chars[at]
                else:
                    chars[at] = rng.choice(alphabet)
            with contextlib.suppress(SpecError):
                parse_spec("".join(chars))


# --------------------------------------------------------------------------------------------
# Traffic: A/B match conditions, mirroring, session affinity
# --------------------------------------------------------------------------------------------

GATEWAY = "provider: gatewayapi\n"
AB = "iterations: 3\nmatch:\n"


def test_ab_testing_match_is_kept_as_flagger_writes_it():
    spec = parse_spec(
        with_analysis(
            AB + "- headers: {x-canary: {exact: insider}}\n"
            "- headers: {cookie: {regex: '^(.*?;)?(canary=always)(;.*)?$'}}\n"
            "- sourceLabels: {app: tester}\n"
        )
    )
    assert spec.analysis.strategy == "ab-testing"
    assert [to_plain(m) for m in spec.analysis.match] == [
        {"headers": {"x-canary": {"exact": "insider"}}},
        {"headers": {"cookie": {"regex": "^(.*?;)?(canary=always)(;.*)?$"}}},
        {"sourceLabels": {"app": "tester"}},
    ]


def test_a_gateway_api_match_takes_what_an_http_route_match_can_say():
    spec = parse_spec(
        GATEWAY
        + with_analysis(
            AB + "- headers: {x-canary: {exact: insider}, cookie: {regex: 'canary=always'}}\n"
            "  uri: {prefix: /api}\n  method: {exact: GET}\n  queryParams: {beta: {exact: 'on'}}\n"
        )
    )
    assert spec.analysis.strategy == "ab-testing" and len(spec.analysis.match) == 1


def test_session_affinity_with_flaggers_fields():
    spec = parse_spec(
        with_analysis(
            "stepWeight: 20\nsessionAffinity:\n  cookieName: flagger-cookie\n  maxAge: 21600\n"
            "  primaryCookieName: primary-flagger-cookie\n  sameSite: Strict\n  secure: true\n"
            "  httpOnly: true\n  domain: example.com\n  path: /app\n"
        )
    )
    assert spec.analysis.session_affinity == SessionAffinity(
        cookie_name="flagger-cookie",
        max_age=21600,
        primary_cookie_name="primary-flagger-cookie",
        domain="example.com",
        path="/app",
        same_site="Strict",
        http_only=True,
        secure=True,
    )
    default = parse_spec(with_analysis("sessionAffinity: {cookieName: c}")).analysis
    assert default.session_affinity == SessionAffinity(cookie_name="c", max_age=86400)
    assert default.strategy == "canary"


def test_blue_green_mirror_for_both_providers():
    for top in ("", GATEWAY, "provider: gatewayapi:v1\n"):
        analysis = parse_spec(
            top + with_analysis("iterations: 5\nmirror: true\nmirrorWeight: 25")
        ).analysis
        assert (analysis.strategy, analysis.mirror, analysis.mirror_weight) == (
            "blue-green",
            True,
            25,
        )
    # Without mirrorWeight every request is mirrored, which the v1beta1 filter can do.
    parse_spec("provider: gatewayapi:v1beta1\n" + with_analysis("iterations: 5\nmirror: true"))


@pytest.mark.parametrize(
    ("analysis", "warning"),
    [
        ("match: [{headers: {x: {exact: y}}}]", "analysis.match has no effect without iterations"),
        (
            "stepWeight: 10\niterations: 2\nmatch: [{headers: {x: {exact: y}}}]",
            "analysis.match has no effect without iterations",
        ),
        ("iterations: 2\nmirrorWeight: 10", "analysis.mirrorWeight has no effect without mirror"),
    ],
)
def test_traffic_fields_without_effect_are_accepted_with_a_warning(analysis: str, warning: str):
    assert any(warning in w for w in parse_spec(with_analysis(analysis)).warnings)


TRAFFIC_REFUSED = [
    pytest.param(
        GATEWAY + with_analysis(AB + "- sourceLabels: {app: tester}"),
        "analysis.match[0].sourceLabels",
        "the Gateway API cannot match on sourceLabels (Istio can)",
        id="gateway-source-labels",
    ),
    pytest.param(
        GATEWAY + with_analysis(AB + "- headers: {x-canary: {exact: a}}\n- authority: {exact: b}"),
        "analysis.match[1].authority",
        "the Gateway API cannot match on authority",
        id="gateway-authority",
    ),
    pytest.param(
        GATEWAY + with_analysis(AB + "- headers: {user-agent: {prefix: Mozilla}}"),
        "analysis.match[0].headers.user-agent.prefix",
        "the Gateway API's header match has no prefix match (only exact, regex)",
        id="gateway-header-prefix",
    ),
    pytest.param(
        GATEWAY + with_analysis(AB + "- method: {regex: 'GET|HEAD'}"),
        "analysis.match[0].method.regex",
        "method match has no regex match (only exact)",
        id="gateway-method-regex",
    ),
    pytest.param(
        GATEWAY + with_analysis(AB + "- method: {exact: FETCH}"),
        "analysis.match[0].method.exact",
        "FETCH",
        id="gateway-method-unknown",
    ),
    pytest.param(
        GATEWAY + with_analysis(AB + "- uri: {prefix: api}"),
        "analysis.match[0].uri.prefix",
        "a Gateway API path starts with '/'",
        id="gateway-path-relative",
    ),
    pytest.param(
        GATEWAY + with_analysis(AB + "- headers: {'x canary': {exact: a}}"),
        'analysis.match[0].headers["x canary"]',
        "is not an HTTP header name",
        id="gateway-header-name",
    ),
    pytest.param(
        with_analysis(AB + "- queryParams: {beta: {prefix: o}}"),
        "analysis.match[0].queryParams.beta.prefix",
        "Istio's query parameter match has no prefix match",
        id="istio-query-prefix",
    ),
    pytest.param(
        with_analysis(AB + "- headers: {X-Canary: {exact: insider}}"),
        "analysis.match[0].headers.X-Canary",
        "Istio matches header names in lower case: write x-canary",
        id="istio-header-case",
    ),
    pytest.param(
        with_analysis(AB + "- headers: {x-canary: {exact: a, regex: b}}"),
        "analysis.match[0].headers.x-canary",
        "give exactly one of exact, prefix, regex",
        id="two-kinds",
    ),
    pytest.param(
        with_analysis(AB + "- headers: {x-canary: {suffix: a}}"),
        "analysis.match[0].headers.x-canary.suffix",
        "suffix",
        id="unknown-kind",
    ),
    pytest.param(
        with_analysis(AB + "- header: {x-canary: {exact: a}}"),
        "analysis.match[0].header",
        "did you mean headers?",
        id="match-typo",
    ),
    pytest.param(
        with_analysis(AB + "- {}"),
        "analysis.match[0]",
        "an empty match condition matches every request",
        id="empty-condition",
    ),
    pytest.param(
        with_analysis(AB + "- sourceLabels: {app: 3}"),
        "analysis.match[0].sourceLabels.app",
        "expected a string",
        id="source-label-number",
    ),
    pytest.param(
        with_analysis("stepWeight: 10\nmirror: true"),
        "analysis.mirror",
        "mirroring runs during blue/green iterations",
        id="mirror-with-weights",
    ),
    pytest.param(
        with_analysis(AB + "- headers: {x: {exact: y}}\nmirror: true"),
        "analysis.mirror",
        "with match it is A/B testing",
        id="mirror-with-match",
    ),
    pytest.param(
        "provider: gatewayapi:v1beta1\n"
        + with_analysis("iterations: 3\nmirror: true\nmirrorWeight: 10"),
        "analysis.mirrorWeight",
        "has no percent",
        id="mirror-weight-v1beta1",
    ),
    pytest.param(
        with_analysis("iterations: 3\nsessionAffinity: {cookieName: c}"),
        "analysis.sessionAffinity",
        "goes with stepWeight or stepWeights",
        id="affinity-blue-green",
    ),
    pytest.param(
        with_analysis("sessionAffinity: {maxAge: 60}"),
        "analysis.sessionAffinity.cookieName",
        "required",
        id="affinity-without-cookie",
    ),
    pytest.param(
        with_analysis("sessionAffinity: {cookieName: c, primaryCookieName: c}"),
        "analysis.sessionAffinity.primaryCookieName",
        "must differ from cookieName c",
        id="affinity-same-cookies",
    ),
    pytest.param(
        with_analysis("sessionAffinity: {cookieName: 'a;b'}"),
        "analysis.sessionAffinity.cookieName",
        "is not a cookie name",
        id="affinity-cookie-name",
    ),
    pytest.param(
        with_analysis("sessionAffinity: {cookieName: c, sameSite: lax}"),
        "analysis.sessionAffinity.sameSite",
        "did you mean Lax?",
        id="affinity-same-site",
    ),
    pytest.param(
        with_analysis("sessionAffinity: {cookieName: c, maxAge: 0}"),
        "analysis.sessionAffinity.maxAge",
        "must be 1 or more",
        id="affinity-max-age",
    ),
    pytest.param(
        with_analysis("sessionAffinity: {cookieName: c, cookiePath: /}"),
        "analysis.sessionAffinity.cookiePath",
        "unknown field",
        id="affinity-unknown-field",
    ),
]


@pytest.mark.parametrize(("text", "path", "fragment"), TRAFFIC_REFUSED)
def test_traffic_a_router_cannot_express_is_refused_naming_the_field(
    text: str, path: str, fragment: str
):
    with pytest.raises(SpecError) as info:
        parse_spec(text)
    assert (info.value.path, fragment in info.value.reason) == (path, True), info.value.reason
