"""AlertProvider objects (``perch.dev/v1alpha1``), read through the API for the notifiers.

An ``analysis.alerts[].providerRef`` names an AlertProvider in its ``namespace`` or the canary's.
Its ``spec`` is Flagger's: ``type`` (slack, msteams, discord, rocket, gchat, generic), ``address``,
``channel``, ``username``, ``proxy``, ``secretRef.name``. With a secretRef, the Secret (in the
provider's namespace) holds the address under the key ``address``, which takes precedence over
``spec.address`` as in Flagger; it may also hold ``proxy`` (a proxy URL can carry a password).

Why GETs behind a small TTL cache rather than a watch: a provider is read only when a notification
is due (a few per release), not each tick, so a watch would keep a connection and a copy of every
AlertProvider in the cluster to save a handful of GETs; GETs need only the ``get`` verb, and the
Secrets could not be watched at all without ``list`` on every Secret of a namespace, which would
hand the analyzer every credential there. A provider is read again at most every ``ttl`` seconds
(30), a missing or unusable one every ``retry_ttl`` (10), so an edit or a fix takes effect within
that. Lookups run on the notifications' own thread, never in a tick.

Errors say which object and why, never the address: "Secret test/slack-url of AlertProvider
test/on-call not found".
"""

from __future__ import annotations

import base64
import binascii
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from analyzer.notify import (
    NOTIFIER_TYPES,
    ProviderConfig,
    ProviderUnavailable,
    check_url,
)
from perch.kube import describe_api_error
from perch.resources import SECRETS, Kube, Resource

__all__ = [
    "ALERT_PROVIDERS",
    "AlertProviderResolver",
    "provider_config",
]

ALERT_PROVIDERS: Final = Resource("perch.dev", "v1alpha1", "alertproviders")
DEFAULT_TTL_SECONDS: Final = 30.0
DEFAULT_RETRY_TTL_SECONDS: Final = 10.0
# The keys of the Secret a secretRef names (Flagger's "address"; "proxy" is Perch's addition).
ADDRESS_KEY: Final = "address"
PROXY_KEY: Final = "proxy"

# Reads the Secret `name` in the provider's namespace: its data (base64 values), or None if missing.
SecretReader = Callable[[str], Mapping[str, Any] | None]


def _string(spec: Mapping[str, Any], key: str, *, where: str) -> str | None:
    value = spec.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ProviderUnavailable(f"{where} is invalid: spec.{key} must be a string")
    return value


def _secret_value(data: Mapping[str, Any], key: str, *, where: str) -> str | None:
    raw = data.get(key)
    if raw is None:
        return None
    try:
        return base64.b64decode(str(raw), validate=True).decode("utf-8").strip() or None
    except (binascii.Error, UnicodeDecodeError):
        raise ProviderUnavailable(f"{where}: key {key} is not UTF-8 text") from None


def provider_config(obj: Mapping[str, Any], *, read_secret: SecretReader) -> ProviderConfig:
    """An AlertProvider object as a provider; ProviderUnavailable says what is wrong with it."""
    meta = obj.get("metadata") or {}
    where = f"AlertProvider {meta.get('namespace', '')}/{meta.get('name', '')}"
    spec = obj.get("spec")
    if not isinstance(spec, Mapping):
        raise ProviderUnavailable(f"{where} is invalid: it has no spec")
    kind = spec.get("type")
    if kind not in NOTIFIER_TYPES:
        known = ", ".join(sorted(NOTIFIER_TYPES))
        raise ProviderUnavailable(f"{where} is invalid: spec.type must be one of {known}")
    address = _string(spec, "address", where=where)
    proxy = _string(spec, "proxy", where=where)
    secret_ref = spec.get("secretRef")
    if secret_ref is not None:
        name = secret_ref.get("name") if isinstance(secret_ref, Mapping) else None
        if not isinstance(name, str) or not name:
            raise ProviderUnavailable(f"{where} is invalid: spec.secretRef.name is required")
        secret_where = f"Secret {meta.get('namespace', '')}/{name} of {where}"
        data = read_secret(name)
        if data is None:
            raise ProviderUnavailable(f"{secret_where} not found")
        address = _secret_value(data, ADDRESS_KEY, where=secret_where)
        if address is None:
            raise ProviderUnavailable(f"{secret_where} has no key {ADDRESS_KEY}")
        proxy = _secret_value(data, PROXY_KEY, where=secret_where) or proxy
        where = secret_where
    if address is None:
        raise ProviderUnavailable(f"{where} is invalid: give spec.address or spec.secretRef")
    try:
        config: ProviderConfig = {
            "type": str(kind),
            "url": check_url(address, where=f"{where}: the address"),
        }
        if proxy:
            config["proxy"] = check_url(proxy, where=f"{where}: the proxy")
    except ValueError as exc:
        raise ProviderUnavailable(str(exc)) from None
    for key in ("channel", "username"):
        value = _string(spec, key, where=where)
        if value:
            config[key] = value
    return config


@dataclass(frozen=True, slots=True)
class _Entry:
    expires: float
    config: ProviderConfig | None = None
    problem: str | None = None


class AlertProviderResolver:
    """:class:`analyzer.notify.ProviderResolver` over the API: GETs behind a TTL cache."""

    def __init__(
        self,
        kube: Kube,
        *,
        ttl: float = DEFAULT_TTL_SECONDS,
        retry_ttl: float = DEFAULT_RETRY_TTL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._kube = kube
        self._ttl = ttl
        self._retry_ttl = retry_ttl
        self._clock = clock
        self._cache: dict[tuple[str, str], _Entry] = {}
        self._lock = threading.Lock()

    @property
    def calls(self) -> int:
        """API requests sent so far (telemetry)."""
        return self._kube.calls

    def resolve(self, name: str, *, namespace: str) -> ProviderConfig | None:
        key = (namespace, name)
        now = self._clock()
        with self._lock:
            entry = self._cache.get(key)
        if entry is None or entry.expires <= now:
            entry = self._read(namespace, name, now=now)
            with self._lock:
                self._cache[key] = entry
        if entry.problem is not None:
            raise ProviderUnavailable(entry.problem)
        return entry.config

    def _read(self, namespace: str, name: str, *, now: float) -> _Entry:
        where = f"AlertProvider {namespace}/{name}"
        retry = now + self._retry_ttl
        try:
            obj = self._kube.get(ALERT_PROVIDERS, namespace, name)
        except (ApiException, HTTPError, OSError) as exc:
            return _Entry(retry, problem=f"{where} could not be read: {_why(exc)}")
        if obj is None:
            return _Entry(retry)

        def read_secret(secret: str) -> Mapping[str, Any] | None:
            try:
                found = self._kube.get(SECRETS, namespace, secret)
            except (ApiException, HTTPError, OSError) as exc:
                raise ProviderUnavailable(
                    f"Secret {namespace}/{secret} of {where} could not be read: {_why(exc)}"
                ) from None
            if found is None:
                return None
            data = found.get("data")
            return data if isinstance(data, Mapping) else {}

        try:
            config = provider_config(obj, read_secret=read_secret)
        except ProviderUnavailable as exc:
            return _Entry(retry, problem=str(exc))
        return _Entry(now + self._ttl, config=config)


def _why(exc: BaseException) -> str:
    # For a 403 the API's message names the user, verb and resource: what an operator needs.
    return describe_api_error(exc)
