"""The ``perch.dev/spec`` annotation: text (YAML or JSON) in, a typed and immutable spec out.

The document has the shape of the ``spec`` of a Flagger ``Canary`` (flagger.app/v1beta1) minus
``targetRef``, so that a Flagger user can move a Canary's spec into one annotation. Two forms:

* the current (documented) one: ``analysis``, metrics with ``thresholdRange``, builtin metric
  names ``request-success-rate`` and ``request-duration``;
* Flagger's early one (the seed article), read with exactly its meaning and normalised to the
  current one (:mod:`perch.spec.early`); :attr:`CanarySpec.form` records which was written.

Beyond Flagger, a metric may be judged against the primary over the same window:
``primary: {maxDelta, maxRatio}`` (see :class:`PrimaryComparison`). A metric needs a
``thresholdRange`` (or the early ``threshold``), a ``primary`` comparison, or both; with both, both
must pass.

Missing values take Flagger's defaults (``DEFAULT_*``). ``service.port`` has no default, so
:func:`parse_spec` refuses a missing or empty annotation with a :class:`SpecError` naming
``service.port``: the webhook calls it only for opted-in Deployments, and an opted-in Deployment
without a spec cannot be routed.

Everything that does not parse or validate raises :class:`SpecError` naming the field path and the
reason, which the webhook turns into the admission denial. Reading goes in three steps, each in
its module:

1. :mod:`perch.spec.loading`: the text into plain data, defensively (size, aliases, nesting,
   duplicate keys, non-JSON values, syntax errors with line and column);
2. :mod:`perch.spec.models` and :mod:`perch.spec.analysis`: pydantic models of the document
   validate it (they are also the JSON Schema, docs/spec.schema.json), refusing in the words of
   :mod:`perch.spec.messages` with the values of :mod:`perch.spec.values`, and what the router
   can express is checked by :mod:`perch.spec.traffic`;
3. the models build the frozen result (:mod:`perch.spec.result`) with the warnings for kubectl.

Pure: no I/O; imports only the standard library, PyYAML, pydantic and perch's pure modules.
"""

from __future__ import annotations

from pydantic import ValidationError

from perch.names import ANNOTATION_SPEC
from perch.spec.early import EARLY_METRIC_NAMES
from perch.spec.loading import load_document
from perch.spec.messages import SpecError, describe, spec_error
from perch.spec.models import SpecDocument
from perch.spec.result import (
    Alert,
    Analysis,
    AutoscalerRef,
    CanarySpec,
    CrossNamespaceRef,
    FrozenDict,
    GatewayRef,
    HeaderOperations,
    Headers,
    JsonValue,
    Metric,
    PrimaryComparison,
    Retries,
    Rewrite,
    ScalerReplicas,
    Service,
    SessionAffinity,
    TargetRef,
    ThresholdRange,
    Webhook,
    to_plain,
)
from perch.spec.vocabulary import (
    BUILTIN_METRICS,
    CONFIRM_WEBHOOK_TYPES,
    DEFAULT_CANARY_READY_THRESHOLD,
    DEFAULT_COOKIE_MAX_AGE,
    DEFAULT_GATEWAY_GROUP,
    DEFAULT_GATEWAY_KIND,
    DEFAULT_HISTOGRAM_UNIT,
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
    MAX_DEPTH,
    MAX_SPEC_BYTES,
    BuiltinMetric,
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
    document = load_document(text)
    if document is None:
        raise SpecError(
            "service.port",
            f"required: the {ANNOTATION_SPEC} annotation has no content, and Perch needs at "
            "least the port the service exposes, e.g. 'service: {port: 9898}'",
        )
    if not isinstance(document, dict):
        raise SpecError("", f"the spec must be a mapping of fields, got {describe(document)}")
    try:
        model = SpecDocument.model_validate(document)
    except ValidationError as error:
        raise spec_error(error, SpecDocument) from None
    return model.result()
