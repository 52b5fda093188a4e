"""MetricTemplate objects (``perch.dev/v1alpha1``): read, checked, turned into provider settings.

A metric with ``templateRef`` names a MetricTemplate, Flagger's kind under Perch's group, with
Flagger's fields::

    apiVersion: perch.dev/v1alpha1
    kind: MetricTemplate
    metadata: {name: error-rate, namespace: test}
    spec:
      provider:
        type: prometheus                 # the one type Perch has (and servers speaking its API)
        address: https://prometheus.monitoring:9090   # empty: the analyzer's own Prometheus
        secretRef: {name: prom-auth}     # a Secret in the template's namespace
        insecureSkipVerify: false
      query: sum(rate(...{namespace="{{ namespace }}", ...}[{{ interval }}]))

The Secret's keys are Flagger's: ``token`` (sent as ``Authorization: Bearer``), or ``username``
and ``password`` (HTTP basic auth); a token wins when both are there, as in Flagger. Beyond
Flagger, ``ca.crt`` (the key kubernetes.io/tls Secrets and cert-manager use) is a PEM bundle of the
CAs to trust for the address, for a Prometheus behind a private CA; with ``insecureSkipVerify`` the
certificate is not checked at all and ``ca.crt`` is ignored.

Errors are :class:`MetricTemplateError` whose message says what is wrong in terms of the object
(``spec.provider.type``, the Secret's keys); the resolver prefixes the metric and the template.

Pure: no I/O.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

from analyzer.metrics.base import ProviderSettings

__all__ = [
    "METRIC_TEMPLATE_KIND",
    "METRIC_TEMPLATE_PLURAL",
    "PROVIDER_TYPES",
    "SECRET_KEYS",
    "Credentials",
    "MetricTemplate",
    "MetricTemplateError",
    "credentials_from_secret",
    "parse_metric_template",
    "provider_settings",
]

METRIC_TEMPLATE_KIND: Final = "MetricTemplate"
METRIC_TEMPLATE_PLURAL: Final = "metrictemplates"
# Flagger's other types (datadog, cloudwatch, ...) speak other APIs; Thanos, Cortex, Mimir and
# VictoriaMetrics answer Prometheus's query API and are type prometheus.
PROVIDER_TYPES: Final = ("prometheus",)
SECRET_KEYS: Final = ("token", "username", "password", "ca.crt")
_SPEC_FIELDS: Final = frozenset({"provider", "query"})
# Flagger's region is for cloudwatch; it is accepted (a Flagger template moved as it is) and unused.
_PROVIDER_FIELDS: Final = frozenset(
    {"type", "address", "secretRef", "insecureSkipVerify", "region"}
)


class MetricTemplateError(ValueError):
    """A MetricTemplate, or its Secret, that cannot be used; ``str()`` says why."""


@dataclass(frozen=True, slots=True)
class MetricTemplate:
    name: str
    namespace: str
    query: str
    provider_type: str = "prometheus"
    # Empty: the analyzer's own Prometheus (--prometheus-url).
    address: str = ""
    secret_ref: str | None = None
    insecure_skip_verify: bool = False

    @property
    def ref(self) -> str:
        """``error-rate.test``: named as Flagger names objects in its events."""
        return f"{self.name}.{self.namespace}"


@dataclass(frozen=True, slots=True)
class Credentials:
    """What a Secret adds to the requests: one Authorization header at most, and trusted CAs."""

    authorization: str | None = None
    ca_bundle: str | None = None


def parse_metric_template(obj: Mapping[str, Any]) -> MetricTemplate:
    """The template as Perch uses it; :class:`MetricTemplateError` naming the field otherwise.

    The CRD's schema refuses most mistakes at ``kubectl apply``; this is checked again because an
    object may predate the schema, and because the analyzer must never guess.
    """
    meta = obj.get("metadata") or {}
    name, namespace = str(meta.get("name") or ""), str(meta.get("namespace") or "")
    spec = obj.get("spec")
    if not isinstance(spec, Mapping):
        raise MetricTemplateError("spec: missing")
    unknown = sorted(set(spec) - _SPEC_FIELDS)
    if unknown:
        raise MetricTemplateError(f"spec.{unknown[0]}: unknown field (known: provider, query)")
    query = spec.get("query")
    if not isinstance(query, str) or not query.strip():
        raise MetricTemplateError("spec.query: missing; a MetricTemplate needs a query")
    provider = spec.get("provider") or {}
    if not isinstance(provider, Mapping):
        raise MetricTemplateError("spec.provider: expected a mapping")
    unknown = sorted(set(provider) - _PROVIDER_FIELDS)
    if unknown:
        raise MetricTemplateError(
            f"spec.provider.{unknown[0]}: unknown field "
            "(known: type, address, secretRef, insecureSkipVerify)"
        )
    provider_type = provider.get("type") or "prometheus"
    if provider_type not in PROVIDER_TYPES:
        raise MetricTemplateError(
            f"spec.provider.type: Perch has no metric provider {provider_type!r} "
            f"(it has: {', '.join(PROVIDER_TYPES)}, for Prometheus and servers that answer its "
            "query API)"
        )
    address = provider.get("address") or ""
    if not isinstance(address, str):
        raise MetricTemplateError("spec.provider.address: expected a string")
    if address:
        parts = urlsplit(address)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise MetricTemplateError(f"spec.provider.address: {address!r} is not an http(s) URL")
    secret_ref: str | None = None
    ref = provider.get("secretRef")
    if ref is not None:
        if not isinstance(ref, Mapping) or not isinstance(ref.get("name"), str) or not ref["name"]:
            raise MetricTemplateError("spec.provider.secretRef: needs a name")
        secret_ref = ref["name"]
    insecure = provider.get("insecureSkipVerify", False)
    if not isinstance(insecure, bool):
        raise MetricTemplateError("spec.provider.insecureSkipVerify: expected true or false")
    return MetricTemplate(
        name=name,
        namespace=namespace,
        query=query,
        provider_type=str(provider_type),
        address=address,
        secret_ref=secret_ref,
        insecure_skip_verify=insecure,
    )


def _decoded(data: Mapping[str, Any], key: str) -> str | None:
    raw = data.get(key)
    if raw is None:
        return None
    try:
        return base64.b64decode(str(raw), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise MetricTemplateError(f"its key {key} is not base64-encoded UTF-8 text") from None


def credentials_from_secret(secret: Mapping[str, Any]) -> Credentials:
    """Flagger's keys of a Secret (its ``data``, base64 as the API returns it) as credentials.

    ``token`` wins over ``username``/``password``; a username needs a password and the other way
    round; a Secret with none of the keys is an error (a secretRef is there for a reason), one
    with only ``ca.crt`` is a private CA without authentication.
    """
    data = secret.get("data") or {}
    if not isinstance(data, Mapping):
        raise MetricTemplateError("its data is not a mapping")
    token, username, password, ca = (_decoded(data, key) for key in SECRET_KEYS)
    # `kubectl create secret --from-file` keeps the file's last newline, which no header may hold.
    token = token.strip() if token is not None else None
    if ca is not None and "-----BEGIN CERTIFICATE-----" not in ca:
        raise MetricTemplateError("its key ca.crt holds no PEM certificate")
    authorization: str | None = None
    if token:
        authorization = f"Bearer {token}"
    elif username is not None or password is not None:
        if username is None:
            raise MetricTemplateError("it has a password but no username")
        if password is None:
            raise MetricTemplateError("it has a username but no password")
        pair = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
        authorization = f"Basic {pair}"
    elif ca is None:
        raise MetricTemplateError(
            f"it has none of the keys {', '.join(SECRET_KEYS)} (token, or username and "
            "password, and optionally ca.crt)"
        )
    return Credentials(authorization=authorization, ca_bundle=ca)


def provider_settings(
    template: MetricTemplate,
    credentials: Credentials | None,
    *,
    default: ProviderSettings,
) -> ProviderSettings:
    """How to reach the template's server: its address (or the analyzer's), its credentials."""
    headers: dict[str, str] = {}
    ca_bundle: str | None = None
    if credentials is not None:
        if credentials.authorization:
            headers["Authorization"] = credentials.authorization
        ca_bundle = credentials.ca_bundle
    if not template.address:
        # The analyzer's own Prometheus, with what the template adds.
        headers = {**default.headers, **headers}
    return ProviderSettings(
        address=template.address or default.address,
        timeout_seconds=default.timeout_seconds,
        headers=headers,
        verify_tls=not template.insecure_skip_verify,
        ca_bundle=None if template.insecure_skip_verify else ca_bundle,
    )
