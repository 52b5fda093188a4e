"""Notifications: Slack, Microsoft Teams, Discord, Rocket.Chat, Google Chat and a generic JSON
webhook, sent in the background.

When: on start, each halt, each transition into Failed, and promotion (``NotificationKind``). Each
kind has Flagger's severity: started and promoted are ``info``, halted is ``warn``, failed is
``error``; an alert of severity ``info`` gets every kind, ``warn`` gets halted and failed, ``error``
gets failed only (Flagger's documented rule).

Where:

- The analyzer's settings (chart values, as environment variables): ``PERCH_SLACK_URL`` (with
  optional ``PERCH_SLACK_CHANNEL`` and ``PERCH_SLACK_USERNAME``) and ``PERCH_NOTIFY_URL`` (the
  generic JSON webhook). These get every kind, for the canaries that list no alerts.
- The spec's ``analysis.alerts``: each ``providerRef`` names an AlertProvider object
  (``perch.dev/v1alpha1``) in the ref's namespace, or the canary's. A :class:`ProviderResolver`
  (analyzer.alerts: GETs through a small TTL cache) reads it and the Secret holding its address.
  A name no AlertProvider has may be one of the settings' ``PERCH_ALERT_PROVIDERS``, a JSON object
  ``{"on-call": {"type": "slack", "url": "https://hooks.slack.com/...", "channel": "#on-call"}}``
  (keyed ``name`` or ``namespace/name``). As in Flagger, a canary that lists alerts is notified
  through them only.

A provider that is missing or unusable (its Secret unreadable, no ``address`` key, an invalid type
or URL) costs that alert's notification: it is dropped, and ``on_unresolved`` (the analyzer records
a Warning event on the Canary) is told which, at most once per ``warn_every`` seconds for the same
canary, alert and reason.

Never in the way of a rollout: :meth:`Notifications.send` only queues and returns. Resolving
providers (API calls) happens on a thread of its own; each destination has a bounded queue and one
daemon thread; a full queue drops its oldest message (counted and logged); each POST is bounded by
the notifier's timeout; failures are logged as JSON lines and counted, never raised. Notifier URLs
and proxies carry secrets (a Slack webhook URL is a credential), so logs and events name a notifier
by its label and never print its URL.

The payloads are in :mod:`analyzer.payloads`.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import (
    Any,
    Final,
    Generic,
    NotRequired,
    Protocol,
    TypedDict,
    TypeVar,
    Unpack,
    cast,
    get_args,
)
from urllib.parse import urlsplit

import requests
from urllib3.util import Timeout

from analyzer.gates import root_cause
from analyzer.model import NotificationKind
from analyzer.payloads import (
    KIND_SEVERITY,
    PROVIDER_TYPES,
    GenericPayload,
    Notification,
    NotificationContext,
    SlackPayload,
    discord_payload,
    gchat_payload,
    generic_payload,
    msteams_payload,
    rocket_payload,
    slack_payload,
)
from perch.spec import Alert, Analysis, CanarySpec, Severity

__all__ = [
    "KIND_SEVERITY",
    "NOTIFIER_TYPES",
    "ChatNotifier",
    "DeliveryStats",
    "GenericPayload",
    "Notification",
    "NotificationContext",
    "Notifications",
    "Notifier",
    "NotifyError",
    "ProviderConfig",
    "ProviderResolver",
    "ProviderUnavailable",
    "Route",
    "SlackPayload",
    "Unresolved",
    "check_url",
    "generic_payload",
    "kinds_for",
    "notifier_for",
    "notifiers_for_alerts",
    "notifiers_from_settings",
    "providers_from_settings",
    "register_notifier",
    "slack_payload",
    "spec_context",
    "traffic_routing",
]

_log = logging.getLogger("perch.analyzer.notify")

KINDS: Final[tuple[NotificationKind, ...]] = get_args(NotificationKind)
_SEVERITY_KINDS: Final[Mapping[Severity, frozenset[NotificationKind]]] = {
    "info": frozenset(KINDS),
    "warn": frozenset({"halted", "failed"}),
    "error": frozenset({"failed"}),
}
DEFAULT_TIMEOUT_SECONDS: Final = 5.0
DEFAULT_QUEUE_SIZE: Final = 100
# The same canary, alert and reason is reported (event, log) at most this often.
DEFAULT_WARN_EVERY_SECONDS: Final = 300.0


def kinds_for(severity: Severity) -> frozenset[NotificationKind]:
    return _SEVERITY_KINDS[severity]


# --- what is sent ------------------------------------------------------------------------------


def traffic_routing(analysis: Analysis) -> str:
    """Flagger's "Traffic routing" field."""
    if analysis.strategy == "ab-testing":
        return "A/B Testing"
    if analysis.strategy == "blue-green":
        return "Blue/Green"
    if analysis.step_weights:
        steps = ",".join(str(weight) for weight in analysis.steps)
        return f"Weight steps: {steps} max: {analysis.max_weight}"
    return (
        f"Weight step: {analysis.step_weight} max: {analysis.max_weight} "
        f"interval: {analysis.interval}"
    )


def spec_context(spec: CanarySpec) -> NotificationContext:
    """The part of a notification's context that comes from the spec."""
    return {
        "threshold": spec.analysis.threshold,
        "progress_deadline_seconds": spec.progress_deadline_seconds,
        "traffic_routing": traffic_routing(spec.analysis),
    }


# --- notifiers ----------------------------------------------------------------------------------


class NotifyError(Exception):
    """A notifier's POST did not succeed; the message never contains the notifier's URL."""


class Notifier(Protocol):
    @property
    def label(self) -> str:
        """A name safe to log ("slack", "alert on-call"): never the URL."""
        ...

    @property
    def key(self) -> str:
        """Identifies the destination; notifiers with equal keys share one queue. Not logged."""
        ...

    def post(self, notification: Notification, *, session: requests.Session) -> None:
        """Deliver one notification within the notifier's timeout, or raise NotifyError."""
        ...


def _post_json(
    url: str,
    payload: object,
    *,
    session: requests.Session,
    timeout: float,
    proxy: str | None = None,
) -> None:
    try:
        response = session.post(
            url,
            data=json.dumps(payload, separators=(",", ":")).encode(),
            headers={"Content-Type": "application/json"},
            # As in gates: urllib3's Timeout bounds connect + read together; the stubs lack it.
            timeout=cast(Any, Timeout(connect=timeout, read=timeout, total=timeout)),
            # Given explicitly, the provider's proxy wins over HTTP(S)_PROXY and NO_PROXY.
            proxies={"http": proxy, "https": proxy} if proxy else None,
        )
    except requests.exceptions.Timeout:
        raise NotifyError(f"no answer within {timeout:g}s") from None
    except requests.exceptions.RequestException as exc:
        # requests' own message quotes the URL's path, which holds the Slack token (and a proxy
        # URL may hold a password).
        raise NotifyError(f"{type(exc).__name__}: {_root_reason(exc)}") from None
    with response:
        if not 200 <= response.status_code < 300:
            excerpt = " ".join(response.text[:200].split())
            raise NotifyError(f"HTTP {response.status_code}: {excerpt}")


def _root_reason(exc: BaseException) -> str:
    # Only the kind of failure: the message of a connection error can quote the URL, and a Slack
    # URL is a credential that must not reach the log.
    root = root_cause(exc)
    if isinstance(root, OSError) and root.strerror:
        return root.strerror
    return type(root).__name__


@dataclass(frozen=True, slots=True)
class ChatNotifier:
    """Posts a notification to one service's incoming webhook, in the body that service documents
    (analyzer/payloads.py). ``type`` is an AlertProvider type: slack (and Slack-compatible
    receivers), msteams, discord (an address ending in ``/slack`` gets the Slack body, as Discord
    takes it there), rocket, gchat or generic. ``channel`` and ``username`` go where the service
    has them (slack, rocket; username also discord)."""

    type: str
    url: str
    channel: str | None = None
    username: str = "perch"
    timeout: float = DEFAULT_TIMEOUT_SECONDS
    label: str = ""
    proxy: str | None = None

    def __post_init__(self) -> None:
        if self.type not in PROVIDER_TYPES:
            known = ", ".join(sorted(PROVIDER_TYPES))
            raise ValueError(f"unknown notifier type {self.type!r} (known: {known})")
        if not self.label:
            object.__setattr__(self, "label", self.type)

    @property
    def key(self) -> str:
        return f"{self.type} {self.url} {self.channel or ''} {self.username} {self.proxy or ''}"

    @property
    def slack_compatible(self) -> bool:
        return self.type == "slack" or (
            self.type == "discord" and urlsplit(self.url).path.rstrip("/").endswith("/slack")
        )

    def payload(self, notification: Notification) -> object:
        if self.slack_compatible:
            channel = self.channel if self.type == "slack" else None
            return slack_payload(notification, channel=channel, username=self.username)
        if self.type == "discord":
            return discord_payload(notification, username=self.username)
        if self.type == "rocket":
            return rocket_payload(notification, channel=self.channel, username=self.username)
        if self.type == "msteams":
            return msteams_payload(notification)
        if self.type == "gchat":
            return gchat_payload(notification)
        return generic_payload(notification)

    def post(self, notification: Notification, *, session: requests.Session) -> None:
        _post_json(
            self.url,
            self.payload(notification),
            session=session,
            timeout=self.timeout,
            proxy=self.proxy,
        )


class ProviderConfig(TypedDict):
    """One provider: an AlertProvider object as read, or an entry of PERCH_ALERT_PROVIDERS."""

    type: str
    url: str
    channel: NotRequired[str]
    username: NotRequired[str]
    proxy: NotRequired[str]
    timeout: NotRequired[float]


NotifierFactory = Callable[[ProviderConfig, str], Notifier]


# The services whose body has a channel, and those with a username: the others ignore them.
_CHANNEL_TYPES: Final = frozenset({"slack", "rocket"})
_USERNAME_TYPES: Final = frozenset({"slack", "rocket", "discord"})


def _chat_from(config: ProviderConfig, label: str) -> Notifier:
    kind = config["type"]
    return ChatNotifier(
        kind,
        config["url"],
        channel=config.get("channel") if kind in _CHANNEL_TYPES else None,
        username=config.get("username", "perch") if kind in _USERNAME_TYPES else "perch",
        timeout=config.get("timeout", DEFAULT_TIMEOUT_SECONDS),
        label=label,
        proxy=config.get("proxy"),
    )


# Notifier implementations by provider type (Flagger's AlertProvider types, and generic);
# register_notifier adds one.
NOTIFIER_TYPES: Final[dict[str, NotifierFactory]] = dict.fromkeys(PROVIDER_TYPES, _chat_from)


def register_notifier(type_name: str, factory: NotifierFactory) -> None:
    NOTIFIER_TYPES[type_name] = factory


def notifier_for(config: ProviderConfig, *, label: str) -> Notifier:
    factory = NOTIFIER_TYPES.get(config["type"])
    if factory is None:
        known = ", ".join(sorted(NOTIFIER_TYPES))
        raise ValueError(f"unknown notifier type {config['type']!r} (known: {known})")
    return factory(config, label)


# --- configuration ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Route:
    """A notifier and the kinds it gets."""

    notifier: Notifier
    kinds: frozenset[NotificationKind] = frozenset(KINDS)


def check_url(url: str, *, where: str) -> str:
    """``url`` if it is an http(s) URL with a host; the ValueError never echoes it."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        # The URL itself is not echoed: it may be a credential.
        raise ValueError(f"{where} is not an http(s) URL with a host")
    return url


def notifiers_from_settings(env: Mapping[str, str]) -> tuple[Route, ...]:
    """The default notifiers: PERCH_SLACK_URL and PERCH_NOTIFY_URL; raises ValueError if invalid."""
    routes: list[Route] = []
    slack_url = env.get("PERCH_SLACK_URL", "").strip()
    if slack_url:
        notifier = ChatNotifier(
            "slack",
            check_url(slack_url, where="PERCH_SLACK_URL"),
            channel=env.get("PERCH_SLACK_CHANNEL", "").strip() or None,
            username=env.get("PERCH_SLACK_USERNAME", "").strip() or "perch",
        )
        routes.append(Route(notifier))
    generic_url = env.get("PERCH_NOTIFY_URL", "").strip()
    if generic_url:
        routes.append(
            Route(ChatNotifier("generic", check_url(generic_url, where="PERCH_NOTIFY_URL")))
        )
    return tuple(routes)


def providers_from_settings(env: Mapping[str, str]) -> dict[str, ProviderConfig]:
    """PERCH_ALERT_PROVIDERS parsed and checked; raises ValueError naming the bad entry."""
    text = env.get("PERCH_ALERT_PROVIDERS", "").strip()
    if not text:
        return {}
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"PERCH_ALERT_PROVIDERS is not JSON: {exc.msg} at {exc.pos}") from None
    if not isinstance(raw, dict):
        raise ValueError("PERCH_ALERT_PROVIDERS must be a JSON object of name to provider")
    providers: dict[str, ProviderConfig] = {}
    for name, entry in raw.items():
        where = f"PERCH_ALERT_PROVIDERS[{name!r}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} must be an object with type and url")
        kind, url = entry.get("type"), entry.get("url")
        if kind not in NOTIFIER_TYPES:
            known = ", ".join(sorted(NOTIFIER_TYPES))
            raise ValueError(f"{where}.type must be one of {known}")
        if not isinstance(url, str):
            raise ValueError(f"{where}.url must be a string")
        config: ProviderConfig = {"type": kind, "url": check_url(url, where=f"{where}.url")}
        for key in ("channel", "username", "proxy"):
            value = entry.get(key)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{where}.{key} must be a string")
        if isinstance(entry.get("channel"), str):
            config["channel"] = entry["channel"]
        if isinstance(entry.get("username"), str):
            config["username"] = entry["username"]
        if entry.get("proxy"):
            config["proxy"] = check_url(entry["proxy"], where=f"{where}.proxy")
        timeout = entry.get("timeout")
        if timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
                raise ValueError(f"{where}.timeout must be a positive number of seconds")
            config["timeout"] = float(timeout)
        providers[name] = config
    return providers


def _settings_provider(
    alert: Alert, providers: Mapping[str, ProviderConfig]
) -> tuple[str, ProviderConfig | None]:
    ref = alert.provider_ref
    candidates = ([f"{ref.namespace}/{ref.name}"] if ref.namespace else []) + [ref.name]
    config = next((providers[key] for key in candidates if key in providers), None)
    return candidates[0], config


def notifiers_for_alerts(
    alerts: Sequence[Alert], providers: Mapping[str, ProviderConfig]
) -> tuple[Route, ...]:
    """The spec's alerts resolved through the settings' providers only; unknown names are logged
    and skipped. (With AlertProvider objects, :class:`Notifications` resolves on its thread.)"""
    routes: list[Route] = []
    for alert in alerts:
        where, config = _settings_provider(alert, providers)
        if config is None:
            _log_event(
                "alert provider not configured",
                level=logging.WARNING,
                alert=alert.name,
                provider=where,
                hint="create the AlertProvider, or add it to PERCH_ALERT_PROVIDERS",
            )
            continue
        try:
            notifier = notifier_for(config, label=f"alert {alert.name}")
        except ValueError as exc:
            _log_event("alert provider invalid", level=logging.WARNING, alert=alert.name, error=exc)
            continue
        routes.append(Route(notifier, kinds_for(alert.severity)))
    return tuple(routes)


# --- AlertProvider objects ---------------------------------------------------------------------


class ProviderUnavailable(Exception):
    """An AlertProvider exists but cannot be used; the message says which object and why (never
    the address)."""


class ProviderResolver(Protocol):
    def resolve(self, name: str, *, namespace: str) -> ProviderConfig | None:
        """The AlertProvider ``namespace/name`` as a provider; None when there is none. Raises
        ProviderUnavailable when it, or the Secret holding its address, cannot be used."""
        ...


# Told "Alert on-call not sent: AlertProvider test/on-call not found" when an alert cannot be
# delivered; the analyzer records it as a Warning event on the Canary.
Unresolved = Callable[[str], None]


# --- delivery -----------------------------------------------------------------------------------


@dataclass(slots=True)
class DeliveryStats:
    sent: int = 0
    failed: int = 0
    dropped: int = 0


@dataclass(frozen=True, slots=True)
class _Delivery:
    notifier: Notifier
    notification: Notification


@dataclass(frozen=True, slots=True)
class _Resolution:
    alerts: tuple[Alert, ...]
    notification: Notification
    on_unresolved: Unresolved | None


Item = TypeVar("Item", _Delivery, _Resolution)


@dataclass(slots=True)
class _Worker(Generic[Item]):
    """A bounded queue drained by one daemon thread: one destination, or the provider lookups."""

    label: str
    capacity: int
    handle: Callable[[Item, requests.Session], None]
    stats: DeliveryStats = field(default_factory=DeliveryStats)
    _queue: deque[Item] = field(default_factory=deque)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _busy: bool = False
    _closed: bool = False
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name=f"perch-notify-{self.label}", daemon=True
        )
        self._thread.start()

    def put(self, item: Item) -> None:
        with self._cond:
            if self._closed:
                self.stats.dropped += 1
                return
            if len(self._queue) >= self.capacity:
                # The newest news matters most: a halt from a minute ago is stale.
                oldest = self._queue.popleft().notification
                self.stats.dropped += 1
                _log_event(
                    "notification dropped: queue full",
                    level=logging.WARNING,
                    notifier=self.label,
                    kind=oldest.kind,
                    canary=oldest.title,
                    dropped=self.stats.dropped,
                )
            self._queue.append(item)
            self._cond.notify_all()

    def _run(self) -> None:
        with requests.Session() as session:
            while True:
                with self._cond:
                    while not self._queue and not self._closed:
                        self._cond.wait()
                    if not self._queue:
                        return
                    item = self._queue.popleft()
                    self._busy = True
                try:
                    self.handle(item, session)
                except Exception as exc:  # a broken notifier must not end the thread
                    with self._cond:
                        self.stats.failed += 1
                        failed = self.stats.failed
                    _log_event(
                        "notification failed",
                        level=logging.WARNING,
                        notifier=self.label,
                        kind=item.notification.kind,
                        canary=item.notification.title,
                        error=str(exc) if isinstance(exc, NotifyError) else repr(exc),
                        failed=failed,
                    )
                else:
                    with self._cond:
                        self.stats.sent += 1
                finally:
                    with self._cond:
                        self._busy = False
                        self._cond.notify_all()

    def wait_idle(self, deadline: float) -> bool:
        with self._cond:
            while self._queue or self._busy:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


def _deliver(item: _Delivery, session: requests.Session) -> None:
    item.notifier.post(item.notification, session=session)


_CONTEXT_KEYS: Final = frozenset(NotificationContext.__annotations__)


def _known(context: Mapping[str, object]) -> dict[str, Any]:
    # Callers built against the JSON payload say failedChecks; a misspelt key must cost the
    # field, not the whole notification.
    known: dict[str, Any] = {}
    for key, value in context.items():
        snake = re.sub(r"(?<!^)([A-Z])", r"_\1", key).lower()
        if snake in _CONTEXT_KEYS:
            known[snake] = value
        else:
            _log_event("notification context key ignored", level=logging.WARNING, key=key)
    return known


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Notifications:
    """Fans notifications out to the configured notifiers without ever waiting for them."""

    def __init__(
        self,
        routes: Sequence[Route] = (),
        *,
        providers: Mapping[str, ProviderConfig] | None = None,
        resolver: ProviderResolver | None = None,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        clock: Callable[[], datetime] = _utcnow,
        warn_every: float = DEFAULT_WARN_EVERY_SECONDS,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        self._routes = tuple(routes)
        self._providers = dict(providers or {})
        self._resolver = resolver
        self._queue_size = queue_size
        self._clock = clock
        self._warn_every = warn_every
        self._monotonic = monotonic
        self._warned: dict[tuple[str, str, str, str], float] = {}
        self._workers: dict[str, _Worker[_Delivery]] = {}
        self._resolving: _Worker[_Resolution] | None = None
        self._lock = threading.Lock()
        self._closed = False  # send() takes nothing more
        self._stopped = False  # the queues have drained (or had their chance): no new workers
        self.unresolved = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str], **kwargs: Any) -> Notifications:
        return cls(notifiers_from_settings(env), providers=providers_from_settings(env), **kwargs)

    def send(
        self,
        kind: NotificationKind,
        message: str,
        /,
        *,
        alerts: Sequence[Alert] = (),
        on_unresolved: Unresolved | None = None,
        **context: Unpack[NotificationContext],
    ) -> None:
        """Queue one notification for every notifier that takes ``kind``; returns at once.

        ``alerts`` are the canary's ``analysis.alerts``: when there are any they replace the
        settings' notifiers for this canary (Flagger), and their providers are looked up on the
        lookup thread; ``on_unresolved`` hears of each alert that cannot be delivered. Context keys
        are also accepted in the wire spelling (``failedChecks``); an unknown key is logged and
        ignored, never fatal.
        """
        if self._closed:
            return
        try:
            notification = Notification(
                kind=kind, message=message, timestamp=self._clock(), **_known(context)
            )
            if not alerts:
                self._fan_out(self._routes, notification)
                return
            wanted = tuple(a for a in alerts if kind in kinds_for(a.severity))
            if not wanted:
                return
            worker = self._resolver_worker()
            if worker is not None:
                worker.put(_Resolution(wanted, notification, on_unresolved))
        except Exception as exc:  # a notification must never cost the tick
            _log_event("notification not queued", level=logging.ERROR, kind=kind, error=repr(exc))

    def _fan_out(self, routes: Sequence[Route], notification: Notification) -> None:
        seen: set[str] = set()
        for route in routes:
            key = route.notifier.key
            if notification.kind not in route.kinds or key in seen:
                continue
            seen.add(key)
            worker = self._worker(key, route.notifier.label)
            if worker is not None:
                worker.put(_Delivery(route.notifier, notification))

    # --- the lookup thread ----------------------------------------------------------------------

    def _resolve(self, job: _Resolution, session: requests.Session) -> None:
        del session  # lookups go through the resolver's own client
        routes: list[Route] = []
        for alert in job.alerts:
            notifier = self._notifier_for(alert, job)
            if notifier is not None:
                routes.append(Route(notifier, kinds_for(alert.severity)))
        self._fan_out(routes, job.notification)

    def _notifier_for(self, alert: Alert, job: _Resolution) -> Notifier | None:
        ref = alert.provider_ref
        namespace = ref.namespace or job.notification.namespace
        where = f"AlertProvider {namespace}/{ref.name}"
        config: ProviderConfig | None = None
        if self._resolver is not None:
            try:
                config = self._resolver.resolve(ref.name, namespace=namespace)
            except ProviderUnavailable as exc:
                self._unresolved(alert, job, str(exc))
                return None
            except Exception as exc:  # a broken resolver costs the alert, never the thread
                self._unresolved(alert, job, f"{where} could not be read: {type(exc).__name__}")
                return None
        if config is None:
            config = _settings_provider(alert, self._providers)[1]
        if config is None:
            self._unresolved(alert, job, f"{where} not found")
            return None
        try:
            return notifier_for(config, label=f"alert {alert.name}")
        except ValueError as exc:
            self._unresolved(alert, job, f"{where} is invalid: {exc}")
            return None

    def _unresolved(self, alert: Alert, job: _Resolution, reason: str) -> None:
        self.unresolved += 1
        n = job.notification
        key = (n.namespace, n.canary, alert.name, reason)
        now = self._monotonic()
        last = self._warned.get(key)
        if last is not None and now - last < self._warn_every:
            return
        self._warned[key] = now
        message = f"Alert {alert.name} not sent: {reason}"
        if job.on_unresolved is not None:
            try:
                job.on_unresolved(message)
                return
            except Exception as exc:
                _log_event("alert warning not recorded", level=logging.WARNING, error=repr(exc))
        _log_event(message, level=logging.WARNING, alert=alert.name, canary=n.title, kind=n.kind)

    # --- workers --------------------------------------------------------------------------------

    def _resolver_worker(self) -> _Worker[_Resolution] | None:
        with self._lock:
            if self._closed:
                return None
            if self._resolving is None:
                self._resolving = _Worker(
                    label="alert-providers", capacity=self._queue_size, handle=self._resolve
                )
                self._resolving.start()
            return self._resolving

    def _worker(self, key: str, label: str) -> _Worker[_Delivery] | None:
        with self._lock:
            if self._stopped:
                return None
            worker = self._workers.get(key)
            if worker is None:
                worker = _Worker(label=label, capacity=self._queue_size, handle=_deliver)
                worker.start()
                self._workers[key] = worker
            return worker

    def flush(self, timeout: float) -> bool:
        """Wait until every queue is empty and no POST is in flight; False when time ran out."""
        deadline = time.monotonic() + timeout
        with self._lock:
            resolving = self._resolving
        # Lookups first: they queue deliveries.
        if resolving is not None and not resolving.wait_idle(deadline):
            return False
        with self._lock:
            workers = list(self._workers.values())
        # One shared deadline: once a worker runs out of it, the others would too.
        return all(worker.wait_idle(deadline) for worker in workers)

    def close(self, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> bool:
        """Stop taking notifications, give the queues ``timeout`` to drain, stop the threads."""
        with self._lock:
            self._closed = True
        drained = self.flush(timeout)
        with self._lock:
            self._stopped = True
            workers: list[_Worker[Any]] = list(self._workers.values())
            if self._resolving is not None:
                workers.append(self._resolving)
        for worker in workers:
            worker.close()
        return drained

    def stats(self) -> dict[str, DeliveryStats]:
        """Counters per notifier label (summed when labels repeat), for metrics and tests."""
        totals: dict[str, DeliveryStats] = {}
        with self._lock:
            workers = list(self._workers.values())
        for worker in workers:
            total = totals.setdefault(worker.label, DeliveryStats())
            total.sent += worker.stats.sent
            total.failed += worker.stats.failed
            total.dropped += worker.stats.dropped
        return totals


def _log_event(msg: str, *, level: int, **fields: object) -> None:
    # analyzer.telemetry.JsonFormatter writes the "fields" extra as the JSON line's own keys.
    plain = {
        key: str(value) if isinstance(value, Exception) else value for key, value in fields.items()
    }
    _log.log(level, msg, extra={"fields": plain})
