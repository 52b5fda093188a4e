"""PromQL for the builtin checks, and rendering of query templates.

The builtins are Flagger's (``pkg/metrics/observers/istio.go``): ``request-success-rate`` is the
share of non-5xx responses in percent, ``request-duration`` the p99 latency in milliseconds. For a
single target the text is Flagger's query (whitespace collapsed, as Flagger's Prometheus client
also does before sending), with one departure: the success rate's numerator is guarded. Flagger
divides ``sum(rate(non-5xx))`` by ``sum(rate(all))``; a canary that answers nothing but 5xx has no
non-5xx series, so the numerator is empty, the division is empty, and Flagger reports "no values
found" for the worst canary there is. Here the numerator is ``(sum(rate(non-5xx)) or
sum(rate(all)) * 0)``: where the canary had requests but none succeeded, the ``or`` supplies a 0
with the same labels, so the rate reads 0 %. It keeps the labels of the denominator, so the same
form works for the batched query grouped by workload (``or on() vector(0)`` would not: its one
unlabelled 0 matches no workload). A window without any request still has no denominator and
stays "no data". Perch's target is the canary Deployment ``<name>-canary``, so ``{{ target }}``
renders to ``podinfo-canary`` where Flagger's renders to ``podinfo``.

Beyond Flagger, :func:`builtin_query` batches: for several targets in one namespace it renders one
query whose regex matches all of them and whose aggregation keeps the workload label
(``by (destination_workload)``), so one Prometheus call per metric, namespace and tick serves
every canary there, and the primary too when a check compares the canary with it.

Templates (inline ``query`` or a MetricTemplate's) are rendered by plain substitution of
``{{ name }}``-style placeholders, not by a template engine: the text comes from users, a query
needs nothing more, and an unknown or malformed placeholder is an error that names it rather than
an empty string in the middle of a PromQL selector.

Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias

from perch.spec import BuiltinMetric, HistogramUnit, Provider

__all__ = [
    "ENVOY",
    "ISTIO",
    "QUERY_SETS",
    "BuiltinQuery",
    "QuerySet",
    "QuerySetName",
    "TemplateError",
    "builtin_query",
    "query_set_for",
    "render_template",
]

QuerySetName: TypeAlias = Literal["istio", "envoy"]

# --------------------------------------------------------------------------------------------
# Templates
# --------------------------------------------------------------------------------------------

# ``{{ namespace }}``, ``{{target}}``, ``{{ variables.region }}``: an identifier, optionally one
# dotted key (template variables may contain dashes, as Kubernetes-style keys do).
_PLACEHOLDER = re.compile(
    r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_][A-Za-z0-9_.-]*)?)\s*\}\}"
)
_ANY_BRACES = re.compile(r"\{\{.*?\}\}|\{\{|\}\}", re.DOTALL)
# Flagger's model has these too; Perch has no ingressRef, and its canary has its own Service, so
# there is no single right value: say so rather than guess.
_NOT_IN_PERCH: Final[Mapping[str, str]] = {
    "service": "Perch has no {{ service }}: the canary's Service is named like its Deployment, "
    "use {{ target }}",
    "ingress": "Perch has no {{ ingress }}: it routes with Istio or the Gateway API",
}


class TemplateError(ValueError):
    """A query template that cannot be rendered; ``placeholders`` names the offending ones."""

    def __init__(self, message: str, placeholders: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.placeholders = tuple(placeholders)


def render_template(
    template: str,
    *,
    namespace: str,
    target: str,
    interval: str,
    name: str | None = None,
    variables: Mapping[str, str] | None = None,
) -> str:
    """Substitute Flagger's placeholders in a query template.

    ``{{ namespace }}``, ``{{ target }}`` (the canary Deployment, ``podinfo-canary``),
    ``{{ interval }}`` (the metric's interval, ``1m``), ``{{ name }}`` (the canary's name, which is
    the primary's: ``podinfo``) when given, and ``{{ variables.<key> }}`` from the metric's
    ``templateVariables``. Values are inserted as they are. Raises :class:`TemplateError` naming
    every unknown placeholder, and for any other ``{{ ... }}`` (Go template actions such as
    ``{{ if }}`` or ``{{ .Namespace }}``), which Perch does not evaluate.
    """
    values: dict[str, str] = {"namespace": namespace, "target": target, "interval": interval}
    if name is not None:
        values["name"] = name
    variables = variables or {}
    unknown: list[str] = []
    hints: list[str] = []

    def substitute(match: re.Match[str]) -> str:
        key = match.group(1)
        if key in values:
            return values[key]
        if key.startswith("variables."):
            variable = key.removeprefix("variables.")
            if variable in variables:
                return variables[variable]
        if key not in unknown:
            unknown.append(key)
            if key in _NOT_IN_PERCH:
                hints.append(_NOT_IN_PERCH[key])
        return match.group(0)

    # Go template actions first: their words ({{ end }}) would read as unknown placeholders.
    leftover = _ANY_BRACES.findall(_PLACEHOLDER.sub("", template))
    if leftover:
        raise TemplateError(
            f"unsupported template syntax {', '.join(leftover)}: only placeholders such as "
            "{{ namespace }}, {{ target }}, {{ interval }} and {{ variables.<key> }} are "
            "substituted",
            leftover,
        )
    rendered = _PLACEHOLDER.sub(substitute, template)
    if unknown:
        listed = ", ".join("{{ " + key + " }}" for key in unknown)
        known = sorted(values) + [f"variables.{key}" for key in sorted(variables)]
        message = f"unknown placeholder {listed} (known: {', '.join(known)})"
        if hints:
            message += "; " + "; ".join(hints)
        raise TemplateError(message, unknown)
    return rendered


# --------------------------------------------------------------------------------------------
# Builtin queries
# --------------------------------------------------------------------------------------------


def _guarded_ratio(successes: str, requests: str) -> str:
    """successes / requests * 100, with 0 successes (not none) where requests had only 5xx."""
    return f"({successes} or {requests} * 0) / {requests} * 100"


# Flagger's Istio queries (observers/istio.go), whitespace collapsed; the success rate guarded.
_ISTIO_SELECTOR = (
    'reporter="destination",destination_workload_namespace="{{ namespace }}",'
    'destination_workload=~"{{ target }}"'
)
ISTIO_SUCCESS_RATE: Final = _guarded_ratio(
    f'sum(rate(istio_requests_total{{{_ISTIO_SELECTOR},response_code!~"5.*"}}'
    "[{{ interval }}]))",
    f"sum(rate(istio_requests_total{{{_ISTIO_SELECTOR}}}[{{{{ interval }}}}]))",
)


def _istio_duration(histogram: str, by: str) -> str:
    return (
        f"histogram_quantile(0.99, sum(rate({histogram}{{{_ISTIO_SELECTOR}}}"
        f"[{{{{ interval }}}}])) by ({by}))"
    )


# Both sums keep the workload label, so the division (and the guard) match canary to canary.
_ISTIO_SUCCESS_RATE_BATCHED: Final = _guarded_ratio(
    f'sum(rate(istio_requests_total{{{_ISTIO_SELECTOR},response_code!~"5.*"}}'
    "[{{ interval }}])) by (destination_workload)",
    f"sum(rate(istio_requests_total{{{_ISTIO_SELECTOR}}}[{{{{ interval }}}}])) "
    "by (destination_workload)",
)

# Envoy (Contour's cluster naming <namespace>_<service>_<port>), as in Flagger's contour observer
# and its Gateway API tutorial. There the target is the primary's name and the query appends
# "-canary"; Perch's target already is the canary Service, so nothing is appended.
_ENVOY_CLUSTER = '"{{ namespace }}_{{ target }}_[0-9a-zA-Z-]+"'
ENVOY_SUCCESS_RATE: Final = _guarded_ratio(
    f"sum(rate(envoy_cluster_upstream_rq{{envoy_cluster_name=~{_ENVOY_CLUSTER},"
    'envoy_response_code!~"5.*"}[{{ interval }}]))',
    f"sum(rate(envoy_cluster_upstream_rq{{envoy_cluster_name=~{_ENVOY_CLUSTER}}}"
    "[{{ interval }}]))",
)
ENVOY_DURATION: Final = (
    "histogram_quantile(0.99, sum(rate(envoy_cluster_upstream_rq_time_bucket{"
    f"envoy_cluster_name=~{_ENVOY_CLUSTER}}}[{{{{ interval }}}}])) by (le))"
)
# Batched: a cluster per Service port, so the Service name is lifted into its own label first.
_ENVOY_TARGET_LABEL = "perch_target"
_ENVOY_MATCH = '"{{ namespace }}_(?:{{ target }})_[0-9a-zA-Z-]+"'
_ENVOY_LIFT = (
    f'"{_ENVOY_TARGET_LABEL}", "$1", "envoy_cluster_name", '
    '"{{ namespace }}_({{ target }})_[0-9a-zA-Z-]+"'
)
_ENVOY_SUCCESS_RATE_BATCHED: Final = _guarded_ratio(
    f"sum by ({_ENVOY_TARGET_LABEL}) (label_replace(rate(envoy_cluster_upstream_rq{{"
    f'envoy_cluster_name=~{_ENVOY_MATCH},envoy_response_code!~"5.*"}}[{{{{ interval }}}}]), '
    f"{_ENVOY_LIFT}))",
    f"sum by ({_ENVOY_TARGET_LABEL}) (label_replace(rate(envoy_cluster_upstream_rq{{"
    f"envoy_cluster_name=~{_ENVOY_MATCH}}}[{{{{ interval }}}}]), {_ENVOY_LIFT}))",
)
_ENVOY_DURATION_BATCHED: Final = (
    f"histogram_quantile(0.99, sum by (le, {_ENVOY_TARGET_LABEL}) (label_replace(rate("
    f"envoy_cluster_upstream_rq_time_bucket{{envoy_cluster_name=~{_ENVOY_MATCH}}}"
    f"[{{{{ interval }}}}]), {_ENVOY_LIFT})))"
)


@dataclass(frozen=True, slots=True)
class QuerySet:
    """The builtin queries for one kind of telemetry.

    ``durations`` maps a histogram unit to (single query, batched query, factor to milliseconds);
    ``target_label`` is the label the batched queries keep per target.
    """

    name: QuerySetName
    success_rate: str
    success_rate_batched: str
    durations: Mapping[HistogramUnit, tuple[str, str, float]]
    target_label: str
    default_unit: HistogramUnit = "milliseconds"


ISTIO: Final = QuerySet(
    name="istio",
    success_rate=ISTIO_SUCCESS_RATE,
    success_rate_batched=_ISTIO_SUCCESS_RATE_BATCHED,
    durations={
        "milliseconds": (
            _istio_duration("istio_request_duration_milliseconds_bucket", "le"),
            _istio_duration(
                "istio_request_duration_milliseconds_bucket", "le, destination_workload"
            ),
            1.0,
        ),
        # Istio before 1.5 (the seed's) exported seconds; Flagger then multiplied by 1000.
        "seconds": (
            _istio_duration("istio_request_duration_seconds_bucket", "le"),
            _istio_duration("istio_request_duration_seconds_bucket", "le, destination_workload"),
            1000.0,
        ),
    },
    target_label="destination_workload",
)

# Envoy's upstream_rq_time is in milliseconds whatever the metric's histogram_unit says.
ENVOY: Final = QuerySet(
    name="envoy",
    success_rate=ENVOY_SUCCESS_RATE,
    success_rate_batched=_ENVOY_SUCCESS_RATE_BATCHED,
    durations={
        "milliseconds": (ENVOY_DURATION, _ENVOY_DURATION_BATCHED, 1.0),
        "seconds": (ENVOY_DURATION, _ENVOY_DURATION_BATCHED, 1.0),
    },
    target_label=_ENVOY_TARGET_LABEL,
)

QUERY_SETS: Final[Mapping[str, QuerySet]] = {"istio": ISTIO, "envoy": ENVOY}

# Flagger has no Gateway API observer (its factory falls back to Istio's queries) and documents
# Envoy MetricTemplates for it instead; Perch makes those the builtins for provider gatewayapi.
# A Gateway API implemented by Istio should use the istio set (query_set="istio").
_FOR_PROVIDER: Final[Mapping[Provider, QuerySetName]] = {"istio": "istio", "gatewayapi": "envoy"}


def query_set_for(provider: Provider) -> QuerySetName:
    """The builtin query set for a canary's routing provider."""
    return _FOR_PROVIDER[provider]


@dataclass(frozen=True, slots=True)
class BuiltinQuery:
    """A rendered builtin query and how to read its result.

    ``target_label`` is None for a single-target query (its one unlabelled series is the target's)
    and otherwise the label whose value names the target of each series. ``scale`` turns the
    result into the metric's unit (seconds → milliseconds).
    """

    promql: str
    targets: tuple[str, ...]
    target_label: str | None
    scale: float = 1.0


# Namespaces are DNS labels; Deployments and Services DNS subdomains. Checked because they are
# inserted into PromQL strings and regexes: a quote or a backslash must never get there.
_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")


def _check_name(kind: str, value: str) -> None:
    if not _NAME.fullmatch(value):
        raise ValueError(f"{kind} {value!r} is not a Kubernetes object name")


def _regex_literal(name: str) -> str:
    # A dot is the only regex metacharacter a Kubernetes name can hold; the backslash is doubled
    # because the regex sits in a PromQL string literal.
    return name.replace(".", "\\\\.")


def builtin_query(
    builtin: BuiltinMetric,
    *,
    namespace: str,
    targets: Sequence[str],
    interval: str,
    histogram_unit: HistogramUnit | None = None,
    query_set: QuerySet = ISTIO,
) -> BuiltinQuery:
    """Render a builtin check for one or more targets in one namespace.

    One target gives Flagger's query; several give one batched query aggregated by target.
    ``histogram_unit`` picks the latency histogram (default milliseconds). Raises ValueError for
    an empty target list or names that are not Kubernetes names.
    """
    unique = tuple(dict.fromkeys(targets))
    if not unique:
        raise ValueError("builtin_query needs at least one target")
    _check_name("namespace", namespace)
    for target in unique:
        _check_name("target", target)
    batched = len(unique) > 1
    scale = 1.0
    if builtin == "request-success-rate":
        template = query_set.success_rate_batched if batched else query_set.success_rate
    else:
        single, many, scale = query_set.durations[histogram_unit or query_set.default_unit]
        template = many if batched else single
    promql = render_template(
        template,
        namespace=namespace,
        target="|".join(_regex_literal(target) for target in unique),
        interval=interval,
    )
    return BuiltinQuery(
        promql=promql,
        targets=unique,
        target_label=query_set.target_label if batched else None,
        scale=scale,
    )
