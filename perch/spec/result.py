"""The typed result of reading ``perch.dev/spec``: frozen dataclasses and frozen free-form values.

This is what the webhook, the analyzer and the routers use; it is independent of how the text is
read (the pydantic models in :mod:`perch.spec.models` and :mod:`perch.spec.analysis` validate the
document and build these). Attribute names are Python's (``max_weight``), the document's are
Flagger's (``maxWeight``). Everything is immutable and hashable, so that a parsed spec can be
cached and compared: two texts that mean the same release give equal specs, whatever the form or
the syntax (YAML or JSON) they were written in.

Some fields are normalised or derived while reading, so they have no counterpart in the document:
``interval_seconds`` and the other ``*_seconds`` (the durations in seconds), ``Metric.builtin``
and ``Metric.histogram_unit`` (which builtin check and which Istio histogram, early names
normalised), ``Analysis.strategy``, ``CanarySpec.gateway_api_version`` and ``CanarySpec.form``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias, TypeVar, cast

from perch.spec.vocabulary import (
    DEFAULT_CANARY_READY_THRESHOLD,
    DEFAULT_COOKIE_MAX_AGE,
    DEFAULT_GATEWAY_GROUP,
    DEFAULT_GATEWAY_KIND,
    DEFAULT_INTERVAL,
    DEFAULT_MAX_WEIGHT,
    DEFAULT_METRIC_INTERVAL,
    DEFAULT_ON_NO_DATA,
    DEFAULT_ON_TIMEOUT,
    DEFAULT_PORT_NAME,
    DEFAULT_PRIMARY_READY_THRESHOLD,
    DEFAULT_PROGRESS_DEADLINE_SECONDS,
    DEFAULT_PROVIDER,
    DEFAULT_SEVERITY,
    DEFAULT_STEP_WEIGHT,
    DEFAULT_THRESHOLD,
    DEFAULT_WEBHOOK_TIMEOUT,
    DEFAULT_WEBHOOK_TYPE,
    AutoscalerKind,
    BuiltinMetric,
    GatewayApiVersion,
    HistogramUnit,
    NoDataPolicy,
    OnTimeout,
    Provider,
    SameSite,
    Severity,
    SpecForm,
    Strategy,
    WebhookType,
)

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

EMPTY: FrozenDict[Any] = FrozenDict()


def to_plain(value: JsonValue) -> Any:
    """A frozen JSON value as fresh plain dicts and lists (e.g. to embed in a Kubernetes object)."""
    if isinstance(value, FrozenDict):
        return {key: to_plain(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return [to_plain(item) for item in value]
    return value


def freeze(value: object) -> JsonValue:
    """A loaded JSON value (dicts, lists and scalars only: what the loaders hand out), frozen."""
    if isinstance(value, dict):
        return FrozenDict({key: freeze(item) for key, item in value.items()})
    if isinstance(value, list):
        return tuple(freeze(item) for item in value)
    return cast(JsonValue, value)


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
    primary_scaler_queries: FrozenDict[str] = EMPTY
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
    set: FrozenDict[str] = EMPTY
    add: FrozenDict[str] = EMPTY
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
    template_variables: FrozenDict[str] = EMPTY
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
    metadata: FrozenDict[str] = EMPTY
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
