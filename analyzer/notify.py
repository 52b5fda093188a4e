"""Notifications: Slack incoming webhooks and a generic JSON webhook, sent in the background.

When: on start, each halt, each transition into Failed, and promotion (``NotificationKind``). Each
kind has Flagger's severity: started and promoted are ``info``, halted is ``warn``, failed is
``error``; an alert of severity ``info`` gets every kind, ``warn`` gets halted and failed, ``error``
gets failed only (Flagger's rule).

Where:

- The analyzer's settings (chart values, as environment variables): ``PERCH_SLACK_URL`` (with
  optional ``PERCH_SLACK_CHANNEL`` and ``PERCH_SLACK_USERNAME``) and ``PERCH_NOTIFY_URL`` (the
  generic JSON webhook). These get every kind.
- The spec's ``analysis.alerts``. Flagger resolves an alert's ``providerRef`` to an AlertProvider
  object; Perch has no such object, so ``providerRef.name`` (or ``namespace/name`` when the ref has
  a namespace) is looked up in ``PERCH_ALERT_PROVIDERS``, a JSON object from the settings::

      {"on-call": {"type": "slack", "url": "https://hooks.slack.com/...", "channel": "#on-call"},
       "audit": {"type": "generic", "url": "https://audit.example/perch"}}

  As in Flagger, a canary that lists alerts is notified through them only; the settings'
  notifiers serve the canaries that list none. An unknown provider name is logged and skipped.

Webhook ``muteAlert`` (Flagger mutes the alert sent when that webhook fails) is not honoured here:
a notification carries no notion of which gate caused it. step() may drop a halt caused only by
muted gates before asking for a notification.

Never in the way of a rollout: :meth:`Notifications.send` only queues and returns. Each destination
has a bounded queue and one daemon thread; a full queue drops its oldest message (counted and
logged); each POST is bounded by the notifier's timeout; failures are logged as JSON lines and
counted, never raised. Notifier URLs carry secrets (a Slack webhook URL is a credential), so logs
name a notifier by its label and never print its URL.

Generic JSON webhook payload (``POST``, ``Content-Type: application/json``), every key always
present, ``null`` when unknown::

    {"kind": "failed", "severity": "error", "canary": "podinfo", "namespace": "test",
     "revision": "v1-3f9c2a...", "phase": "Failed",
     "message": "Rolling back podinfo.test failed checks threshold reached 10",
     "weight": 0, "failedChecks": 10, "timestamp": "2024-05-01T12:00:00.000Z"}
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
from typing import Any, Final, NotRequired, Protocol, TypedDict, Unpack, cast, get_args
from urllib.parse import urlsplit

import requests
from urllib3.util import Timeout

from analyzer.gates import root_cause
from analyzer.model import NotificationKind
from perch.spec import Alert, Analysis, CanarySpec, Severity
from perch.status import Phase

__all__ = [
    "KIND_SEVERITY",
    "NOTIFIER_TYPES",
    "DeliveryStats",
    "GenericPayload",
    "GenericWebhookNotifier",
    "Notification",
    "NotificationContext",
    "Notifications",
    "Notifier",
    "NotifyError",
    "ProviderConfig",
    "Route",
    "SlackNotifier",
    "SlackPayload",
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
KIND_SEVERITY: Final[Mapping[NotificationKind, Severity]] = {
    "started": "info",
    "halted": "warn",
    "failed": "error",
    "promoted": "info",
}
_SEVERITY_KINDS: Final[Mapping[Severity, frozenset[NotificationKind]]] = {
    "info": frozenset(KINDS),
    "warn": frozenset({"halted", "failed"}),
    "error": frozenset({"failed"}),
}
DEFAULT_TIMEOUT_SECONDS: Final = 5.0
DEFAULT_QUEUE_SIZE: Final = 100


def kinds_for(severity: Severity) -> frozenset[NotificationKind]:
    return _SEVERITY_KINDS[severity]


# --- what is sent ------------------------------------------------------------------------------


class NotificationContext(TypedDict, total=False):
    """What the caller knows about the canary; every key is optional."""

    canary: str
    namespace: str
    revision: str
    phase: Phase
    weight: int
    failed_checks: int
    threshold: int
    progress_deadline_seconds: int
    traffic_routing: str


@dataclass(frozen=True, slots=True)
class Notification:
    kind: NotificationKind
    message: str
    # Taken when send() is called, not when a worker gets to it: a queue may be slow.
    timestamp: datetime
    canary: str = ""
    namespace: str = ""
    revision: str | None = None
    phase: Phase | None = None
    weight: int | None = None
    failed_checks: int | None = None
    threshold: int | None = None
    progress_deadline_seconds: int | None = None
    traffic_routing: str | None = None

    @property
    def severity(self) -> Severity:
        return KIND_SEVERITY[self.kind]

    @property
    def title(self) -> str:
        return f"{self.canary}.{self.namespace}"


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


def _timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class GenericPayload(TypedDict):
    kind: NotificationKind
    severity: Severity
    canary: str
    namespace: str
    revision: str | None
    phase: str | None
    message: str
    weight: int | None
    failedChecks: int | None
    timestamp: str


def generic_payload(notification: Notification) -> GenericPayload:
    return {
        "kind": notification.kind,
        "severity": notification.severity,
        "canary": notification.canary,
        "namespace": notification.namespace,
        "revision": notification.revision,
        "phase": notification.phase,
        "message": notification.message,
        "weight": notification.weight,
        "failedChecks": notification.failed_checks,
        "timestamp": _timestamp(notification.timestamp),
    }


class SlackField(TypedDict):
    title: str
    value: str
    short: bool


class SlackAttachment(TypedDict):
    color: str
    fallback: str
    title: str
    text: str
    mrkdwn_in: list[str]
    fields: list[SlackField]
    footer: str
    ts: int


class SlackPayload(TypedDict):
    username: str
    icon_emoji: str
    text: str
    attachments: list[SlackAttachment]
    channel: NotRequired[str]


_SLACK_COLORS: Final[Mapping[NotificationKind, str]] = {
    "started": "#439FE0",
    "halted": "warning",
    "failed": "danger",
    "promoted": "good",
}
_SLACK_HEADLINES: Final[Mapping[NotificationKind, str]] = {
    "started": "canary analysis started",
    "halted": "canary advancement halted",
    "failed": "canary analysis failed, rolled back",
    "promoted": "canary promoted",
}


def _slack_escape(text: str) -> str:
    # Slack reads <...> as links and mentions: "success rate 61.39% < 99%" would lose its tail.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_payload(
    notification: Notification, *, channel: str | None = None, username: str = "perch"
) -> SlackPayload:
    """Flagger's layout: one attachment titled ``podinfo.test``, colored by kind, with fields."""
    n = notification
    fields: list[SlackField] = [
        {"title": "Target", "value": f"Deployment/{n.canary}.{n.namespace}", "short": True}
    ]
    if n.revision:
        fields.append({"title": "Revision", "value": n.revision, "short": True})
    if n.weight is not None:
        fields.append({"title": "Canary weight", "value": f"{n.weight}%", "short": True})
    if n.failed_checks is not None:
        fields.append({"title": "Failed checks", "value": str(n.failed_checks), "short": True})
    if n.threshold is not None:
        fields.append(
            {"title": "Failed checks threshold", "value": str(n.threshold), "short": True}
        )
    if n.progress_deadline_seconds is not None:
        fields.append(
            {
                "title": "Progress deadline",
                "value": f"{n.progress_deadline_seconds}s",
                "short": True,
            }
        )
    if n.traffic_routing:
        fields.append({"title": "Traffic routing", "value": n.traffic_routing, "short": False})
    for item in fields:
        item["value"] = _slack_escape(item["value"])
    payload: SlackPayload = {
        "username": username,
        "icon_emoji": ":bird:",
        # The top-level text is what a phone notification shows.
        "text": _slack_escape(f"{n.title}: {_SLACK_HEADLINES[n.kind]}"),
        "attachments": [
            {
                "color": _SLACK_COLORS[n.kind],
                "fallback": _slack_escape(f"{n.title}: {n.message}"),
                "title": _slack_escape(n.title),
                "text": _slack_escape(n.message),
                "mrkdwn_in": ["text"],
                "fields": fields,
                "footer": "perch",
                "ts": int(n.timestamp.timestamp()),
            }
        ],
    }
    if channel:
        payload["channel"] = channel
    return payload


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


def _post_json(url: str, payload: object, *, session: requests.Session, timeout: float) -> None:
    try:
        response = session.post(
            url,
            data=json.dumps(payload, separators=(",", ":")).encode(),
            headers={"Content-Type": "application/json"},
            # As in gates: urllib3's Timeout bounds connect + read together; the stubs lack it.
            timeout=cast(Any, Timeout(connect=timeout, read=timeout, total=timeout)),
        )
    except requests.exceptions.Timeout:
        raise NotifyError(f"no answer within {timeout:g}s") from None
    except requests.exceptions.RequestException as exc:
        # requests' own message quotes the URL's path, which holds the Slack token.
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
class SlackNotifier:
    """Posts to a Slack incoming webhook (Slack-compatible receivers work too)."""

    webhook_url: str
    channel: str | None = None
    username: str = "perch"
    timeout: float = DEFAULT_TIMEOUT_SECONDS
    label: str = "slack"

    @property
    def key(self) -> str:
        return f"slack {self.webhook_url} {self.channel or ''} {self.username}"

    def post(self, notification: Notification, *, session: requests.Session) -> None:
        payload = slack_payload(notification, channel=self.channel, username=self.username)
        _post_json(self.webhook_url, payload, session=session, timeout=self.timeout)


@dataclass(frozen=True, slots=True)
class GenericWebhookNotifier:
    """Posts :class:`GenericPayload` as JSON; any 2xx is success."""

    url: str
    timeout: float = DEFAULT_TIMEOUT_SECONDS
    label: str = "generic"

    @property
    def key(self) -> str:
        return f"generic {self.url}"

    def post(self, notification: Notification, *, session: requests.Session) -> None:
        _post_json(self.url, generic_payload(notification), session=session, timeout=self.timeout)


class ProviderConfig(TypedDict):
    """One entry of PERCH_ALERT_PROVIDERS."""

    type: str
    url: str
    channel: NotRequired[str]
    username: NotRequired[str]
    timeout: NotRequired[float]


NotifierFactory = Callable[[ProviderConfig, str], Notifier]


def _slack_from(config: ProviderConfig, label: str) -> Notifier:
    return SlackNotifier(
        config["url"],
        channel=config.get("channel"),
        username=config.get("username", "perch"),
        timeout=config.get("timeout", DEFAULT_TIMEOUT_SECONDS),
        label=label,
    )


def _generic_from(config: ProviderConfig, label: str) -> Notifier:
    return GenericWebhookNotifier(
        config["url"], timeout=config.get("timeout", DEFAULT_TIMEOUT_SECONDS), label=label
    )


# Notifier implementations by provider type; register_notifier adds one (e.g. msteams).
NOTIFIER_TYPES: Final[dict[str, NotifierFactory]] = {
    "slack": _slack_from,
    "generic": _generic_from,
}


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


def _check_url(url: str, *, where: str) -> str:
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
        notifier = SlackNotifier(
            _check_url(slack_url, where="PERCH_SLACK_URL"),
            channel=env.get("PERCH_SLACK_CHANNEL", "").strip() or None,
            username=env.get("PERCH_SLACK_USERNAME", "").strip() or "perch",
        )
        routes.append(Route(notifier))
    generic_url = env.get("PERCH_NOTIFY_URL", "").strip()
    if generic_url:
        routes.append(
            Route(GenericWebhookNotifier(_check_url(generic_url, where="PERCH_NOTIFY_URL")))
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
        config: ProviderConfig = {"type": kind, "url": _check_url(url, where=f"{where}.url")}
        for key in ("channel", "username"):
            value = entry.get(key)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{where}.{key} must be a string")
        if isinstance(entry.get("channel"), str):
            config["channel"] = entry["channel"]
        if isinstance(entry.get("username"), str):
            config["username"] = entry["username"]
        timeout = entry.get("timeout")
        if timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
                raise ValueError(f"{where}.timeout must be a positive number of seconds")
            config["timeout"] = float(timeout)
        providers[name] = config
    return providers


def notifiers_for_alerts(
    alerts: Sequence[Alert], providers: Mapping[str, ProviderConfig]
) -> tuple[Route, ...]:
    """The spec's alerts resolved through the settings' providers; unknown names are skipped."""
    routes: list[Route] = []
    for alert in alerts:
        ref = alert.provider_ref
        candidates = ([f"{ref.namespace}/{ref.name}"] if ref.namespace else []) + [ref.name]
        config = next((providers[key] for key in candidates if key in providers), None)
        if config is None:
            _log_event(
                "alert provider not configured",
                level=logging.WARNING,
                alert=alert.name,
                provider=candidates[0],
                hint="add it to PERCH_ALERT_PROVIDERS",
            )
            continue
        try:
            notifier = notifier_for(config, label=f"alert {alert.name}")
        except ValueError as exc:
            _log_event("alert provider invalid", level=logging.WARNING, alert=alert.name, error=exc)
            continue
        routes.append(Route(notifier, kinds_for(alert.severity)))
    return tuple(routes)


# --- delivery -----------------------------------------------------------------------------------


@dataclass(slots=True)
class DeliveryStats:
    sent: int = 0
    failed: int = 0
    dropped: int = 0


@dataclass(slots=True)
class _Worker:
    """One destination: a bounded queue drained by one daemon thread."""

    label: str
    capacity: int
    stats: DeliveryStats = field(default_factory=DeliveryStats)
    _queue: deque[tuple[Notifier, Notification]] = field(default_factory=deque)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _busy: bool = False
    _closed: bool = False
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name=f"perch-notify-{self.label}", daemon=True
        )
        self._thread.start()

    def put(self, notifier: Notifier, notification: Notification) -> None:
        with self._cond:
            if self._closed:
                self.stats.dropped += 1
                return
            if len(self._queue) >= self.capacity:
                # The newest news matters most: a halt from a minute ago is stale.
                _, oldest = self._queue.popleft()
                self.stats.dropped += 1
                _log_event(
                    "notification dropped: queue full",
                    level=logging.WARNING,
                    notifier=self.label,
                    kind=oldest.kind,
                    canary=oldest.title,
                    dropped=self.stats.dropped,
                )
            self._queue.append((notifier, notification))
            self._cond.notify_all()

    def _run(self) -> None:
        with requests.Session() as session:
            while True:
                with self._cond:
                    while not self._queue and not self._closed:
                        self._cond.wait()
                    if not self._queue:
                        return
                    notifier, notification = self._queue.popleft()
                    self._busy = True
                try:
                    notifier.post(notification, session=session)
                except Exception as exc:  # a broken notifier must not end the thread
                    with self._cond:
                        self.stats.failed += 1
                        failed = self.stats.failed
                    _log_event(
                        "notification failed",
                        level=logging.WARNING,
                        notifier=self.label,
                        kind=notification.kind,
                        canary=notification.title,
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
        queue_size: int = DEFAULT_QUEUE_SIZE,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        self._routes = tuple(routes)
        self._providers = dict(providers or {})
        self._queue_size = queue_size
        self._clock = clock
        self._workers: dict[str, _Worker] = {}
        self._lock = threading.Lock()
        self._closed = False

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
        **context: Unpack[NotificationContext],
    ) -> None:
        """Queue one notification for every notifier that takes ``kind``; returns at once.

        ``alerts`` are the canary's ``analysis.alerts``: when there are any they replace the
        settings' notifiers for this canary (Flagger). Context keys are also accepted in the wire
        spelling (``failedChecks``); an unknown key is logged and ignored, never fatal.
        """
        try:
            notification = Notification(
                kind=kind, message=message, timestamp=self._clock(), **_known(context)
            )
            routes = notifiers_for_alerts(alerts, self._providers) if alerts else self._routes
            seen: set[str] = set()
            for route in routes:
                key = route.notifier.key
                if kind not in route.kinds or key in seen:
                    continue
                seen.add(key)
                worker = self._worker(key, route.notifier.label)
                if worker is not None:
                    worker.put(route.notifier, notification)
        except Exception as exc:  # a notification must never cost the tick
            _log_event("notification not queued", level=logging.ERROR, kind=kind, error=repr(exc))

    def _worker(self, key: str, label: str) -> _Worker | None:
        with self._lock:
            if self._closed:
                return None
            worker = self._workers.get(key)
            if worker is None:
                worker = _Worker(label=label, capacity=self._queue_size)
                worker.start()
                self._workers[key] = worker
            return worker

    def flush(self, timeout: float) -> bool:
        """Wait until every queue is empty and no POST is in flight; False when time ran out."""
        deadline = time.monotonic() + timeout
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
            workers = list(self._workers.values())
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
