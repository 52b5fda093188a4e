"""Metric checks: builtin and custom PromQL, batched per namespace, judged in Flagger's words.

``queries`` and ``judge`` are pure; ``prometheus`` talks to Prometheus; ``base`` holds the
provider Protocol and the registry (importing this package registers "prometheus").
"""

from __future__ import annotations

from analyzer.metrics.base import (
    DEFAULT_TIMEOUT_SECONDS,
    MetricProvider,
    ProviderSettings,
    create_provider,
    provider_types,
    register_provider,
)
from analyzer.metrics.judge import judge, judge_relative, no_data, query_failed
from analyzer.metrics.prometheus import PrometheusProvider, QueryError
from analyzer.metrics.queries import (
    QUERY_SETS,
    BuiltinQuery,
    QuerySetName,
    TemplateError,
    builtin_query,
    query_set_for,
    render_template,
)

__all__ = [
    "DEFAULT_TIMEOUT_SECONDS",
    "QUERY_SETS",
    "BuiltinQuery",
    "MetricProvider",
    "PrometheusProvider",
    "ProviderSettings",
    "QueryError",
    "QuerySetName",
    "TemplateError",
    "builtin_query",
    "create_provider",
    "judge",
    "judge_relative",
    "no_data",
    "provider_types",
    "query_failed",
    "query_set_for",
    "register_provider",
    "render_template",
]
