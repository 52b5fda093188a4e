"""The ``perch.dev/spec`` annotation: text (YAML or JSON) in, a typed and immutable spec out.

The document has the shape of the ``spec`` of a Flagger ``Canary`` (flagger.app/v1beta1) minus
``targetRef``, so that a Flagger user can move a Canary's spec into one annotation. Two forms:

* the current (documented) one: ``analysis``, metrics with ``thresholdRange``, builtin metric
  names ``request-success-rate`` and ``request-duration``;
* Flagger's early one (the seed article): ``canaryAnalysis`` instead of ``analysis``, each metric
  with a single ``threshold`` (a minimum in percent for ``istio_requests_total``, a maximum in
  milliseconds for ``istio_request_duration_seconds_bucket``), webhooks without ``type``
  (meaning ``rollout``). It is read with exactly that meaning and normalised to the current one;
  :attr:`CanarySpec.form` records which was written, and :attr:`Metric.histogram_unit` which
  latency histogram was asked for, because the analyzer must query that series.

Beyond Flagger, a metric may be judged against the primary over the same window:
``primary: {maxDelta, maxRatio}`` (see :class:`PrimaryComparison`). A metric needs a
``thresholdRange`` (or the early ``threshold``), a ``primary`` comparison, or both; with both, both
must pass.

Missing values take Flagger's defaults (``DEFAULT_*`` below). ``service.port`` has no default, so
:func:`parse_spec` refuses a missing or empty annotation with a :class:`SpecError` naming
``service.port``: the webhook calls it only for opted-in Deployments, and an opted-in Deployment
without a spec cannot be routed.

Everything that does not parse or validate raises :class:`SpecError` naming the field path and the
reason, which the webhook turns into the admission denial. The loader is defensive because the
text comes from any user who may edit a Deployment: the size is checked before parsing, YAML
aliases (and so every "billion laughs" bomb) are refused at the first ``*alias``, nesting is
capped while composing (before Python's recursion limit could be reached), duplicate keys and
non-JSON values (timestamps, binary, sets, custom tags, NaN/infinity) are refused, and no value is
ever coerced between types (``"9898"`` is not a port; YAML's ``yes`` is not a number).

Pure: no I/O; imports only the standard library, PyYAML and perch's pure modules.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final, Literal, TypeAlias, TypeVar, cast, get_args
from urllib.parse import urlsplit

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from perch.durations import DurationError, is_prometheus_duration, parse_duration
from perch.names import ANNOTATION_SPEC

__all__ = [
    "BUILTIN_METRICS",
    "CONFIRM_WEBHOOK_TYPES",
    "DEFAULT_CANARY_READY_THRESHOLD",
    "DEFAULT_COOKIE_MAX_AGE",
    "DEFAULT_GATEWAY_GROUP",
    "DEFAULT_GATEWAY_KIND",
    "DEFAULT_HISTOGRAM_UNIT",
    "DEFAULT_INTERVAL",
    "DEFAULT_MAX_WEIGHT",
    "DEFAULT_METRIC_INTERVAL",
    "DEFAULT_ON_NO_DATA",
    "DEFAULT_ON_TIMEOUT",
    "DEFAULT_PORT_NAME",
    "DEFAULT_PRIMARY_READY_THRESHOLD",
    "DEFAULT_PROGRESS_DEADLINE_SECONDS",
    "DEFAULT_PROVIDER",
    "DEFAULT_SEVERITY",
    "DEFAULT_STEP_WEIGHT",
    "DEFAULT_THRESHOLD",
    "DEFAULT_WEBHOOK_TIMEOUT",
    "DEFAULT_WEBHOOK_TYPE",
    "EARLY_METRIC_NAMES",
    "MAX_DEPTH",
    "MAX_SPEC_BYTES",
    "Alert",
    "Analysis",
    "AutoscalerRef",
    "BuiltinMetric",
    "CanarySpec",
    "CrossNamespaceRef",
    "FrozenDict",
    "GatewayRef",
    "HeaderOperations",
    "Headers",
    "HistogramUnit",
    "JsonValue",
    "Metric",
    "NoDataPolicy",
    "OnTimeout",
    "PrimaryComparison",
    "Provider",
    "Retries",
    "Rewrite",
    "SameSite",
    "ScalerReplicas",
    "Service",
    "SessionAffinity",
    "Severity",
    "SpecError",
    "SpecForm",
    "Strategy",
    "TargetRef",
    "ThresholdRange",
    "Webhook",
    "WebhookType",
    "parse_spec",
    "to_plain",
]

# --------------------------------------------------------------------------------------------
# Enumerations and defaults
# --------------------------------------------------------------------------------------------

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
# The early form's metric names, normalised to the builtins; the histogram unit is kept.
EARLY_METRIC_NAMES: Final[Mapping[str, tuple[BuiltinMetric, HistogramUnit | None]]] = {
    "istio_requests_total": ("request-success-rate", None),
    "istio_request_duration_seconds_bucket": ("request-duration", "seconds"),
    "istio_request_duration_milliseconds_bucket": ("request-duration", "milliseconds"),
}
_METRIC_NAMES: Final[Mapping[str, tuple[BuiltinMetric, HistogramUnit | None]]] = {
    "request-success-rate": ("request-success-rate", None),
    "request-duration": ("request-duration", DEFAULT_HISTOGRAM_UNIT),
    **EARLY_METRIC_NAMES,
}
_WEBHOOK_TYPES: Final[tuple[WebhookType, ...]] = get_args(WebhookType)
# The gates whose non-2xx means "not approved yet": the canary waits (maxWait bounds the wait).
CONFIRM_WEBHOOK_TYPES: Final[tuple[WebhookType, ...]] = (
    "confirm-rollout",
    "confirm-traffic-increase",
    "confirm-promotion",
)
_ON_TIMEOUTS: Final[tuple[OnTimeout, ...]] = get_args(OnTimeout)
_NO_DATA_POLICIES: Final[tuple[NoDataPolicy, ...]] = get_args(NoDataPolicy)
# A templateVariables key, as a query template can name it: {{ variables.<key> }}.
_TEMPLATE_VARIABLE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_SEVERITIES: Final[tuple[Severity, ...]] = get_args(Severity)
_PROVIDERS: Final[Mapping[str, tuple[Provider, GatewayApiVersion | None]]] = {
    "istio": ("istio", None),
    "gatewayapi": ("gatewayapi", None),
    "gatewayapi:v1": ("gatewayapi", "v1"),
    "gatewayapi:v1beta1": ("gatewayapi", "v1beta1"),
}
_FLAGGER_ONLY_PROVIDERS: Final = frozenset(
    {
        "apisix", "appmesh", "appmesh:v1beta2", "contour", "gloo", "knative", "kubernetes",
        "kuma", "linkerd", "nginx", "osm", "skipper", "smi:v1alpha1", "smi:v1alpha2",
        "smi:v1alpha3", "traefik",
    }
)  # fmt: skip

# --------------------------------------------------------------------------------------------
# Immutable free-form values
# --------------------------------------------------------------------------------------------

_V_co = TypeVar("_V_co", covariant=True)


class FrozenDict(Mapping[str, _V_co]):
    """A read-only, hashable mapping.

    Free-form parts of the spec (trafficPolicy, corsPolicy, match conditions, webhook metadata)
    are kept as FrozenDicts of frozen JSON values (nested FrozenDicts and tuples) rather than as
    MappingProxyType over dicts, because a proxy is shallow (its nested dicts stay mutable) and
    unhashable (so a CanarySpec holding one could not be hashed or cached). :func:`to_plain`
    turns one back into plain dicts and lists for building Kubernetes objects.
    """

    __slots__ = ("_data", "_hash")

    def __init__(self, data: Mapping[str, _V_co] | None = None) -> None:
        self._data: dict[str, _V_co] = dict(data) if data else {}
        self._hash: int | None = None

    def __getitem__(self, key: str) -> _V_co:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(frozenset(self._data.items()))
        return self._hash

    def __repr__(self) -> str:
        return f"FrozenDict({self._data!r})"


# A JSON value made immutable: objects are FrozenDicts and arrays are tuples.
JsonValue: TypeAlias = (
    "str | int | float | bool | FrozenDict[JsonValue] | tuple[JsonValue, ...] | None"
)

_EMPTY: FrozenDict[Any] = FrozenDict()


def to_plain(value: JsonValue) -> Any:
    """A frozen JSON value as fresh plain dicts and lists (e.g. to embed in a Kubernetes object)."""
    if isinstance(value, FrozenDict):
        return {key: to_plain(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return [to_plain(item) for item in value]
    return value


def _freeze(value: object) -> JsonValue:
    # The loaders hand out only dicts, lists and JSON scalars.
    if isinstance(value, dict):
        return FrozenDict({key: _freeze(item) for key, item in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(item) for item in value)
    return cast(JsonValue, value)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class SpecError(ValueError):
    """The annotation does not parse or validate.

    ``path`` names the field (``analysis.metrics[1].thresholdRange``; empty for the document as a
    whole) and ``reason`` says what is wrong; ``str()`` is the message for the admission denial,
    e.g. ``perch.dev/spec: analysis.stepWeight: stepWeight 60 is more than maxWeight 50``.
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(path, reason)
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        if self.path:
            return f"{ANNOTATION_SPEC}: {self.path}: {self.reason}"
        return f"{ANNOTATION_SPEC}: {self.reason}"


# --------------------------------------------------------------------------------------------
# The typed spec
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TargetRef:
    """Flagger's ``targetRef``, tolerated so that a whole Flagger spec can be pasted.

    Perch's target is always the annotated Deployment; the webhook should check that ``name``
    matches it (the parser cannot know the Deployment's name).
    """

    name: str
    api_version: str = "apps/v1"
    kind: Literal["Deployment"] = "Deployment"


@dataclass(frozen=True, slots=True)
class ScalerReplicas:
    min_replicas: int | None = None
    max_replicas: int | None = None


@dataclass(frozen=True, slots=True)
class AutoscalerRef:
    api_version: str
    kind: AutoscalerKind
    name: str
    primary_scaler_queries: FrozenDict[str] = _EMPTY
    primary_scaler_replicas: ScalerReplicas | None = None


@dataclass(frozen=True, slots=True)
class GatewayRef:
    """A Gateway API parentRef for the HTTPRoute (``service.gatewayRefs[]``)."""

    name: str
    namespace: str | None = None
    section_name: str | None = None
    port: int | None = None
    group: str = DEFAULT_GATEWAY_GROUP
    kind: str = DEFAULT_GATEWAY_KIND

    def to_wire(self) -> dict[str, Any]:
        """As a Gateway API ``parentRefs`` item."""
        wire: dict[str, Any] = {"group": self.group, "kind": self.kind, "name": self.name}
        for key, value in (
            ("namespace", self.namespace),
            ("sectionName", self.section_name),
            ("port", self.port),
        ):
            if value is not None:
                wire[key] = value
        return wire


@dataclass(frozen=True, slots=True)
class Retries:
    attempts: int | None = None
    per_try_timeout: str | None = None
    per_try_timeout_seconds: float | None = None
    retry_on: str | None = None

    def to_wire(self) -> dict[str, Any]:
        """As an Istio ``HTTPRetry`` (the shape Flagger's spec uses)."""
        wire: dict[str, Any] = {}
        for key, value in (
            ("attempts", self.attempts),
            ("perTryTimeout", self.per_try_timeout),
            ("retryOn", self.retry_on),
        ):
            if value is not None:
                wire[key] = value
        return wire


@dataclass(frozen=True, slots=True)
class HeaderOperations:
    set: FrozenDict[str] = _EMPTY
    add: FrozenDict[str] = _EMPTY
    remove: tuple[str, ...] = ()

    def to_wire(self) -> dict[str, Any]:
        """As an Istio ``HeaderOperations``; empty operations are left out."""
        wire: dict[str, Any] = {}
        if self.set:
            wire["set"] = dict(self.set)
        if self.add:
            wire["add"] = dict(self.add)
        if self.remove:
            wire["remove"] = list(self.remove)
        return wire


@dataclass(frozen=True, slots=True)
class Headers:
    request: HeaderOperations | None = None
    response: HeaderOperations | None = None

    def to_wire(self) -> dict[str, Any]:
        """As an Istio ``Headers`` (``{request: {set, add, remove}, response: {...}}``)."""
        wire: dict[str, Any] = {}
        if self.request is not None:
            wire["request"] = self.request.to_wire()
        if self.response is not None:
            wire["response"] = self.response.to_wire()
        return wire


@dataclass(frozen=True, slots=True)
class Rewrite:
    uri: str | None = None
    authority: str | None = None
    # Gateway API only: ReplacePrefixMatch (default) or ReplaceFullPath.
    type: str | None = None

    def to_wire(self) -> dict[str, Any]:
        """As in Flagger's spec (Istio's ``HTTPRewrite`` plus the Gateway API's ``type``)."""
        wire: dict[str, Any] = {}
        for key, value in (("uri", self.uri), ("authority", self.authority), ("type", self.type)):
            if value is not None:
                wire[key] = value
        return wire


@dataclass(frozen=True, slots=True)
class Service:
    """``service``: how the canary is routed. ``target_port`` defaults to ``port``."""

    port: int
    target_port: int | str
    name: str | None = None
    port_name: str = DEFAULT_PORT_NAME
    port_discovery: bool = False
    app_protocol: str | None = None
    gateways: tuple[str, ...] = ()
    gateway_refs: tuple[GatewayRef, ...] = ()
    hosts: tuple[str, ...] = ()
    traffic_policy: FrozenDict[JsonValue] | None = None
    timeout: str | None = None
    timeout_seconds: float | None = None
    retries: Retries | None = None
    headers: Headers | None = None
    match: tuple[FrozenDict[JsonValue], ...] = ()
    rewrite: Rewrite | None = None
    cors_policy: FrozenDict[JsonValue] | None = None


@dataclass(frozen=True, slots=True)
class ThresholdRange:
    """Accepted values of a metric, bounds inclusive.

    At least one bound is set, except for a metric judged only against the primary (its
    ``primary`` is set and its range is empty: :attr:`has_bounds` is False).

    Units: percent for request-success-rate, milliseconds for request-duration (whichever
    histogram is read), the query's own unit for custom metrics.
    """

    min: float | None = None
    max: float | None = None

    @property
    def has_bounds(self) -> bool:
        """False for the empty range of a metric judged only against the primary."""
        return self.min is not None or self.max is not None

    def contains(self, value: float) -> bool:
        if self.min is not None and value < self.min:
            return False
        return self.max is None or value <= self.max


@dataclass(frozen=True, slots=True)
class PrimaryComparison:
    """``primary``: how much worse than the primary, over the same window, the canary may be.

    ``max_delta``: by how much, in the metric's unit; ``max_ratio``: how many times the primary's
    value. At least one is set, both are finite and >= 0. "Worse" is higher, except for
    request-success-rate, which is compared on its error rate (100 - success rate): ``maxDelta:
    1`` reads "the canary's error rate at most 1 point above the primary's", and on
    request-duration ``maxRatio: 1.5`` reads "its p99 at most 1.5 times the primary's". With
    both, both must hold.
    """

    max_delta: float | None = None
    max_ratio: float | None = None


@dataclass(frozen=True, slots=True)
class CrossNamespaceRef:
    """A reference by name, in the canary's namespace unless ``namespace`` is given."""

    name: str
    namespace: str | None = None


@dataclass(frozen=True, slots=True)
class Metric:
    """One metric check.

    ``builtin`` is set for the builtin checks (early names normalised) and None for custom ones
    (``query`` or ``template_ref``). ``histogram_unit`` is set only for request-duration.
    ``interval`` is a valid PromQL duration (a bare number of seconds gets an ``s``), ready to be
    rendered as ``{{ interval }}``. ``primary`` (beyond Flagger) also judges the canary against
    the primary; a metric with ``primary`` may have an empty ``threshold_range``, and then only
    the comparison applies. ``on_no_data`` (``onNoData``, beyond Flagger) says what a window
    without data means: a failed check (the default), a pass, or no verdict (``skip``).
    """

    name: str
    threshold_range: ThresholdRange
    interval: str = DEFAULT_METRIC_INTERVAL
    interval_seconds: float = 60.0
    builtin: BuiltinMetric | None = None
    histogram_unit: HistogramUnit | None = None
    query: str | None = None
    template_ref: CrossNamespaceRef | None = None
    template_variables: FrozenDict[str] = _EMPTY
    primary: PrimaryComparison | None = None
    on_no_data: NoDataPolicy = DEFAULT_ON_NO_DATA


@dataclass(frozen=True, slots=True)
class Webhook:
    """A gate or notification hook, called with Flagger's webhook payload.

    ``max_wait`` (confirm gates only; ``None``: wait for ever, as Flagger) bounds how long the
    canary waits for the gate's approval, counted from when it was first asked; ``on_timeout`` is
    what happens then: ``abort`` (roll back), ``proceed`` (as if approved) or ``wait`` (keep
    waiting, with an event). It is only meaningful with ``max_wait``.
    """

    name: str
    url: str
    type: WebhookType = DEFAULT_WEBHOOK_TYPE
    timeout: str = DEFAULT_WEBHOOK_TIMEOUT
    timeout_seconds: float = 10.0
    metadata: FrozenDict[str] = _EMPTY
    mute_alert: bool = False
    retries: int = 0
    disable_tls: bool = False
    max_wait: str | None = None
    max_wait_seconds: float | None = None
    on_timeout: OnTimeout = DEFAULT_ON_TIMEOUT


@dataclass(frozen=True, slots=True)
class Alert:
    name: str
    provider_ref: CrossNamespaceRef
    severity: Severity = DEFAULT_SEVERITY


@dataclass(frozen=True, slots=True)
class SessionAffinity:
    """``analysis.sessionAffinity``: Flagger's cookies that keep a user on the version they got.

    During the analysis the canary's responses set ``cookie_name`` (a value of this release, for
    ``max_age`` seconds) and requests carrying it go to the canary; with ``primary_cookie_name``
    the primary's responses set that cookie (a value of this step, for one interval) and requests
    carrying it go to the primary until the next step. The other fields are cookie attributes.
    """

    cookie_name: str
    max_age: int = DEFAULT_COOKIE_MAX_AGE
    primary_cookie_name: str | None = None
    domain: str | None = None
    path: str | None = None
    same_site: SameSite | None = None
    http_only: bool = False
    secure: bool = False
    partitioned: bool = False


@dataclass(frozen=True, slots=True)
class Analysis:
    """``analysis`` (or the early ``canaryAnalysis``).

    ``max_weight`` is the effective maximum: with ``stepWeights`` and no explicit ``maxWeight`` it
    is the last step weight, as in Flagger. ``step_weight`` keeps its default even when
    ``step_weights`` overrides it; use :attr:`steps`.
    """

    interval: str = DEFAULT_INTERVAL
    interval_seconds: float = 60.0
    threshold: int = DEFAULT_THRESHOLD
    max_weight: int = DEFAULT_MAX_WEIGHT
    step_weight: int = DEFAULT_STEP_WEIGHT
    step_weights: tuple[int, ...] = ()
    step_weight_promotion: int | None = None
    iterations: int | None = None
    strategy: Strategy = "canary"
    mirror: bool = False
    mirror_weight: int | None = None
    primary_ready_threshold: int = DEFAULT_PRIMARY_READY_THRESHOLD
    canary_ready_threshold: int = DEFAULT_CANARY_READY_THRESHOLD
    match: tuple[FrozenDict[JsonValue], ...] = ()
    metrics: tuple[Metric, ...] = ()
    webhooks: tuple[Webhook, ...] = ()
    alerts: tuple[Alert, ...] = ()
    session_affinity: SessionAffinity | None = None

    @property
    def steps(self) -> tuple[int, ...]:
        """The canary weights in order, the last being ``max_weight``; () unless canary strategy.

        stepWeight 5 and maxWeight 50 give 5, 10, ..., 50 (a last step that does not divide
        evenly is capped: 30/50 gives 30, 50); stepWeights are taken as they are, capped at
        maxWeight.
        """
        if self.strategy != "canary":
            return ()
        if self.step_weights:
            capped = (min(weight, self.max_weight) for weight in self.step_weights)
            return tuple(dict.fromkeys(capped))
        return (*range(self.step_weight, self.max_weight, self.step_weight), self.max_weight)

    def webhooks_of(self, *types: WebhookType) -> tuple[Webhook, ...]:
        """The webhooks of the given types, in the order the spec lists them."""
        return tuple(hook for hook in self.webhooks if hook.type in types)


@dataclass(frozen=True, slots=True)
class CanarySpec:
    """The parsed ``perch.dev/spec``.

    ``gateway_api_version`` is set when the provider was spelt ``gatewayapi:v1`` or
    ``gatewayapi:v1beta1``. ``warnings`` are meant for kubectl (admission warnings): things that
    were accepted but have no effect, or that use a deprecated spelling; they take no part in
    equality.
    """

    service: Service
    provider: Provider = DEFAULT_PROVIDER
    gateway_api_version: GatewayApiVersion | None = None
    progress_deadline_seconds: int = DEFAULT_PROGRESS_DEADLINE_SECONDS
    autoscaler_ref: AutoscalerRef | None = None
    analysis: Analysis = field(default_factory=Analysis)
    skip_analysis: bool = False
    suspend: bool = False
    revert_on_deletion: bool = False
    target_ref: TargetRef | None = None
    form: SpecForm = "analysis"
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @property
    def steps(self) -> tuple[int, ...]:
        return self.analysis.steps


# --------------------------------------------------------------------------------------------
# Paths and messages
# --------------------------------------------------------------------------------------------

_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def _key(path: str, key: str) -> str:
    if _PLAIN_KEY.fullmatch(key):
        return f"{path}.{key}" if path else key
    return f"{path}[{json.dumps(key)}]"


def _item(path: str, index: int) -> str:
    return f"{path}[{index}]"


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({'true' if value else 'false'})"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the string {json.dumps(_short(value))}"
    if isinstance(value, list):
        return "a list"
    return "a mapping"


_BOOLEAN_HINT = "; note that YAML reads unquoted yes, no, on, off, true and false as booleans"


def _type_error(path: str, expected: str, value: object) -> SpecError:
    reason = f"expected {expected}, got {_describe(value)}"
    if isinstance(value, bool):
        reason += _BOOLEAN_HINT
        if expected.startswith("a string"):
            reason += ", so quote the value"
    elif isinstance(value, str) and expected.startswith(("an integer", "a number")):
        try:
            float(value)
        except ValueError:
            pass
        else:
            reason += "; write numbers without quotes"
    elif isinstance(value, (int, float)) and expected.startswith("a string"):
        reason += "; quote the value"
    return SpecError(path, reason)


def _normalised(name: str) -> str:
    return name.replace("_", "").replace("-", "").lower()


def _suggest(word: str, candidates: Iterable[str]) -> str | None:
    """The candidate the user probably meant: same up to case and ``_``/``-``, or close."""
    options = list(candidates)
    for option in options:
        if _normalised(option) == _normalised(word):
            return option
    by_lower = {option.lower(): option for option in options}
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.75)
    return by_lower[close[0]] if close else None


def _one_of(value: str, options: Iterable[str], what: str) -> str:
    options = list(options)
    reason = f"unknown {what} {json.dumps(_short(value))}"
    suggestion = _suggest(value, options)
    if suggestion is not None:
        reason += f"; did you mean {suggestion}?"
    return reason + f" (one of: {', '.join(options)})"


# --------------------------------------------------------------------------------------------
# Loading the text: JSON or YAML into plain dicts, lists and JSON scalars
# --------------------------------------------------------------------------------------------


class _Refusal(Exception):
    """Raised inside the loaders, where a SpecError must not be mistaken for a syntax error."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(path, reason)
        self.path = path
        self.reason = reason


def _where(mark: Any) -> str:
    # Any: the pure-Python and the libyaml loaders have different Mark classes.
    if mark is None:
        return "an unknown position"
    return f"line {mark.line + 1}, column {mark.column + 1}"


_TAG_PREFIX = "tag:yaml.org,2002:"
_STR_TAG, _INT_TAG, _FLOAT_TAG = _TAG_PREFIX + "str", _TAG_PREFIX + "int", _TAG_PREFIX + "float"
_BOOL_TAG, _NULL_TAG = _TAG_PREFIX + "bool", _TAG_PREFIX + "null"
_MAP_TAG, _SEQ_TAG = _TAG_PREFIX + "map", _TAG_PREFIX + "seq"


def _show_tag(tag: str) -> str:
    return "!!" + tag.removeprefix(_TAG_PREFIX) if tag.startswith(_TAG_PREFIX) else tag


class _Loader(yaml.SafeLoader):
    """A SafeLoader that produces JSON-compatible data only.

    Implicit resolution is YAML 1.1's (as kubectl reads manifests) for booleans and null, but
    without timestamps (``2024-01-01`` stays a string), merge keys (``<<``) and value (``=``)
    keys, and without base-60 numbers (``1:30`` stays a string); a number with an exponent and no
    dot (``1e3``) is a float, as in JSON. Aliases are refused outright, which defuses every
    alias-expansion bomb before anything is expanded; nesting is capped while composing, with the
    path of the offending node.

    Pure Python on purpose: libyaml's CParser composes in C, out of reach of these hooks. The
    price is speed on hostile input: the scanner looks up to 1024 characters ahead for simple
    keys, so 64 KiB of ``[`` costs about a quarter of a second before the cap refuses it.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._path: list[str] = [""]
        self._depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        path = self._path[-1]
        if isinstance(parent, SequenceNode) and isinstance(index, int):
            path = _item(path, index)
        elif isinstance(parent, MappingNode) and isinstance(index, ScalarNode):
            path = _key(path, index.value)
        if isinstance(event, yaml.AliasEvent):
            raise _Refusal(
                path,
                f"YAML aliases are not allowed (*{event.anchor} at {_where(event.start_mark)}); "
                "write the value out",
            )
        collection = isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent))
        if collection:
            if isinstance(parent, MappingNode) and index is None:
                raise _Refusal(path, f"mapping keys must be strings ({_where(event.start_mark)})")
            if self._depth >= MAX_DEPTH:
                raise _Refusal(
                    path,
                    f"nested deeper than {MAX_DEPTH} levels ({_where(event.start_mark)})",
                )
        self._path.append(path)
        self._depth += collection
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= collection
            self._path.pop()


# Start from no implicit resolvers at all rather than from SafeLoader's, so that nothing is
# inherited by accident (timestamps, merge keys, base-60 numbers).
_Loader.yaml_implicit_resolvers = {}
for _tag, _pattern, _first in (
    (
        _BOOL_TAG,
        r"^(?:yes|Yes|YES|no|No|NO|true|True|TRUE|false|False|FALSE|on|On|ON|off|Off|OFF)$",
        "yYnNtTfFoO",
    ),
    (
        _INT_TAG,
        r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$",
        "-+0123456789",
    ),
    (
        _FLOAT_TAG,
        r"^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
        "-+0123456789.",
    ),
    (_NULL_TAG, r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
):
    _Loader.add_implicit_resolver(_tag, re.compile(_pattern), list(_first))


def _from_node(loader: _Loader, node: Node, path: str) -> object:
    if isinstance(node, MappingNode):
        if node.tag != _MAP_TAG:
            raise _Refusal(path, f"YAML tag {_show_tag(node.tag)} is not allowed")
        result: dict[str, object] = {}
        seen: dict[str, Node] = {}
        for key_node, value_node in node.value:
            key = _from_node(loader, key_node, path)
            if not isinstance(key, str):
                raise _Refusal(
                    path,
                    f"mapping keys must be strings, got {_describe(key)} "
                    f"({_where(key_node.start_mark)})",
                )
            if key == "<<" and isinstance(key_node, ScalarNode) and key_node.style is None:
                raise _Refusal(path, "YAML merge keys (<<) are not allowed")
            if key in seen:
                raise _Refusal(
                    _key(path, key),
                    f"duplicate key {json.dumps(key)} ({_where(key_node.start_mark)}; "
                    f"first at {_where(seen[key].start_mark)})",
                )
            seen[key] = key_node
            result[key] = _from_node(loader, value_node, _key(path, key))
        return result
    if isinstance(node, SequenceNode):
        if node.tag != _SEQ_TAG:
            raise _Refusal(path, f"YAML tag {_show_tag(node.tag)} is not allowed")
        return [_from_node(loader, item, _item(path, i)) for i, item in enumerate(node.value)]
    assert isinstance(node, ScalarNode)
    try:
        if node.tag == _STR_TAG:
            return loader.construct_yaml_str(node)
        if node.tag == _NULL_TAG:
            return None
        if node.tag == _BOOL_TAG:
            return loader.construct_yaml_bool(node)
        if node.tag == _INT_TAG:
            return loader.construct_yaml_int(node)
        if node.tag == _FLOAT_TAG:
            number = loader.construct_yaml_float(node)
            if not math.isfinite(number):
                raise _Refusal(path, f"{node.value} is not a finite number (not valid in JSON)")
            return number
    except ValueError:  # e.g. an integer of more than 4300 digits, or "0b_"
        raise _Refusal(
            path, f"{_short(node.value)} is not a valid number or is too large"
        ) from None
    raise _Refusal(
        path,
        f"YAML tag {_show_tag(node.tag)} is not allowed; the spec holds strings, numbers, "
        "booleans, lists and mappings only",
    )


class _Pairs(list[tuple[str, object]]):
    """A JSON object as its key/value pairs in order, so that duplicates can be found later."""


def _json_constant(name: str) -> object:
    raise _Refusal("", f"{name} is not a JSON number")


def _from_json(value: object, path: str, depth: int = 0) -> object:
    if isinstance(value, (_Pairs, list)) and depth >= MAX_DEPTH:
        raise _Refusal(path, f"nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, _Pairs):
        result: dict[str, object] = {}
        for key, item in value:
            if key in result:
                raise _Refusal(_key(path, key), f"duplicate key {json.dumps(key)}")
            result[key] = _from_json(item, _key(path, key), depth + 1)
        return result
    if isinstance(value, list):
        return [_from_json(item, _item(path, i), depth + 1) for i, item in enumerate(value)]
    if isinstance(value, float) and not math.isfinite(value):
        raise _Refusal(path, "the number is too large")
    return value


def _load_json(text: str) -> object:
    """Parse JSON; raises json.JSONDecodeError on syntax errors, _Refusal on refused content."""
    try:
        data = json.loads(text, object_pairs_hook=_Pairs, parse_constant=_json_constant)
    except RecursionError:
        raise _Refusal("", f"nested deeper than {MAX_DEPTH} levels") from None
    except json.JSONDecodeError:
        raise
    except ValueError:  # e.g. an integer of more than 4300 digits
        raise _Refusal("", "a number is too large") from None
    return _from_json(data, "")


def _load_yaml(text: str) -> object:
    """Parse YAML; raises yaml.YAMLError on syntax errors, _Refusal on refused content."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        return None if node is None else _from_node(loader, node, "")
    finally:
        loader.dispose()


def _yaml_syntax(error: yaml.YAMLError) -> SpecError:
    if isinstance(error, yaml.MarkedYAMLError):
        problem = error.problem or "invalid syntax"
        if error.context:
            problem = f"{problem} ({error.context} at {_where(error.context_mark)})"
        return SpecError("", f"not valid YAML: {_where(error.problem_mark)}: {problem}")
    return SpecError("", f"not valid YAML: {error}")


def _load(text: str) -> object:
    """Parse the annotation: JSON when it looks like a JSON object and is one, YAML otherwise."""
    text = text.removeprefix("\ufeff")
    try:
        if not text.lstrip().startswith("{"):
            try:
                return _load_yaml(text)
            except yaml.YAMLError as error:
                raise _yaml_syntax(error) from None
        try:
            return _load_json(text)
        except json.JSONDecodeError as json_error:
            # A flow-style YAML mapping ({port: 9898}) is not JSON; when neither parses, report
            # the parser that got further, which is the one the author meant.
            try:
                return _load_yaml(text)
            except yaml.YAMLError as yaml_error:
                mark = getattr(yaml_error, "problem_mark", None)
                if isinstance(mark, yaml.Mark) and mark.index > json_error.pos:
                    raise _yaml_syntax(yaml_error) from None
                raise SpecError(
                    "",
                    f"not valid JSON: line {json_error.lineno}, column {json_error.colno}: "
                    f"{json_error.msg}",
                ) from None
    except _Refusal as refusal:
        raise SpecError(refusal.path, refusal.reason) from None


# --------------------------------------------------------------------------------------------
# Reading fields
# --------------------------------------------------------------------------------------------

# Flagger fields that Perch knows and deliberately does not support, with the reason.
_NOT_A_WHOLE_OBJECT = (
    "the annotation holds only the spec of a Canary, not a whole object: "
    "put the fields of its spec at the top level"
)
_TOP_UNSUPPORTED: Final = {
    "metricsServer": "not supported: Perch queries the Prometheus configured for its analyzer",
    "ingressRef": "not supported: Perch routes with provider istio or gatewayapi only",
    "routeRef": "not supported: Perch routes with provider istio or gatewayapi only",
    "upstreamRef": "not supported: Perch routes with provider istio or gatewayapi only",
    "apiVersion": _NOT_A_WHOLE_OBJECT,
    "kind": _NOT_A_WHOLE_OBJECT,
    "metadata": _NOT_A_WHOLE_OBJECT,
    "spec": _NOT_A_WHOLE_OBJECT,
    "status": _NOT_A_WHOLE_OBJECT,
}
_SERVICE_UNSUPPORTED: Final = {
    **dict.fromkeys(
        ("headless", "backendTimeout", "trafficDistribution", "meshName", "backends",
         "delegation", "apex", "canary", "unmanagedMetadata"),
        "not supported by Perch",
    ),
    "mirror": "not supported by Perch (to mirror traffic to the canary use analysis.mirror)",
    "primary": "not supported: Perch never creates or edits a primary Service",
}  # fmt: skip
# Flagger analysis fields Perch knows and refuses (none at present; sessionAffinity is supported).
_ANALYSIS_UNSUPPORTED: Final[Mapping[str, str]] = {}


class _Fields:
    """One mapping of the document: refuses unknown keys up front, then hands out typed fields.

    A key whose value is null counts as absent, as for Kubernetes objects.
    """

    def __init__(
        self,
        value: object,
        path: str,
        *,
        known: Iterable[str],
        unsupported: Mapping[str, str] | None = None,
    ) -> None:
        if not isinstance(value, dict):
            raise _type_error(path, "a mapping of fields", value)
        known = tuple(known)
        for key in value:
            if key in known:
                continue
            if unsupported and key in unsupported:
                raise SpecError(_key(path, key), unsupported[key])
            reason = f"unknown field {json.dumps(_short(key))}"
            suggestion = _suggest(key, known)
            if suggestion is not None:
                reason += f"; did you mean {suggestion}?"
            else:
                reason += f"; the fields here are {', '.join(known)}"
            raise SpecError(_key(path, key), reason)
        self._data: dict[str, object] = value
        self.path = path

    def at(self, key: str) -> str:
        return _key(self.path, key)

    def raw(self, key: str) -> object:
        return self._data.get(key)

    def has(self, key: str) -> bool:
        return self._data.get(key) is not None

    def string(self, key: str, *, pattern: _Pattern | None = None) -> str | None:
        value = self._data.get(key)
        return None if value is None else _as_string(value, self.at(key), pattern=pattern)

    def required_string(self, key: str, *, pattern: _Pattern | None = None) -> str:
        value = self.string(key, pattern=pattern)
        if value is None:
            raise SpecError(self.at(key), "required")
        return value

    def integer(self, key: str, *, default: int, minimum: int, maximum: int | None = None) -> int:
        value = self.optional_integer(key, minimum=minimum, maximum=maximum)
        return default if value is None else value

    def optional_integer(self, key: str, *, minimum: int, maximum: int | None = None) -> int | None:
        value = self._data.get(key)
        if value is None:
            return None
        return _as_integer(value, self.at(key), minimum=minimum, maximum=maximum)

    def weight(self, key: str) -> int | None:
        value = self._data.get(key)
        return None if value is None else _as_weight(value, self.at(key))

    def number(self, key: str) -> float | None:
        value = self._data.get(key)
        return None if value is None else _as_number(value, self.at(key))

    def boolean(self, key: str) -> bool:
        value = self._data.get(key)
        if value is None:
            return False
        if not isinstance(value, bool):
            raise _type_error(self.at(key), "a boolean (true or false)", value)
        return value

    def duration(self, key: str, *, default: str) -> tuple[str, float]:
        found = self.optional_duration(key)
        return found if found is not None else (default, parse_duration(default))

    def optional_duration(self, key: str) -> tuple[str, float] | None:
        value = self._data.get(key)
        return None if value is None else _as_duration(value, self.at(key))

    def strings(self, key: str, *, pattern: _Pattern | None = None) -> tuple[str, ...]:
        return tuple(_as_string(item, path, pattern=pattern) for path, item in self.items(key))

    def string_map(self, key: str) -> FrozenDict[str]:
        value = self._data.get(key)
        if value is None:
            return _EMPTY
        if not isinstance(value, dict):
            raise _type_error(self.at(key), "a mapping of strings to strings", value)
        return FrozenDict(
            {name: _as_string(item, _key(self.at(key), name), allow_empty=True)
             for name, item in value.items()}
        )  # fmt: skip

    def free_map(self, key: str) -> FrozenDict[JsonValue] | None:
        value = self._data.get(key)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise _type_error(self.at(key), "a mapping", value)
        return cast(FrozenDict[JsonValue], _freeze(value))

    def free_maps(self, key: str) -> tuple[FrozenDict[JsonValue], ...]:
        maps: list[FrozenDict[JsonValue]] = []
        for path, item in self.items(key):
            if not isinstance(item, dict):
                raise _type_error(path, "a mapping", item)
            maps.append(cast(FrozenDict[JsonValue], _freeze(item)))
        return tuple(maps)

    def items(self, key: str) -> list[tuple[str, object]]:
        """The items of a list field with their paths; [] when absent."""
        value = self._data.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise _type_error(self.at(key), "a list", value)
        return [(_item(self.at(key), i), item) for i, item in enumerate(value)]

    def child(
        self, key: str, *, known: Iterable[str], unsupported: Mapping[str, str] | None = None
    ) -> _Fields | None:
        value = self._data.get(key)
        if value is None:
            return None
        return _Fields(value, self.at(key), known=known, unsupported=unsupported)


@dataclass(frozen=True, slots=True)
class _Pattern:
    regex: re.Pattern[str]
    description: str


# Kubernetes name rules, checked here so that a bad name is refused at admission with its field
# rather than by the API server when the analyzer creates an object.
_DNS_LABEL = _Pattern(
    re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"),
    "a DNS label: at most 63 lowercase letters, digits and '-', starting and ending "
    "with a letter or digit",
)
_DNS_1035_LABEL = _Pattern(
    re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?"),
    "a DNS-1035 label: at most 63 lowercase letters, digits and '-', starting with a letter "
    "and ending with a letter or digit",
)
_DNS_SUBDOMAIN = _Pattern(
    re.compile(r"(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"),
    "a DNS subdomain: lowercase letters, digits, '-' and '.', at most 253 characters",
)
_PORT_NAME = _Pattern(
    re.compile(r"(?=.{1,15}$)(?=[^a-z]*[a-z])[a-z0-9]([a-z0-9]|-(?=[a-z0-9]))*"),
    "a port name: at most 15 lowercase letters, digits and single '-', with at least one letter",
)


def _as_string(
    value: object, path: str, *, pattern: _Pattern | None = None, allow_empty: bool = False
) -> str:
    if not isinstance(value, str):
        raise _type_error(path, "a string", value)
    if not value and not allow_empty:
        raise SpecError(path, "must not be empty")
    if pattern is not None and not pattern.regex.fullmatch(value):
        raise SpecError(path, f"{json.dumps(_short(value))} is not {pattern.description}")
    return value


def _as_integer(value: object, path: str, *, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float):
            raise SpecError(path, f"expected a whole number, got {value}")
        raise _type_error(path, "an integer", value)
    if value < minimum or (maximum is not None and value > maximum):
        if maximum is None:
            raise SpecError(path, f"must be {minimum} or more, got {value}")
        raise SpecError(path, f"must be from {minimum} to {maximum}, got {value}")
    return value


def _as_weight(value: object, path: str) -> int:
    weight = _as_integer(value, path, minimum=-(2**63))
    if not 0 < weight <= 100:
        raise SpecError(path, f"a weight is a percentage from 1 to 100, got {weight}")
    return weight


def _as_number(value: object, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _type_error(path, "a number", value)
    return float(value)


def _as_duration(value: object, path: str) -> tuple[str, float]:
    """A positive duration as (PromQL-valid text, seconds); a bare number of seconds gets an s."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _type_error(path, "a duration such as 30s, 1m30s or 500ms", value)
    try:
        seconds = parse_duration(value)
    except DurationError as error:
        raise SpecError(path, str(error)) from None
    if seconds <= 0:
        raise SpecError(path, "must be more than 0")
    text = value.strip() if isinstance(value, str) else str(value)
    return (text if is_prometheus_duration(text) else f"{int(seconds)}s"), seconds


def _check_url(value: str, path: str) -> str:
    shown = json.dumps(_short(value))
    if any(char.isspace() or ord(char) < 32 for char in value):
        raise SpecError(path, f"malformed URL {shown}: it contains whitespace")
    try:
        parts = urlsplit(value)
        _ = parts.port  # raises ValueError for a port that is not a number in range
    except ValueError as error:
        raise SpecError(path, f"malformed URL {shown}: {error}") from None
    if parts.scheme not in ("http", "https"):
        raise SpecError(path, f"malformed URL {shown}: it must start with http:// or https://")
    if not parts.hostname:
        raise SpecError(path, f"malformed URL {shown}: it has no host")
    return value


# --------------------------------------------------------------------------------------------
# The sections
# --------------------------------------------------------------------------------------------


def _target_ref(fields: _Fields | None, warnings: list[str]) -> TargetRef | None:
    if fields is None:
        return None
    kind = fields.string("kind")
    if kind is not None and kind != "Deployment":
        raise SpecError(fields.at("kind"), f"Perch's target is a Deployment, got {kind}")
    api_version = fields.string("apiVersion") or "apps/v1"
    if api_version != "apps/v1":
        raise SpecError(fields.at("apiVersion"), f"expected apps/v1, got {api_version}")
    warnings.append(
        "perch.dev/spec: targetRef is not needed: the annotated Deployment is the target"
    )
    return TargetRef(name=fields.required_string("name", pattern=_DNS_SUBDOMAIN))


def _autoscaler_ref(fields: _Fields | None) -> AutoscalerRef | None:
    if fields is None:
        return None
    api_version = fields.required_string("apiVersion")
    kind = fields.required_string("kind")
    groups = {"HorizontalPodAutoscaler": "autoscaling", "ScaledObject": "keda.sh"}
    if kind not in groups:
        raise SpecError(fields.at("kind"), _one_of(kind, groups, "autoscaler kind"))
    if api_version.partition("/")[0] != groups[kind] or "/" not in api_version:
        raise SpecError(
            fields.at("apiVersion"),
            f"a {kind} has apiVersion {groups[kind]}/<version> "
            f"(e.g. {'autoscaling/v2' if kind == 'HorizontalPodAutoscaler' else 'keda.sh/v1alpha1'}"
            f"), got {api_version}",
        )
    replicas_fields = fields.child("primaryScalerReplicas", known=("minReplicas", "maxReplicas"))
    replicas = None
    if replicas_fields is not None:
        replicas = ScalerReplicas(
            min_replicas=replicas_fields.optional_integer("minReplicas", minimum=1),
            max_replicas=replicas_fields.optional_integer("maxReplicas", minimum=1),
        )
        low, high = replicas.min_replicas, replicas.max_replicas
        if low is not None and high is not None and low > high:
            raise SpecError(
                replicas_fields.at("minReplicas"),
                f"minReplicas {low} is more than maxReplicas {high}",
            )
    return AutoscalerRef(
        api_version=api_version,
        kind=cast(AutoscalerKind, kind),
        name=fields.required_string("name", pattern=_DNS_SUBDOMAIN),
        primary_scaler_queries=fields.string_map("primaryScalerQueries"),
        primary_scaler_replicas=replicas,
    )


def _gateway_ref(value: object, path: str) -> GatewayRef:
    fields = _Fields(
        value, path, known=("name", "namespace", "sectionName", "port", "group", "kind")
    )
    return GatewayRef(
        name=fields.required_string("name", pattern=_DNS_SUBDOMAIN),
        namespace=fields.string("namespace", pattern=_DNS_LABEL),
        section_name=fields.string("sectionName", pattern=_DNS_SUBDOMAIN),
        port=fields.optional_integer("port", minimum=1, maximum=65535),
        group=fields.string("group") or DEFAULT_GATEWAY_GROUP,
        kind=fields.string("kind") or DEFAULT_GATEWAY_KIND,
    )


def _header_operations(fields: _Fields | None) -> HeaderOperations | None:
    if fields is None:
        return None
    return HeaderOperations(
        set=fields.string_map("set"), add=fields.string_map("add"), remove=fields.strings("remove")
    )


def _service(fields: _Fields | None, *, provider: Provider, warnings: list[str]) -> Service:
    if fields is None or not fields.has("port"):
        path = fields.at("port") if fields is not None else "service.port"
        raise SpecError(path, "required: the port number the service exposes (e.g. 9898)")
    port = fields.integer("port", default=0, minimum=1, maximum=65535)

    target_port: int | str = port
    raw_target = fields.raw("targetPort")
    if isinstance(raw_target, str):
        target_port = _as_string(raw_target, fields.at("targetPort"), pattern=_PORT_NAME)
    elif raw_target is not None:
        target_port = _as_integer(raw_target, fields.at("targetPort"), minimum=1, maximum=65535)

    timeout = fields.optional_duration("timeout")

    retries = None
    retries_fields = fields.child("retries", known=("attempts", "perTryTimeout", "retryOn"))
    if retries_fields is not None:
        per_try = retries_fields.optional_duration("perTryTimeout")
        retries = Retries(
            attempts=retries_fields.optional_integer("attempts", minimum=0),
            per_try_timeout=per_try[0] if per_try else None,
            per_try_timeout_seconds=per_try[1] if per_try else None,
            retry_on=retries_fields.string("retryOn"),
        )

    headers = None
    headers_fields = fields.child("headers", known=("request", "response"))
    if headers_fields is not None:
        operations = ("set", "add", "remove")
        headers = Headers(
            request=_header_operations(headers_fields.child("request", known=operations)),
            response=_header_operations(headers_fields.child("response", known=operations)),
        )

    rewrite = None
    rewrite_fields = fields.child("rewrite", known=("uri", "authority", "type"))
    if rewrite_fields is not None:
        rewrite = Rewrite(
            uri=rewrite_fields.string("uri"),
            authority=rewrite_fields.string("authority"),
            type=rewrite_fields.string("type"),
        )

    gateway_refs = tuple(_gateway_ref(item, path) for path, item in fields.items("gatewayRefs"))
    gateways = fields.strings("gateways")
    if provider == "gatewayapi" and gateways:
        warnings.append(
            "perch.dev/spec: service.gateways is for Istio and has no effect with provider "
            "gatewayapi (use service.gatewayRefs)"
        )
    if provider == "istio" and gateway_refs:
        warnings.append(
            "perch.dev/spec: service.gatewayRefs is for the Gateway API and has no effect with "
            "provider istio (use service.gateways)"
        )

    return Service(
        port=port,
        target_port=target_port,
        name=fields.string("name", pattern=_DNS_1035_LABEL),
        port_name=fields.string("portName", pattern=_DNS_LABEL) or DEFAULT_PORT_NAME,
        port_discovery=fields.boolean("portDiscovery"),
        app_protocol=fields.string("appProtocol"),
        gateways=gateways,
        gateway_refs=gateway_refs,
        hosts=fields.strings("hosts"),
        traffic_policy=fields.free_map("trafficPolicy"),
        timeout=timeout[0] if timeout else None,
        timeout_seconds=timeout[1] if timeout else None,
        retries=retries,
        headers=headers,
        match=fields.free_maps("match"),
        rewrite=rewrite,
        cors_policy=fields.free_map("corsPolicy"),
    )


def _cross_namespace_ref(fields: _Fields | None) -> CrossNamespaceRef | None:
    if fields is None:
        return None
    return CrossNamespaceRef(
        name=fields.required_string("name", pattern=_DNS_SUBDOMAIN),
        namespace=fields.string("namespace", pattern=_DNS_LABEL),
    )


_NEEDS_THRESHOLD = (
    "a metric needs thresholdRange (min or max), primary (maxDelta or maxRatio) to judge it "
    "against the primary, or both"
)


def _primary_comparison(fields: _Fields | None) -> PrimaryComparison | None:
    if fields is None:
        return None
    limits: dict[str, float | None] = {}
    for key in ("maxDelta", "maxRatio"):
        limit = fields.number(key)
        if limit is not None and not math.isfinite(limit):
            raise SpecError(fields.at(key), f"expected a finite number, got {limit}")
        if limit is not None and limit < 0:
            raise SpecError(fields.at(key), f"must be 0 or more, got {limit:g}")
        limits[key] = limit
    if limits["maxDelta"] is None and limits["maxRatio"] is None:
        raise SpecError(
            fields.path,
            "give maxDelta (how much worse than the primary, in the metric's unit), maxRatio "
            "(how many times the primary's value), or both",
        )
    return PrimaryComparison(max_delta=limits["maxDelta"], max_ratio=limits["maxRatio"])


def _metric(value: object, path: str, warnings: list[str]) -> Metric:
    fields = _Fields(
        value,
        path,
        known=(
            "name", "interval", "thresholdRange", "threshold", "query", "templateRef",
            "templateVariables", "primary", "onNoData",
        ),
    )  # fmt: skip
    name = fields.required_string("name")
    query = fields.string("query")
    template_ref = _cross_namespace_ref(fields.child("templateRef", known=("name", "namespace")))
    if query is not None and template_ref is not None:
        raise SpecError(fields.at("query"), "give either query or templateRef, not both")

    builtin: BuiltinMetric | None = None
    histogram_unit: HistogramUnit | None = None
    if query is None and template_ref is None:
        if name not in _METRIC_NAMES:
            reason = _one_of(name, BUILTIN_METRICS, "builtin metric")
            raise SpecError(
                fields.at("name"), reason + "; for a custom metric give query or templateRef"
            )
        builtin, histogram_unit = _METRIC_NAMES[name]
        name = builtin

    threshold = fields.number("threshold")
    range_fields = fields.child("thresholdRange", known=("min", "max"))
    if threshold is not None and range_fields is not None:
        raise SpecError(
            fields.at("threshold"),
            "give either threshold (Flagger's early form) or thresholdRange, not both",
        )
    if threshold is not None:
        # Flagger's early single threshold: a minimum success rate, otherwise a maximum.
        if builtin == "request-success-rate":
            threshold_range = ThresholdRange(min=threshold)
        else:
            threshold_range = ThresholdRange(max=threshold)
        if builtin is None:
            warnings.append(
                f"perch.dev/spec: {fields.at('threshold')} is read as thresholdRange.max"
            )
    elif range_fields is not None:
        threshold_range = ThresholdRange(
            min=range_fields.number("min"), max=range_fields.number("max")
        )
    else:
        threshold_range = ThresholdRange()
    primary = _primary_comparison(fields.child("primary", known=("maxDelta", "maxRatio")))
    low, high = threshold_range.min, threshold_range.max
    range_path = fields.at("thresholdRange") if threshold is None else fields.at("threshold")
    if low is None and high is None:
        if range_fields is not None and primary is not None:
            # Written but empty: a mistake, not a request for the comparison alone.
            raise SpecError(
                range_path,
                "thresholdRange needs min or max; leave it out to judge the metric against the "
                "primary alone",
            )
        if primary is None:
            raise SpecError(range_path, _NEEDS_THRESHOLD)
    if low is not None and high is not None and low > high:
        raise SpecError(range_path, f"min {low:g} is more than max {high:g}")
    if builtin == "request-success-rate" and any(
        bound is not None and not 0 <= bound <= 100 for bound in (low, high)
    ):
        raise SpecError(range_path, "a success rate is a percentage from 0 to 100")
    if builtin == "request-duration" and any(
        bound is not None and bound < 0 for bound in (low, high)
    ):
        raise SpecError(range_path, "a duration in milliseconds cannot be negative")

    interval, interval_seconds = fields.duration("interval", default=DEFAULT_METRIC_INTERVAL)
    variables = fields.string_map("templateVariables")
    if variables and builtin is not None:
        raise SpecError(
            fields.at("templateVariables"),
            f"templateVariables only apply to a metric with templateRef or query, not to the "
            f"builtin {builtin}",
        )
    for key in variables:
        if not _TEMPLATE_VARIABLE.fullmatch(key):
            raise SpecError(
                _key(fields.at("templateVariables"), key),
                f"{json.dumps(_short(key))} cannot be named in a query as "
                "{{ variables.<key> }}: use letters, digits, '_', '-' and '.'",
            )
    return Metric(
        name=name,
        threshold_range=threshold_range,
        interval=interval,
        interval_seconds=interval_seconds,
        builtin=builtin,
        histogram_unit=histogram_unit,
        query=query,
        template_ref=template_ref,
        template_variables=variables,
        primary=primary,
        on_no_data=_no_data_policy(fields),
    )


def _no_data_policy(fields: _Fields) -> NoDataPolicy:
    value = fields.raw("onNoData")
    if value is None:
        return DEFAULT_ON_NO_DATA
    if not isinstance(value, str):
        raise _type_error(fields.at("onNoData"), "a string", value)
    if value not in _NO_DATA_POLICIES:
        raise SpecError(fields.at("onNoData"), _one_of(value, _NO_DATA_POLICIES, "onNoData policy"))
    return value


def _webhook(value: object, path: str) -> Webhook:
    fields = _Fields(
        value,
        path,
        known=(
            "name", "type", "url", "timeout", "metadata", "muteAlert", "retries", "disableTLS",
            "maxWait", "onTimeout",
        ),
    )  # fmt: skip
    name = fields.required_string("name")
    hook_type = fields.raw("type")
    if hook_type is None or hook_type == "":
        hook_type = DEFAULT_WEBHOOK_TYPE
    elif not isinstance(hook_type, str):
        raise _type_error(fields.at("type"), "a string", hook_type)
    elif hook_type not in _WEBHOOK_TYPES:
        raise SpecError(fields.at("type"), _one_of(hook_type, _WEBHOOK_TYPES, "webhook type"))
    url = _check_url(fields.required_string("url"), fields.at("url"))
    timeout, timeout_seconds = fields.duration("timeout", default=DEFAULT_WEBHOOK_TIMEOUT)
    max_wait, on_timeout = _confirm_wait(fields, hook_type)
    return Webhook(
        name=name,
        url=url,
        type=hook_type,
        timeout=timeout,
        timeout_seconds=timeout_seconds,
        metadata=fields.string_map("metadata"),
        mute_alert=fields.boolean("muteAlert"),
        retries=fields.integer("retries", default=0, minimum=0),
        disable_tls=fields.boolean("disableTLS"),
        max_wait=max_wait[0] if max_wait else None,
        max_wait_seconds=max_wait[1] if max_wait else None,
        on_timeout=on_timeout,
    )


def _confirm_wait(
    fields: _Fields, hook_type: WebhookType
) -> tuple[tuple[str, float] | None, OnTimeout]:
    """``maxWait`` and ``onTimeout``: confirm gates only, and onTimeout only with maxWait."""
    if hook_type not in CONFIRM_WEBHOOK_TYPES:
        for key in ("maxWait", "onTimeout"):
            if fields.has(key):
                raise SpecError(
                    fields.at(key),
                    f"{key} only applies to confirm gates ({', '.join(CONFIRM_WEBHOOK_TYPES)}), "
                    f"not to type {hook_type}",
                )
        return None, DEFAULT_ON_TIMEOUT
    max_wait = fields.optional_duration("maxWait")
    value = fields.raw("onTimeout")
    if value is None:
        return max_wait, DEFAULT_ON_TIMEOUT
    if not isinstance(value, str):
        raise _type_error(fields.at("onTimeout"), "a string", value)
    if value not in _ON_TIMEOUTS:
        raise SpecError(fields.at("onTimeout"), _one_of(value, _ON_TIMEOUTS, "onTimeout action"))
    if max_wait is None:
        raise SpecError(
            fields.at("onTimeout"),
            "onTimeout needs maxWait: without maxWait a confirm gate waits for approval for ever",
        )
    return max_wait, value


def _alert(value: object, path: str) -> Alert:
    fields = _Fields(value, path, known=("name", "severity", "providerRef"))
    name = fields.required_string("name")
    severity = fields.raw("severity")
    if severity is None or severity == "":
        severity = DEFAULT_SEVERITY
    elif not isinstance(severity, str):
        raise _type_error(fields.at("severity"), "a string", severity)
    elif severity not in _SEVERITIES:
        raise SpecError(fields.at("severity"), _one_of(severity, _SEVERITIES, "severity"))
    provider_ref = _cross_namespace_ref(fields.child("providerRef", known=("name", "namespace")))
    if provider_ref is None:
        raise SpecError(fields.at("providerRef"), "required: the AlertProvider to notify")
    return Alert(name=name, provider_ref=provider_ref, severity=severity)


# --------------------------------------------------------------------------------------------
# Traffic: A/B match conditions, mirroring, session affinity (what each router can express)
# --------------------------------------------------------------------------------------------

# Istio's HTTPMatchRequest, the shape of Flagger's match conditions.
_ISTIO_MATCH_FIELDS: Final = (
    "headers", "uri", "method", "queryParams", "sourceLabels", "authority", "scheme", "port",
    "gateways", "ignoreUriCase", "withoutHeaders", "sourceNamespace", "name", "statPrefix",
)  # fmt: skip
# What the Gateway API's HTTPRouteMatch can say of them (Perch translates these).
_GATEWAY_MATCH_FIELDS: Final = ("headers", "uri", "method", "queryParams")
_STRING_MATCH_KINDS: Final = ("exact", "prefix", "regex")
_HTTP_METHODS: Final = (
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
)  # fmt: skip
# The Gateway API's HTTPHeaderName (also its query parameter names): an RFC 7230 token.
_HTTP_TOKEN = _Pattern(
    re.compile(r"[A-Za-z0-9!#$%&'*+\-.^_`|~]{1,256}"),
    "an HTTP header name: letters, digits and !#$%&'*+-.^_`|~",
)
# Gateway API limit on the matches of one rule (analysis.match x service.match).
_GATEWAY_MAX_MATCHES: Final = 64
_COOKIE_NAME = _Pattern(
    re.compile(r"[A-Za-z0-9_.-]{1,128}"),
    "a cookie name: letters, digits, '_', '.' and '-'",
)
_COOKIE_ATTRIBUTE = _Pattern(
    re.compile(r"[\x21-\x3a\x3c-\x7e]{1,256}"),
    "a cookie attribute: printable characters without spaces or ';'",
)
_SAME_SITES: Final[tuple[SameSite, ...]] = get_args(SameSite)
_SESSION_AFFINITY_FIELDS: Final = (
    "cookieName", "maxAge", "primaryCookieName", "domain", "path", "sameSite", "httpOnly",
    "secure", "partitioned",
)  # fmt: skip


def _string_match(value: object, path: str, *, kinds: tuple[str, ...], where: str) -> None:
    """One of Flagger's (Istio's) StringMatch: exactly one of exact, prefix, regex."""
    if not isinstance(value, Mapping):
        raise _type_error(path, f"a mapping with one of {', '.join(kinds)}", value)
    if len(value) != 1:
        raise SpecError(path, f"give exactly one of {', '.join(kinds)}")
    ((kind, text),) = value.items()
    if kind not in _STRING_MATCH_KINDS:
        raise SpecError(_key(path, kind), _one_of(kind, kinds, "match kind"))
    if kind not in kinds:
        hint = "; write it as a regex, e.g. '^value.*'" if kind == "prefix" else ""
        raise SpecError(
            _key(path, kind), f"{where} has no {kind} match (only {', '.join(kinds)}){hint}"
        )
    _as_string(text, _key(path, kind))


def _name_matches(
    value: object, path: str, *, kinds: tuple[str, ...], where: str, provider: Provider
) -> None:
    """headers, queryParams, withoutHeaders: a mapping of names to string matches."""
    if not isinstance(value, Mapping) or not value:
        raise _type_error(path, "a mapping of names to matches", value)
    for name, match in value.items():
        at = _key(path, name)
        if provider == "gatewayapi":
            _as_string(name, at, pattern=_HTTP_TOKEN)
        elif path.endswith(("headers", "withoutHeaders")) and name != name.lower():
            # Istio refuses (or never matches) upper-case header names.
            raise SpecError(at, f"Istio matches header names in lower case: write {name.lower()}")
        _string_match(match, at, kinds=kinds, where=where)


def _check_match(
    items: tuple[FrozenDict[JsonValue], ...], path: str, *, provider: Provider
) -> None:
    """Refuses a match condition the provider's route cannot express, naming the field."""
    gateway = provider == "gatewayapi"
    router = "the Gateway API's" if gateway else "Istio's"
    known = _GATEWAY_MATCH_FIELDS if gateway else _ISTIO_MATCH_FIELDS
    for index, item in enumerate(items):
        here = _item(path, index)
        if not item:
            raise SpecError(
                here, "an empty match condition matches every request; give headers, uri, "
                "method or queryParams",
            )  # fmt: skip
        for key, value in item.items():
            at = _key(here, key)
            if key not in known:
                if gateway and key in _ISTIO_MATCH_FIELDS:
                    raise SpecError(
                        at,
                        f"the Gateway API cannot match on {key} (Istio can); with provider "
                        f"gatewayapi a match has {', '.join(_GATEWAY_MATCH_FIELDS)}",
                    )
                reason = f"unknown field {json.dumps(_short(key))}"
                suggestion = _suggest(key, known)
                reason += (
                    f"; did you mean {suggestion}?"
                    if suggestion
                    else f"; the fields here are {', '.join(known)}"
                )
                raise SpecError(at, reason)
            if key in ("headers", "withoutHeaders"):
                kinds = ("exact", "regex") if gateway else _STRING_MATCH_KINDS
                _name_matches(
                    value, at, kinds=kinds, where=f"{router} header match", provider=provider
                )
            elif key == "queryParams":
                # Istio has no prefix match for query parameters either.
                _name_matches(
                    value,
                    at,
                    kinds=("exact", "regex"),
                    where=f"{router} query parameter match",
                    provider=provider,
                )
            elif key == "method" and gateway:
                _string_match(value, at, kinds=("exact",), where="the Gateway API's method match")
                method = cast(Mapping[str, str], value)["exact"]
                if method not in _HTTP_METHODS:
                    raise SpecError(_key(at, "exact"), _one_of(method, _HTTP_METHODS, "method"))
            elif key in ("uri", "scheme", "method", "authority"):
                _string_match(value, at, kinds=_STRING_MATCH_KINDS, where=f"{router} {key} match")
                kind, uri = next(iter(cast(Mapping[str, str], value).items()))
                if gateway and kind != "regex" and not uri.startswith("/"):
                    raise SpecError(
                        _key(at, kind), f"a Gateway API path starts with '/', got {uri!r}"
                    )
            elif key == "sourceLabels":
                if not isinstance(value, Mapping) or not value:
                    raise _type_error(at, "a mapping of label names to values", value)
                for label, label_value in value.items():
                    _as_string(label_value, _key(at, label), allow_empty=True)
            elif key == "gateways":
                if not isinstance(value, tuple):
                    raise _type_error(at, "a list", value)
                for i, gateway_name in enumerate(value):
                    _as_string(gateway_name, _item(at, i))
            elif key == "port":
                _as_integer(value, at, minimum=1, maximum=65535)
            elif key == "ignoreUriCase":
                if not isinstance(value, bool):
                    raise _type_error(at, "a boolean (true or false)", value)
            else:
                _as_string(value, at)


def _session_affinity(fields: _Fields | None) -> SessionAffinity | None:
    if fields is None:
        return None
    if not fields.has("cookieName"):
        raise SpecError(
            fields.at("cookieName"), "required: the cookie that keeps a user on the canary"
        )
    cookie = fields.required_string("cookieName", pattern=_COOKIE_NAME)
    primary = fields.string("primaryCookieName", pattern=_COOKIE_NAME)
    if primary == cookie:
        raise SpecError(
            fields.at("primaryCookieName"),
            f"must differ from cookieName {cookie}: one cookie keeps users on the canary, "
            "the other on the primary",
        )
    same_site = fields.string("sameSite")
    if same_site is not None and same_site not in _SAME_SITES:
        raise SpecError(fields.at("sameSite"), _one_of(same_site, _SAME_SITES, "sameSite"))
    return SessionAffinity(
        cookie_name=cookie,
        max_age=fields.integer("maxAge", default=DEFAULT_COOKIE_MAX_AGE, minimum=1),
        primary_cookie_name=primary,
        domain=fields.string("domain", pattern=_COOKIE_ATTRIBUTE),
        path=fields.string("path", pattern=_COOKIE_ATTRIBUTE),
        same_site=same_site,
        http_only=fields.boolean("httpOnly"),
        secure=fields.boolean("secure"),
        partitioned=fields.boolean("partitioned"),
    )


def _traffic(
    fields: _Fields | None,
    analysis: Analysis,
    *,
    provider: Provider,
    gateway_api_version: GatewayApiVersion | None,
    service: Service,
    warnings: list[str],
) -> Analysis:
    """What the analysis asks of the router: refused here, naming the field, when the strategy
    has no use for it or the provider's route cannot express it (rather than by the API server
    when the analyzer writes the route, or silently)."""
    if fields is None:
        return analysis
    strategy = analysis.strategy
    if analysis.match:
        _check_match(analysis.match, fields.at("match"), provider=provider)
        if strategy != "ab-testing":
            warnings.append(
                f"perch.dev/spec: {fields.at('match')} has no effect without iterations: A/B "
                "testing is iterations with match, and no stepWeight or stepWeights"
            )
        elif provider == "gatewayapi":
            count = len(analysis.match) * max(1, len(service.match))
            if count > _GATEWAY_MAX_MATCHES:
                raise SpecError(
                    fields.at("match"),
                    f"{len(analysis.match)} conditions for each of the {len(service.match)} of "
                    f"service.match make {count} matches; an HTTPRoute rule takes at most "
                    f"{_GATEWAY_MAX_MATCHES}",
                )
    if analysis.mirror:
        if strategy != "blue-green":
            why = (
                "with match it is A/B testing, where the matching requests themselves go to "
                "the canary"
                if strategy == "ab-testing"
                else "with weights the canary gets live traffic from its first step"
            )
            raise SpecError(
                fields.at("mirror"),
                "mirroring runs during blue/green iterations (iterations without match, "
                f"stepWeight or stepWeights); {why}",
            )
        if gateway_api_version == "v1beta1" and analysis.mirror_weight is not None:
            raise SpecError(
                fields.at("mirrorWeight"),
                "the RequestMirror filter of the Gateway API's v1beta1 releases has no percent "
                "(it mirrors every request); use provider gatewayapi:v1 (Gateway API v1.3 or "
                "later) or leave mirrorWeight out",
            )
    elif analysis.mirror_weight is not None:
        warnings.append(
            f"perch.dev/spec: {fields.at('mirrorWeight')} has no effect without mirror: true"
        )
    affinity = _session_affinity(fields.child("sessionAffinity", known=_SESSION_AFFINITY_FIELDS))
    if affinity is not None and strategy != "canary":
        raise SpecError(
            fields.at("sessionAffinity"),
            "session affinity keeps users on the side the weighted split sent them to, so it "
            "goes with stepWeight or stepWeights; with iterations the canary gets all the "
            "traffic at once (blue/green) or exactly the requests analysis.match selects (A/B "
            "testing)",
        )
    return replace(analysis, session_affinity=affinity)


_ANALYSIS_FIELDS: Final = (
    "interval", "threshold", "maxWeight", "stepWeight", "stepWeights", "stepWeightPromotion",
    "iterations", "mirror", "mirrorWeight", "primaryReadyThreshold", "canaryReadyThreshold",
    "match", "metrics", "webhooks", "alerts", "sessionAffinity",
)  # fmt: skip


def _analysis(fields: _Fields | None, warnings: list[str]) -> Analysis:
    if fields is None:
        return Analysis()
    interval, interval_seconds = fields.duration("interval", default=DEFAULT_INTERVAL)
    if interval_seconds < 1:
        raise SpecError(fields.at("interval"), f"must be at least 1s, got {interval}")

    max_weight = fields.weight("maxWeight")
    step_weight = fields.weight("stepWeight")
    step_weights: list[int] = []
    for path, item in fields.items("stepWeights"):
        weight = _as_weight(item, path)
        if step_weights and weight <= step_weights[-1]:
            raise SpecError(
                path,
                f"stepWeights must increase strictly, but {weight} follows {step_weights[-1]}",
            )
        if max_weight is not None and weight > max_weight:
            raise SpecError(path, f"step weight {weight} is more than maxWeight {max_weight}")
        step_weights.append(weight)
    if step_weights:
        if step_weight is not None:
            warnings.append(
                f"perch.dev/spec: {fields.at('stepWeight')} has no effect: "
                "stepWeights sets the steps"
            )
        if max_weight is None:
            max_weight = step_weights[-1]  # as Flagger: the last step is the maximum
    elif step_weight is not None:
        if step_weight > (max_weight or DEFAULT_MAX_WEIGHT):
            suffix = "" if max_weight is not None else " (the default)"
            raise SpecError(
                fields.at("stepWeight"),
                f"stepWeight {step_weight} is more than maxWeight "
                f"{max_weight or DEFAULT_MAX_WEIGHT}{suffix}",
            )
    elif max_weight is not None and max_weight < DEFAULT_STEP_WEIGHT:
        raise SpecError(
            fields.at("maxWeight"),
            f"maxWeight {max_weight} is less than stepWeight {DEFAULT_STEP_WEIGHT} "
            "(the default); set stepWeight too",
        )

    iterations = fields.optional_integer("iterations", minimum=1)
    match = fields.free_maps("match")
    strategy: Strategy = "canary"
    if step_weights or step_weight is not None:
        if iterations is not None:
            warnings.append(
                f"perch.dev/spec: {fields.at('iterations')} has no effect with stepWeight or "
                "stepWeights"
            )
    elif iterations is not None:
        strategy = "ab-testing" if match else "blue-green"

    metrics: list[Metric] = []
    names: dict[str, str] = {}
    for path, item in fields.items("metrics"):
        metric = _metric(item, path, warnings)
        if metric.name in names:
            raise SpecError(
                _key(path, "name"),
                f"duplicate metric {metric.name} (also {names[metric.name]})",
            )
        names[metric.name] = path
        metrics.append(metric)

    mirror_weight = fields.weight("mirrorWeight")
    return Analysis(
        interval=interval,
        interval_seconds=interval_seconds,
        threshold=fields.integer("threshold", default=DEFAULT_THRESHOLD, minimum=1),
        max_weight=max_weight or DEFAULT_MAX_WEIGHT,
        step_weight=step_weight or DEFAULT_STEP_WEIGHT,
        step_weights=tuple(step_weights),
        step_weight_promotion=fields.weight("stepWeightPromotion"),
        iterations=iterations,
        strategy=strategy,
        mirror=fields.boolean("mirror"),
        mirror_weight=mirror_weight,
        primary_ready_threshold=fields.integer(
            "primaryReadyThreshold", default=DEFAULT_PRIMARY_READY_THRESHOLD, minimum=0,
            maximum=100,
        ),
        canary_ready_threshold=fields.integer(
            "canaryReadyThreshold", default=DEFAULT_CANARY_READY_THRESHOLD, minimum=0,
            maximum=100,
        ),
        match=match,
        metrics=tuple(metrics),
        webhooks=tuple(_webhook(item, path) for path, item in fields.items("webhooks")),
        alerts=tuple(_alert(item, path) for path, item in fields.items("alerts")),
    )  # fmt: skip


def _provider(fields: _Fields) -> tuple[Provider, GatewayApiVersion | None]:
    value = fields.string("provider")
    if value is None:
        return DEFAULT_PROVIDER, None
    if value in _PROVIDERS:
        return _PROVIDERS[value]
    if value in _FLAGGER_ONLY_PROVIDERS:
        raise SpecError(
            fields.at("provider"),
            f"Flagger's provider {value} is not supported by Perch (one of: "
            f"{', '.join(_PROVIDERS)})",
        )
    raise SpecError(fields.at("provider"), _one_of(value, _PROVIDERS, "provider"))


_TOP_FIELDS: Final = (
    "provider", "progressDeadlineSeconds", "autoscalerRef", "service", "analysis",
    "canaryAnalysis", "skipAnalysis", "suspend", "revertOnDeletion", "targetRef",
)  # fmt: skip


def _check_size(text: str) -> None:
    # len() first: it is free and bounds the encoding work; utf-8 is at most 4 bytes a character.
    if len(text) > MAX_SPEC_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_SPEC_BYTES:
        raise SpecError(
            "",
            f"the annotation is larger than {MAX_SPEC_BYTES // 1024} KiB; "
            "a canary spec is a few hundred bytes",
        )


def parse_spec(text: str | None) -> CanarySpec:
    """Parse and validate the ``perch.dev/spec`` annotation.

    ``text`` is YAML or JSON. None, an empty string or a document without content is the empty
    spec, in which everything takes its default except ``service.port``, which has none: so it
    raises ``SpecError("service.port", ...)``. Raises :class:`SpecError` for anything that does
    not parse or validate; never raises anything else for any input string.
    """
    if text is None or not text.strip():
        raise SpecError(
            "service.port",
            f"required: the {ANNOTATION_SPEC} annotation is missing or empty, and Perch needs at "
            "least the port the service exposes, e.g. 'service: {port: 9898}'",
        )
    _check_size(text)
    document = _load(text)
    if document is None:
        raise SpecError(
            "service.port",
            f"required: the {ANNOTATION_SPEC} annotation has no content, and Perch needs at "
            "least the port the service exposes, e.g. 'service: {port: 9898}'",
        )
    if not isinstance(document, dict):
        raise SpecError("", f"the spec must be a mapping of fields, got {_describe(document)}")

    top = _Fields(document, "", known=_TOP_FIELDS, unsupported=_TOP_UNSUPPORTED)
    warnings: list[str] = []
    if top.has("analysis") and top.has("canaryAnalysis"):
        raise SpecError(
            "canaryAnalysis",
            "give either analysis or canaryAnalysis (Flagger's early name for it), not both",
        )
    form: SpecForm = "canaryAnalysis" if top.has("canaryAnalysis") else "analysis"
    if form == "canaryAnalysis":
        warnings.append(
            "perch.dev/spec: canaryAnalysis is Flagger's early name for analysis and is read as "
            "analysis"
        )

    provider, gateway_api_version = _provider(top)
    target_ref = _target_ref(top.child("targetRef", known=("apiVersion", "kind", "name")), warnings)
    autoscaler_ref = _autoscaler_ref(
        top.child(
            "autoscalerRef",
            known=("apiVersion", "kind", "name", "primaryScalerQueries", "primaryScalerReplicas"),
        )
    )
    service = _service(
        top.child(
            "service",
            known=(
                "name", "port", "portName", "targetPort", "portDiscovery", "appProtocol",
                "gateways", "gatewayRefs", "hosts", "trafficPolicy", "timeout", "retries",
                "headers", "match", "rewrite", "corsPolicy",
            ),
            unsupported=_SERVICE_UNSUPPORTED,
        ),
        provider=provider,
        warnings=warnings,
    )  # fmt: skip
    analysis_fields = top.child(form, known=_ANALYSIS_FIELDS, unsupported=_ANALYSIS_UNSUPPORTED)
    analysis = _traffic(
        analysis_fields,
        _analysis(analysis_fields, warnings),
        provider=provider,
        gateway_api_version=gateway_api_version,
        service=service,
        warnings=warnings,
    )
    skip_analysis = top.boolean("skipAnalysis")
    if not analysis.metrics and not skip_analysis:
        warnings.append(
            "perch.dev/spec: the analysis has no metrics: the canary is judged on readiness "
            "and webhooks alone"
        )
    return CanarySpec(
        service=service,
        provider=provider,
        gateway_api_version=gateway_api_version,
        progress_deadline_seconds=top.integer(
            "progressDeadlineSeconds", default=DEFAULT_PROGRESS_DEADLINE_SECONDS, minimum=1
        ),
        autoscaler_ref=autoscaler_ref,
        analysis=analysis,
        skip_analysis=skip_analysis,
        suspend=top.boolean("suspend"),
        revert_on_deletion=top.boolean("revertOnDeletion"),
        target_ref=target_ref,
        form=form,
        warnings=tuple(warnings),
    )
