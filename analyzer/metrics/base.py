"""The metric provider Protocol and the registry that picks a provider by name.

A provider answers "what is this metric for these targets over the metric's window ending at
time T", judged against the metric's thresholdRange. One call serves every target it is given
(a batch), so the analyzer asks once per metric and namespace per tick; ``calls`` counts the
queries actually sent, which the analyzer exports as Prometheus calls per tick.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from analyzer.metrics.queries import QuerySetName
from analyzer.model import MetricResult
from perch.spec import Metric

__all__ = [
    "DEFAULT_TIMEOUT_SECONDS",
    "MetricProvider",
    "ProviderFactory",
    "ProviderSettings",
    "create_provider",
    "provider_types",
    "register_provider",
]

# Flagger's Prometheus client gives a query 5 s; a tick waits at most this long per query.
DEFAULT_TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class ProviderSettings:
    """How to reach a metrics backend: the analyzer's own, or a MetricTemplate's.

    ``verify_tls`` False skips the certificate check (a template's insecureSkipVerify);
    ``ca_bundle`` is PEM text of the CAs to trust instead of the system's.
    """

    address: str
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS
    headers: Mapping[str, str] = field(default_factory=dict)
    verify_tls: bool = True
    ca_bundle: str | None = None


class MetricProvider(Protocol):
    """Evaluates metric checks against a metrics backend."""

    @property
    def calls(self) -> int:
        """Queries sent so far (successful or not); read it before and after a tick."""
        ...

    def evaluate(
        self,
        namespace: str,
        metric: Metric,
        targets: Sequence[str],
        *,
        at: datetime | None = None,
        query_set: QuerySetName = "istio",
        template: str | None = None,
    ) -> dict[str, MetricResult]:
        """Judge ``metric`` for every target (Deployment names) in ``namespace``.

        ``at`` evaluates at a past instant (replay; deterministic tests) instead of now.
        ``query_set`` picks the builtin queries (see ``queries.query_set_for``). ``template`` is
        the query text of the MetricTemplate a ``templateRef`` metric names, which the caller
        resolves. Never raises for backend trouble: that is an "error" result per target.
        """
        ...


ProviderFactory = Callable[[ProviderSettings], MetricProvider]

_REGISTRY: dict[str, ProviderFactory] = {}


def register_provider(provider_type: str, factory: ProviderFactory) -> None:
    """Make a provider available by its type name (Flagger's MetricTemplate provider.type)."""
    _REGISTRY[provider_type] = factory


def provider_types() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def create_provider(provider_type: str, settings: ProviderSettings) -> MetricProvider:
    """A new provider of the named type; ValueError naming the known types otherwise."""
    try:
        factory = _REGISTRY[provider_type]
    except KeyError:
        known = ", ".join(provider_types()) or "none"
        raise ValueError(f"unknown metric provider {provider_type!r}; known: {known}") from None
    return factory(settings)
