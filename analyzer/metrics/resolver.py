"""From a metric's ``templateRef`` to the query and the provider that answers it.

Reads, and why they cost no API call per metric per tick:

- MetricTemplates come from a watch cache of their own (``WatchCache(kinds=("MetricTemplate",))``,
  list+watch in the namespaces the analyzer watches): an edited template is used at the next tick,
  a deleted one fails at the next tick, and reading one is a dictionary lookup.
- Secrets are never listed or watched: that would need the right to read every Secret in the
  cluster and would keep them all in memory. Each Secret a template names is read with one GET
  and kept ``secret_ttl`` seconds (30): a rotated credential is used within that time. A Secret
  that could not be read, or whose keys cannot be used, is asked again after ``retry_seconds``
  (5), so a fix (the Secret created or corrected, the RBAC granted) shows quickly without a GET
  per tick while it is broken.
- Providers are kept per (address, credentials, TLS settings), so the connection pool to a
  template's server is reused tick after tick; a changed credential gets a new provider, and the
  least recently used ones beyond ``max_providers`` are closed.

Every way a template can be unusable is a result, not an exception: outcome "error", with a
message that starts ``metric <name>:`` and says which object is wrong and how, e.g. "metric
error-rate: MetricTemplate error-rate.test not found", "… cannot read Secret prom-auth.test of
MetricTemplate error-rate.test: Kubernetes API answered 403 Forbidden: …", "… MetricTemplate
error-rate.test: unknown placeholder {{ variables.region }} …". Such a check fails; it is never
read as a pass.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

from kubernetes.client.exceptions import ApiException

from analyzer.metrics.base import ProviderSettings
from analyzer.metrics.prometheus import PrometheusProvider
from analyzer.metrics.queries import TemplateError, render_template
from analyzer.metrics.templates import (
    METRIC_TEMPLATE_KIND,
    Credentials,
    MetricTemplate,
    MetricTemplateError,
    credentials_from_secret,
    parse_metric_template,
    provider_settings,
)
from analyzer.model import MetricResult
from perch.kube import describe_api_error
from perch.resources import SECRETS, Resource
from perch.spec import Metric

__all__ = [
    "DEFAULT_RETRY_SECONDS",
    "DEFAULT_SECRET_TTL_SECONDS",
    "ResolvedTemplate",
    "SecretReader",
    "TemplateCache",
    "TemplateResolver",
]

log = logging.getLogger("perch.analyzer.templates")

DEFAULT_SECRET_TTL_SECONDS: Final = 30.0
DEFAULT_RETRY_SECONDS: Final = 5.0
DEFAULT_MAX_PROVIDERS: Final = 32
# Said with a 403: the chart grants Secrets by name (least privilege), so a new name needs a value.
_FORBIDDEN_HINT: Final = (
    "the analyzer may read only the Secrets the chart names in analyzer.secretNames"
)


class TemplateCache(Protocol):
    """The watch cache of MetricTemplates (analyzer.cache.WatchCache)."""

    def get(self, namespace: str, name: str, *, kind: Any = ...) -> dict[str, Any] | None: ...

    def covers(self, namespace: str) -> bool: ...


class SecretReader(Protocol):
    """GET of one object, None when it does not exist (perch.resources.Kube)."""

    def get(self, res: Resource, namespace: str, name: str) -> dict[str, Any] | None: ...


@dataclass(frozen=True, slots=True)
class ResolvedTemplate:
    template: MetricTemplate
    provider: PrometheusProvider


@dataclass(frozen=True, slots=True)
class _SecretRead:
    expires: float
    secret: Mapping[str, Any] | None = None
    problem: str = ""  # why it could not be read (not found, forbidden, unreachable)


class TemplateResolver:
    """Resolves templateRef metrics; shared by the analyzer's concurrent ticks (locked)."""

    def __init__(
        self,
        *,
        templates: TemplateCache,
        secrets: SecretReader,
        default: ProviderSettings,
        secret_ttl: float = DEFAULT_SECRET_TTL_SECONDS,
        retry_seconds: float = DEFAULT_RETRY_SECONDS,
        max_providers: int = DEFAULT_MAX_PROVIDERS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._templates = templates
        self._secrets = secrets
        self._default = default
        self._secret_ttl = secret_ttl
        self._retry = retry_seconds
        self._max_providers = max_providers
        self._clock = clock
        self._lock = threading.Lock()
        self._secret_reads: dict[tuple[str, str], _SecretRead] = {}
        self._providers: OrderedDict[tuple[Any, ...], PrometheusProvider] = OrderedDict()
        self._retired_calls = 0
        self.secret_gets = 0

    @property
    def calls(self) -> int:
        """Queries sent by the templates' providers (the analyzer exports it with its own)."""
        with self._lock:
            return self._retired_calls + sum(p.calls for p in self._providers.values())

    def close(self) -> None:
        with self._lock:
            providers = list(self._providers.values())
            self._providers.clear()
        for provider in providers:
            provider.close()

    def resolve(self, namespace: str, metric: Metric) -> ResolvedTemplate | MetricResult:
        """The template a metric names (in ``namespace`` unless its ref says another), checked,
        its query renderable with the metric's variables, and the provider for its server."""
        ref = metric.template_ref
        if ref is None:
            return self._failure(metric, "it has no templateRef")
        where = ref.namespace or namespace
        obj = self._templates.get(where, ref.name, kind=METRIC_TEMPLATE_KIND)
        if obj is None:
            message = f"MetricTemplate {ref.name}.{where} not found"
            if not self._templates.covers(where):
                message += (
                    f" (the analyzer watches MetricTemplates only in the namespaces it analyses, "
                    f"and {where} is not one of them)"
                )
            return self._failure(metric, message)
        try:
            template = parse_metric_template(obj)
        except MetricTemplateError as error:
            return self._failure(metric, f"MetricTemplate {ref.name}.{where} is invalid: {error}")
        try:
            # Every placeholder checked now, with the metric's variables: an unknown one fails
            # with the template's name before any query is sent.
            render_template(
                template.query,
                namespace=namespace,
                target="target",
                interval=metric.interval,
                name="name",
                variables=metric.template_variables,
            )
        except TemplateError as error:
            return self._failure(metric, f"MetricTemplate {template.ref}: {error}")
        credentials: Credentials | None = None
        if template.secret_ref is not None:
            found = self._credentials(template)
            if isinstance(found, str):
                return self._failure(metric, found)
            credentials = found
        settings = provider_settings(template, credentials, default=self._default)
        return ResolvedTemplate(template=template, provider=self._provider(settings))

    # --- Secrets --------------------------------------------------------------------------------

    def _credentials(self, template: MetricTemplate) -> Credentials | str:
        assert template.secret_ref is not None
        name = f"Secret {template.secret_ref}.{template.namespace} of MetricTemplate {template.ref}"
        read = self._read_secret(template.namespace, template.secret_ref)
        if read.secret is None:
            return f"cannot read {name}: {read.problem}"
        try:
            return credentials_from_secret(read.secret)
        except MetricTemplateError as error:
            # A Secret being fixed is read again soon, as one that could not be read.
            key = (template.namespace, template.secret_ref)
            soon = self._clock() + self._retry
            with self._lock:
                if self._secret_reads.get(key) is read and read.expires > soon:
                    self._secret_reads[key] = _SecretRead(expires=soon, secret=read.secret)
            return f"{name}: {error}"

    def _read_secret(self, namespace: str, name: str) -> _SecretRead:
        key = (namespace, name)
        now = self._clock()
        with self._lock:
            cached = self._secret_reads.get(key)
        if cached is not None and cached.expires > now:
            return cached
        with self._lock:
            self.secret_gets += 1
        try:
            secret = self._secrets.get(SECRETS, namespace, name)
        except ApiException as exc:
            problem = describe_api_error(exc)
            if exc.status == 403:
                problem += f" ({_FORBIDDEN_HINT})"
            read = _SecretRead(expires=now + self._retry, problem=problem)
        except Exception as exc:  # the API unreachable: the check fails and says why
            read = _SecretRead(expires=now + self._retry, problem=describe_api_error(exc))
        else:
            if secret is None:
                read = _SecretRead(expires=now + self._retry, problem="not found")
            else:
                read = _SecretRead(expires=now + self._secret_ttl, secret=secret)
        if read.secret is None:
            log.warning("Secret %s.%s: %s", name, namespace, read.problem)
        with self._lock:
            self._secret_reads[key] = read
        return read

    # --- providers ------------------------------------------------------------------------------

    def _provider(self, settings: ProviderSettings) -> PrometheusProvider:
        key = (
            settings.address,
            tuple(sorted(settings.headers.items())),
            settings.verify_tls,
            settings.ca_bundle,
            settings.timeout_seconds,
        )
        retired: list[PrometheusProvider] = []
        with self._lock:
            provider = self._providers.get(key)
            if provider is not None:
                self._providers.move_to_end(key)
                return provider
            provider = PrometheusProvider.from_settings(settings)
            self._providers[key] = provider
            while len(self._providers) > self._max_providers:
                _, old = self._providers.popitem(last=False)
                self._retired_calls += old.calls
                retired.append(old)
        for old in retired:
            old.close()
        return provider

    @staticmethod
    def _failure(metric: Metric, message: str) -> MetricResult:
        return MetricResult(
            name=metric.name,
            outcome="error",
            value=None,
            message=f"metric {metric.name}: {message}",
        )
