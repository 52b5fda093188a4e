"""The spec's vocabulary: the closed sets of values it names, Flagger's defaults, and its limits.

Kept apart from the models and the result types because all of them (and the analyzer, the
routers and the webhook) speak these words: a ``Literal`` here is both the type of a result field
and the list of choices a refusal offers ("one of: abort, proceed, wait").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final, Literal, TypeAlias, get_args

Provider: TypeAlias = Literal["istio", "gatewayapi"]
GatewayApiVersion: TypeAlias = Literal["v1", "v1beta1"]
WebhookType: TypeAlias = Literal[
    "confirm-rollout",
    "pre-rollout",
    "rollout",
    "confirm-traffic-increase",
    "confirm-promotion",
    "post-rollout",
    "rollback",
    "event",
]
# What a confirm gate with maxWait does once it has not approved within maxWait.
OnTimeout: TypeAlias = Literal["abort", "proceed", "wait"]
# What a metric without data in its window means (beyond Flagger, which always fails it): a failed
# check; a pass (a counter of errors that stays silent when there are none); or not judged this
# interval (the other metrics decide; an interval where no metric could be judged holds).
NoDataPolicy: TypeAlias = Literal["fail", "pass", "skip"]
Severity: TypeAlias = Literal["info", "warn", "error"]
BuiltinMetric: TypeAlias = Literal["request-success-rate", "request-duration"]
# Which Istio latency histogram request-duration reads: the seed's Istio exported
# istio_request_duration_seconds_bucket, Istio >= 1.5 exports the milliseconds one.
HistogramUnit: TypeAlias = Literal["seconds", "milliseconds"]
AutoscalerKind: TypeAlias = Literal["HorizontalPodAutoscaler", "ScaledObject"]
# "analysis" is the current form; "canaryAnalysis" is Flagger's early form (the seed article).
SpecForm: TypeAlias = Literal["analysis", "canaryAnalysis"]
# How Flagger reads an analysis: weights in steps (canary), or a fixed number of iterations with
# all traffic (blue-green) or with the match conditions (ab-testing) sent to the canary.
Strategy: TypeAlias = Literal["canary", "ab-testing", "blue-green"]
# The SameSite attribute of the session-affinity cookies (Flagger's spelling).
SameSite: TypeAlias = Literal["Strict", "Lax", "None"]

DEFAULT_PROVIDER: Final[Provider] = "istio"
DEFAULT_PROGRESS_DEADLINE_SECONDS: Final = 600
DEFAULT_PORT_NAME: Final = "http"
DEFAULT_INTERVAL: Final = "60s"
DEFAULT_THRESHOLD: Final = 1
DEFAULT_MAX_WEIGHT: Final = 50
DEFAULT_STEP_WEIGHT: Final = 10
DEFAULT_PRIMARY_READY_THRESHOLD: Final = 100
DEFAULT_CANARY_READY_THRESHOLD: Final = 100
DEFAULT_METRIC_INTERVAL: Final = "1m"
DEFAULT_HISTOGRAM_UNIT: Final[HistogramUnit] = "milliseconds"
DEFAULT_WEBHOOK_TYPE: Final[WebhookType] = "rollout"
DEFAULT_WEBHOOK_TIMEOUT: Final = "10s"
DEFAULT_ON_TIMEOUT: Final[OnTimeout] = "abort"
DEFAULT_ON_NO_DATA: Final[NoDataPolicy] = "fail"
DEFAULT_SEVERITY: Final[Severity] = "info"
DEFAULT_GATEWAY_GROUP: Final = "gateway.networking.k8s.io"
DEFAULT_GATEWAY_KIND: Final = "Gateway"
DEFAULT_COOKIE_MAX_AGE: Final = 86400  # Flagger's: one day

# Checked on the raw text before parsing: an annotation this large is a mistake or an attack.
MAX_SPEC_BYTES: Final = 64 * 1024
# Mappings and lists nested deeper than this are refused while composing; the deepest legitimate
# field (service.trafficPolicy.loadBalancer.consistentHash.httpCookie.ttl) is at depth 6.
MAX_DEPTH: Final = 32

BUILTIN_METRICS: Final[tuple[BuiltinMetric, ...]] = get_args(BuiltinMetric)
WEBHOOK_TYPES: Final[tuple[WebhookType, ...]] = get_args(WebhookType)
# The gates whose non-2xx means "not approved yet": the canary waits (maxWait bounds the wait).
CONFIRM_WEBHOOK_TYPES: Final[tuple[WebhookType, ...]] = (
    "confirm-rollout",
    "confirm-traffic-increase",
    "confirm-promotion",
)
ON_TIMEOUTS: Final[tuple[OnTimeout, ...]] = get_args(OnTimeout)
NO_DATA_POLICIES: Final[tuple[NoDataPolicy, ...]] = get_args(NoDataPolicy)
SEVERITIES: Final[tuple[Severity, ...]] = get_args(Severity)
SAME_SITES: Final[tuple[SameSite, ...]] = get_args(SameSite)
# The accepted spellings of ``provider``: the two routers, the Gateway API with its version.
PROVIDERS: Final[Mapping[str, tuple[Provider, GatewayApiVersion | None]]] = {
    "istio": ("istio", None),
    "gatewayapi": ("gatewayapi", None),
    "gatewayapi:v1": ("gatewayapi", "v1"),
    "gatewayapi:v1beta1": ("gatewayapi", "v1beta1"),
}
# Flagger's other providers: named in the refusal, so that a pasted spec says why it is refused.
FLAGGER_ONLY_PROVIDERS: Final = frozenset(
    {
        "apisix", "appmesh", "appmesh:v1beta2", "contour", "gloo", "knative", "kubernetes",
        "kuma", "linkerd", "nginx", "osm", "skipper", "smi:v1alpha1", "smi:v1alpha2",
        "smi:v1alpha3", "traefik",
    }
)  # fmt: skip
# The API group each autoscaler kind lives in (its apiVersion is <group>/<version>).
AUTOSCALER_GROUPS: Final[Mapping[AutoscalerKind, str]] = {
    "HorizontalPodAutoscaler": "autoscaling",
    "ScaledObject": "keda.sh",
}
