"""AlertProviders over real HTTP: one local receiver per service that checks the body the way that
service documents it (and refuses what it would refuse), the notifier's real POSTs, a local forward
proxy, and AlertProvider objects and Secrets read from the API stand-in through the real client.

Time bounds are generous ceilings, never expected durations.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests
from kubernetes import client

from analyzer.alerts import AlertProviderResolver
from analyzer.notify import Notifications, ProviderUnavailable, spec_context
from analyzer.payloads import ProviderType
from analyzer.telemetry import configure_logging
from perch.resources import Kube
from perch.spec import Alert, CrossNamespaceRef, parse_spec
from tests.seed import SEED_SPEC_CURRENT
from tests.standin import StandIn

HALT = "Halt podinfo.test advancement success rate 61.39% < 99%"
TOKEN = "T000/B000/XXXXSECRETXXXX"

# --- what each service accepts ------------------------------------------------------------------

Problems = list[str]


def _strings(obj: dict[str, Any], keys: tuple[str, ...], where: str, problems: Problems) -> None:
    for key in keys:
        if key in obj and not isinstance(obj[key], str):
            problems.append(f"{where}.{key} must be a string")


def check_slack(body: Any) -> Problems:
    """Slack incoming webhooks: text, blocks or attachments; legacy attachments with fields."""
    problems: Problems = []
    if not isinstance(body, dict) or not (body.get("text") or body.get("attachments")):
        return ["no_text"]
    _strings(body, ("text", "channel", "username", "icon_emoji", "icon_url"), "", problems)
    for i, att in enumerate(body.get("attachments", [])):
        _strings(
            att, ("color", "fallback", "title", "text", "footer"), f"attachments[{i}]", problems
        )
        if not att.get("fallback") and not att.get("text"):
            problems.append(f"attachments[{i}] needs fallback or text")
        for j, f in enumerate(att.get("fields", [])):
            if set(f) - {"title", "value", "short"} or not isinstance(f.get("short"), bool):
                problems.append(f"attachments[{i}].fields[{j}] is not title/value/short")
    return problems


ADAPTIVE_ELEMENTS = {"TextBlock", "FactSet", "ColumnSet", "Container", "Image", "RichTextBlock"}


def check_msteams(body: Any) -> Problems:
    """Teams incoming webhooks (Workflows): a message whose attachments are Adaptive Cards."""
    if not isinstance(body, dict) or body.get("type") != "message":
        return ["type must be message"]
    attachments = body.get("attachments")
    if not isinstance(attachments, list) or not attachments:
        return ["attachments must be a non-empty list"]
    problems: Problems = []
    for i, att in enumerate(attachments):
        if att.get("contentType") != "application/vnd.microsoft.card.adaptive":
            problems.append(f"attachments[{i}].contentType is not an Adaptive Card")
            continue
        card = att.get("content") or {}
        if card.get("type") != "AdaptiveCard" or not re.fullmatch(
            r"1\.\d", card.get("version", "")
        ):
            problems.append(f"attachments[{i}].content is not an AdaptiveCard 1.x")
        for j, element in enumerate(card.get("body", [])):
            if element.get("type") not in ADAPTIVE_ELEMENTS:
                problems.append(f"body[{j}].type {element.get('type')!r} is unknown")
            if element.get("type") == "TextBlock" and not isinstance(element.get("text"), str):
                problems.append(f"body[{j}] TextBlock without text")
            for fact in element.get("facts", []):
                if set(fact) != {"title", "value"} or not all(
                    isinstance(v, str) for v in fact.values()
                ):
                    problems.append(f"body[{j}] fact is not title/value strings")
    return problems


def check_discord(body: Any) -> Problems:
    """Discord's execute webhook: content or embeds, within Discord's limits."""
    if not isinstance(body, dict) or not (body.get("content") or body.get("embeds")):
        return ["Cannot send an empty message"]
    problems: Problems = []
    if len(body.get("content", "")) > 2000:
        problems.append("content over 2000")
    if not 1 <= len(body.get("username", "x")) <= 80:
        problems.append("username not 1-80")
    embeds = body.get("embeds", [])
    if len(embeds) > 10:
        problems.append("more than 10 embeds")
    total = 0
    for i, embed in enumerate(embeds):
        if not isinstance(embed.get("color", 0), int) or not 0 <= embed.get("color", 0) <= 0xFFFFFF:
            problems.append(f"embeds[{i}].color must be an integer colour")
        if len(embed.get("title", "")) > 256 or len(embed.get("description", "")) > 4096:
            problems.append(f"embeds[{i}] title or description too long")
        if "timestamp" in embed:
            datetime.fromisoformat(embed["timestamp"].replace("Z", "+00:00"))
        fields = embed.get("fields", [])
        if len(fields) > 25:
            problems.append(f"embeds[{i}] has more than 25 fields")
        for f in fields:
            if not f.get("name") or not f.get("value") or len(f["value"]) > 1024:
                problems.append(f"embeds[{i}] field {f.get('name')!r} is empty or too long")
            total += len(f.get("name", "")) + len(f.get("value", ""))
        total += len(embed.get("title", "")) + len(embed.get("description", ""))
    if total > 6000:
        problems.append("embeds over 6000 characters")
    if "allowed_mentions" in body and set(body["allowed_mentions"]) - {"parse", "roles", "users"}:
        problems.append("allowed_mentions has unknown keys")
    return problems


def check_rocket(body: Any) -> Problems:
    """Rocket.Chat's incoming webhook: chat.postMessage's text, alias, emoji, attachments."""
    if not isinstance(body, dict) or not (body.get("text") or body.get("attachments")):
        return ["text or attachments required"]
    problems: Problems = []
    _strings(body, ("text", "alias", "emoji", "avatar", "channel"), "", problems)
    for i, att in enumerate(body.get("attachments", [])):
        _strings(
            att, ("title", "text", "color", "ts", "author_name"), f"attachments[{i}]", problems
        )
        for f in att.get("fields", []):
            if set(f) - {"title", "value", "short"}:
                problems.append(f"attachments[{i}] field is not title/value/short")
    return problems


GCHAT_WIDGETS = {"textParagraph", "decoratedText", "image", "buttonList", "divider", "columns"}


def check_gchat(body: Any) -> Problems:
    """Google Chat's incoming webhook: a message with text and/or cardsV2."""
    if not isinstance(body, dict) or not (body.get("text") or body.get("cardsV2")):
        return ["Message cannot be empty"]
    if "cards" in body:
        return ["cards (v1) are deprecated: use cardsV2"]
    problems: Problems = []
    for i, item in enumerate(body.get("cardsV2", [])):
        if not isinstance(item.get("cardId"), str) or "card" not in item:
            problems.append(f"cardsV2[{i}] needs cardId and card")
            continue
        for section in item["card"].get("sections", []):
            for widget in section.get("widgets", []):
                if len(widget) != 1 or not set(widget) <= GCHAT_WIDGETS:
                    problems.append(f"cardsV2[{i}] widget {sorted(widget)} is not one widget")
                text = next(iter(widget.values())).get("text", "")
                if re.search(r"<(?!/?(b|i|u|s|br|font|a)\b)", text):
                    problems.append(f"cardsV2[{i}] text has a stray '<': {text!r}")
    return problems


GENERIC_KEYS = {
    "kind",
    "severity",
    "canary",
    "namespace",
    "revision",
    "phase",
    "message",
    "weight",
    "failedChecks",
    "timestamp",
}


def check_generic(body: Any) -> Problems:
    return [] if isinstance(body, dict) and set(body) == GENERIC_KEYS else ["not Perch's JSON"]


CHECKS: dict[ProviderType, Callable[[Any], Problems]] = {
    "slack": check_slack,
    "msteams": check_msteams,
    "discord": check_discord,
    "rocket": check_rocket,
    "gchat": check_gchat,
    "generic": check_generic,
}
# What each service answers a good POST with.
SUCCESS: dict[ProviderType, tuple[int, bytes]] = {
    "slack": (200, b"ok"),
    "msteams": (202, b""),
    "discord": (204, b""),
    "rocket": (200, b'{"success":true}'),
    "gchat": (200, b'{"name":"spaces/x/messages/y"}'),
    "generic": (200, b""),
}


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: Any
    problems: Problems


@dataclass
class Service:
    """A local stand-in for one service's incoming webhook: 400 with the reason for a body the
    service would refuse, its own success answer otherwise."""

    type: ProviderType
    fail_with: int | None = None
    received: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                try:
                    body = json.loads(raw)
                    problems = CHECKS[service.type](body)
                except ValueError as exc:
                    body, problems = raw, [f"not JSON: {exc}"]
                if self.headers.get("Content-Type") != "application/json":
                    problems.append("Content-Type is not application/json")
                service.received.append(Received(self.path, dict(self.headers), body, problems))
                status, answer = SUCCESS[service.type]
                if problems:
                    status, answer = 400, "; ".join(problems).encode()
                if service.fail_with:
                    status, answer = service.fail_with, b"down"
                self.send_response(status)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/{TOKEN}"

    def bodies(self) -> list[Any]:
        assert [r.problems for r in self.received] == [[] for _ in self.received]
        return [r.body for r in self.received]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class ForwardProxy:
    """An HTTP forward proxy for http:// addresses (no CONNECT): it records the absolute URL of
    each request and relays it."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                proxy.seen.append(self.path)
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if not self.path.startswith("http://"):
                    self.send_error(400, "a forward proxy takes absolute URLs")
                    return
                with requests.Session() as direct:
                    direct.trust_env = False
                    answer = direct.post(
                        self.path,
                        data=body,
                        headers={"Content-Type": self.headers["Content-Type"]},
                        timeout=10,
                    )
                self.send_response(answer.status_code)
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def services() -> Iterator[Callable[..., Service]]:
    started: list[Service] = []

    def start(type_: ProviderType, **kwargs: Any) -> Service:
        service = Service(type_, **kwargs)
        started.append(service)
        return service

    yield start
    for service in started:
        service.stop()


@pytest.fixture
def senders() -> Iterator[list[Notifications]]:
    made: list[Notifications] = []
    yield made
    for each in made:
        each.close(timeout=0)


def context() -> dict[str, Any]:
    return {
        "canary": "podinfo",
        "namespace": "test",
        "revision": "v1-3f9c2a",
        "phase": "Progressing",
        "weight": 20,
        "failed_checks": 3,
        **spec_context(parse_spec(SEED_SPEC_CURRENT)),
    }


def settings_sender(providers: dict[str, dict[str, Any]], **kwargs: Any) -> Notifications:
    return Notifications.from_env({"PERCH_ALERT_PROVIDERS": json.dumps(providers)}, **kwargs)


# --- every type, posted for real ----------------------------------------------------------------


@pytest.mark.parametrize("type_", list(CHECKS))
def test_each_service_accepts_what_its_notifier_posts(
    type_: ProviderType, services: Callable[..., Service], senders: list[Notifications]
) -> None:
    service = services(type_)
    sender = settings_sender(
        {"chat": {"type": type_, "url": service.url, "channel": "#releases", "username": "perch"}}
    )
    senders.append(sender)
    alerts = [Alert("chat", CrossNamespaceRef("chat"), "info")]
    for kind in ("started", "halted", "failed", "promoted"):
        sender.send(
            kind, HALT if kind == "halted" else f"{kind} podinfo.test", alerts=alerts, **context()
        )
    assert sender.flush(15)
    bodies = service.bodies()  # the service found nothing to refuse
    assert len(bodies) == 4
    assert all(r.path == f"/hooks/{TOKEN}" for r in service.received)
    stats = sender.stats()["alert chat"]
    assert (stats.sent, stats.failed) == (4, 0)


def test_what_each_service_shows_of_a_halt(
    services: Callable[..., Service], senders: list[Notifications]
) -> None:
    started = {t: services(t) for t in CHECKS}
    sender = settings_sender(
        {
            t: {"type": t, "url": s.url, "channel": "#rel", "username": "canary-bot"}
            for t, s in started.items()
        }
    )
    senders.append(sender)
    alerts = [Alert(t, CrossNamespaceRef(t), "warn") for t in CHECKS]
    sender.send("halted", HALT, alerts=alerts, **context())
    assert sender.flush(15)
    (slack,) = started["slack"].bodies()
    assert (slack["channel"], slack["username"]) == ("#rel", "canary-bot")
    assert slack["attachments"][0]["text"] == HALT.replace("<", "&lt;")
    (teams,) = started["msteams"].bodies()
    card = teams["attachments"][0]["content"]
    assert [e["type"] for e in card["body"]] == ["TextBlock", "TextBlock", "FactSet"]
    assert card["body"][1]["text"] == HALT
    (discord,) = started["discord"].bodies()
    assert discord["username"] == "canary-bot"
    assert discord["embeds"][0]["description"] == HALT
    (rocket,) = started["rocket"].bodies()
    assert (rocket["channel"], rocket["alias"]) == ("#rel", "canary-bot")
    assert rocket["attachments"][0]["text"] == HALT
    (gchat,) = started["gchat"].bodies()
    assert gchat["cardsV2"][0]["card"]["sections"][0]["widgets"][0]["textParagraph"]["text"] == (
        HALT.replace("<", "&lt;")
    )
    (generic,) = started["generic"].bodies()
    assert (generic["kind"], generic["message"], generic["failedChecks"]) == ("halted", HALT, 3)


def test_discords_slack_compatible_address_gets_the_slack_body(
    services: Callable[..., Service], senders: list[Notifications]
) -> None:
    # A Flagger user's habit: Discord's /slack endpoint, which takes Slack's body.
    slack_like = services("slack")
    sender = settings_sender({"d": {"type": "discord", "url": slack_like.url + "/slack"}})
    senders.append(sender)
    sender.send("failed", "Rolling back", alerts=[Alert("d", CrossNamespaceRef("d"))], **context())
    assert sender.flush(15)
    (body,) = slack_like.bodies()
    assert body["attachments"][0]["color"] == "danger"


def test_a_service_refusing_the_body_is_a_failed_notification(
    services: Callable[..., Service], senders: list[Notifications], caplog: pytest.LogCaptureFixture
) -> None:
    # The receivers are not lenient: Teams' refuses a Slack body, as Workflows do.
    teams = services("msteams")
    sender = settings_sender({"wrong": {"type": "slack", "url": teams.url}})
    senders.append(sender)
    with caplog.at_level(logging.WARNING, logger="perch.analyzer.notify"):
        sender.send("failed", "x", alerts=[Alert("wrong", CrossNamespaceRef("wrong"))], **context())
        assert sender.flush(15)
    assert sender.stats()["alert wrong"].failed == 1
    (record,) = caplog.records
    assert record.fields["error"] == "HTTP 400: type must be message"  # type: ignore[attr-defined]


# --- proxy ----------------------------------------------------------------------------------


def test_the_providers_proxy_carries_the_post(
    services: Callable[..., Service], senders: list[Notifications]
) -> None:
    service = services("gchat")
    proxy = ForwardProxy()
    try:
        sender = settings_sender(
            {"chat": {"type": "gchat", "url": service.url, "proxy": proxy.url}}
        )
        senders.append(sender)
        sender.send(
            "promoted",
            "Promotion completed!",
            alerts=[Alert("chat", CrossNamespaceRef("chat"))],
            **context(),
        )
        assert sender.flush(15)
    finally:
        proxy.stop()
    assert proxy.seen == [service.url]  # the absolute URL: it went through the proxy
    assert len(service.bodies()) == 1


def test_a_dead_proxy_fails_the_post_without_naming_it(
    services: Callable[..., Service], senders: list[Notifications], caplog: pytest.LogCaptureFixture
) -> None:
    service = services("slack")
    dead = ForwardProxy()
    dead_url = dead.url.replace("http://", "http://user:PROXYPASS@")
    dead.stop()
    sender = settings_sender({"chat": {"type": "slack", "url": service.url, "proxy": dead_url}})
    senders.append(sender)
    with caplog.at_level(logging.WARNING, logger="perch.analyzer.notify"):
        sender.send("failed", "x", alerts=[Alert("chat", CrossNamespaceRef("chat"))], **context())
        assert sender.flush(15)
    assert service.received == []  # never reached directly
    assert sender.stats()["alert chat"].failed == 1
    assert "PROXYPASS" not in caplog.text and TOKEN not in caplog.text


# --- AlertProvider objects through the API ---------------------------------------------------


def create_provider(api: client.ApiClient, namespace: str, name: str, spec: dict[str, Any]) -> None:
    client.CustomObjectsApi(api).create_namespaced_custom_object(
        "perch.dev",
        "v1alpha1",
        namespace,
        "alertproviders",
        {
            "apiVersion": "perch.dev/v1alpha1",
            "kind": "AlertProvider",
            "metadata": {"name": name},
            "spec": spec,
        },
    )


def create_secret(api: client.ApiClient, namespace: str, name: str, **data: str) -> None:
    client.CoreV1Api(api).create_namespaced_secret(
        namespace,
        {
            "metadata": {"name": name},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
        },
    )


@pytest.fixture
def debug_logging(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """The analyzer's own logging set-up at --log-level debug, captured."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    quiet = {name: logging.getLogger(name).level for name in ("urllib3", "apscheduler")}
    configure_logging("debug")
    root.addHandler(caplog.handler)
    caplog.handler.setLevel(logging.DEBUG)
    try:
        yield caplog
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, was in quiet.items():
            logging.getLogger(name).setLevel(was)


def test_alert_providers_are_read_through_the_api(
    standin: StandIn,
    services: Callable[..., Service],
    senders: list[Notifications],
    debug_logging: pytest.LogCaptureFixture,
) -> None:
    api = standin.api_client()
    client.CoreV1Api(api).create_namespace({"metadata": {"name": "ops"}})
    teams, discord, slack = (
        services("msteams"),
        services("discord"),
        services("slack", fail_with=500),
    )
    # One address in a Secret, one in another namespace, one whose receiver is down.
    create_secret(api, "test", "teams-url", address=teams.url + "\n")
    create_provider(api, "test", "teams", {"type": "msteams", "secretRef": {"name": "teams-url"}})
    create_provider(
        api, "ops", "discord", {"type": "discord", "address": discord.url, "username": "ops-bot"}
    )
    create_secret(api, "test", "slack-url", address=slack.url)
    create_provider(api, "test", "slack", {"type": "slack", "secretRef": {"name": "slack-url"}})
    create_provider(
        api, "test", "no-key", {"type": "slack", "secretRef": {"name": "teams-url-typo"}}
    )

    resolver = AlertProviderResolver(Kube(api, timeout=5.0))
    warnings: list[str] = []
    sender = Notifications(resolver=resolver)
    senders.append(sender)
    alerts = [
        Alert("teams", CrossNamespaceRef("teams"), "info"),
        Alert("discord", CrossNamespaceRef("discord", "ops"), "warn"),
        Alert("slack", CrossNamespaceRef("slack"), "error"),
        Alert("typo", CrossNamespaceRef("no-key"), "info"),
        Alert("lost", CrossNamespaceRef("nobody"), "info"),
    ]
    for kind in ("started", "halted", "failed"):
        sender.send(
            kind,
            f"{kind} podinfo.test",
            alerts=alerts,
            on_unresolved=warnings.append,
            **context(),
        )
        assert sender.flush(15)
    assert [b["attachments"][0]["content"]["body"][1]["text"] for b in teams.bodies()] == [
        "started podinfo.test",
        "halted podinfo.test",
        "failed podinfo.test",
    ]
    assert [b["embeds"][0]["description"] for b in discord.bodies()] == [
        "halted podinfo.test",
        "failed podinfo.test",
    ]
    assert all(b["username"] == "ops-bot" for b in discord.bodies())
    assert len(slack.received) == 1 and sender.stats()["alert slack"].failed == 1
    assert warnings == [
        "Alert typo not sent: Secret test/teams-url-typo of AlertProvider test/no-key not found",
        "Alert lost not sent: AlertProvider test/nobody not found",
    ]
    # No address reached the log or an event: not the Secret's, not the failing one's.
    assert "notification failed" in debug_logging.text  # the log was captured
    assert not [r for r in debug_logging.records if r.name.startswith("urllib3")]
    assert TOKEN not in debug_logging.text
    assert not any(TOKEN in w for w in warnings)
    # Read once each, then from the cache.
    gets = [c for c in standin.calls() if c.verb == "get"]
    assert len([c for c in gets if c.resource == "alertproviders"]) == 5
    assert len([c for c in gets if c.resource == "secrets"]) == 3


def test_an_edited_provider_is_read_again_after_the_ttl(standin: StandIn) -> None:
    api = standin.api_client()
    clock = [0.0]
    resolver = AlertProviderResolver(
        Kube(api, timeout=5.0), ttl=30, retry_ttl=10, clock=lambda: clock[0]
    )
    assert resolver.resolve("chat", namespace="test") is None
    create_provider(api, "test", "chat", {"type": "slack", "address": "https://a.example/1"})
    clock[0] = 5.0
    assert resolver.resolve("chat", namespace="test") is None  # the miss is kept for retry_ttl
    clock[0] = 11.0
    assert resolver.resolve("chat", namespace="test") == {
        "type": "slack",
        "url": "https://a.example/1",
    }
    custom = client.CustomObjectsApi(api)
    live = custom.get_namespaced_custom_object(
        "perch.dev", "v1alpha1", "test", "alertproviders", "chat"
    )
    live["spec"]["address"] = "https://a.example/2"
    custom.replace_namespaced_custom_object(
        "perch.dev", "v1alpha1", "test", "alertproviders", "chat", live
    )
    clock[0] = 40.0
    assert resolver.resolve("chat", namespace="test")["url"] == "https://a.example/1"  # type: ignore[index]
    clock[0] = 41.5
    assert resolver.resolve("chat", namespace="test")["url"] == "https://a.example/2"  # type: ignore[index]
    assert resolver.calls == 3


def test_an_unreachable_api_costs_the_alert_and_is_tried_again() -> None:
    dead = ForwardProxy()
    url = dead.url
    dead.stop()
    configuration = client.Configuration()
    configuration.host = url
    clock = [0.0]
    resolver = AlertProviderResolver(
        Kube(client.ApiClient(configuration), timeout=2.0), retry_ttl=10, clock=lambda: clock[0]
    )
    for moment in (0.0, 5.0, 11.0):
        clock[0] = moment
        with pytest.raises(ProviderUnavailable) as caught:
            resolver.resolve("chat", namespace="test")
        assert str(caught.value).startswith(
            "AlertProvider test/chat could not be read: cannot reach the Kubernetes API"
        )
    assert resolver.calls == 2  # not again within retry_ttl
