"""AlertProviders without a network: each service's payload, severity filtering, the spec's alerts,
AlertProvider objects read into providers, and alerts resolved off the tick's thread."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from analyzer.alerts import provider_config
from analyzer.model import NotificationKind
from analyzer.notify import (
    NOTIFIER_TYPES,
    ChatNotifier,
    Notification,
    Notifications,
    ProviderConfig,
    ProviderUnavailable,
    notifier_for,
    spec_context,
)
from analyzer.payloads import (
    ADAPTIVE_CARD_VERSION,
    DISCORD_LIMITS,
    PROVIDER_TYPES,
    discord_payload,
    facts,
    gchat_payload,
    generic_payload,
    msteams_payload,
    rocket_payload,
    slack_payload,
)
from perch.spec import Alert, CrossNamespaceRef, SpecError, parse_spec
from tests.seed import SEED_SPEC_CURRENT
from tests.validation import validate

NOW = datetime(2024, 5, 1, 12, 0, 0, 123000, tzinfo=UTC)
HALT = "Halt podinfo.test advancement success rate 61.39% < 99%"
SECRET_URL = "https://hooks.example/services/T000/B000/SECRET"
CRD = Path(__file__).resolve().parents[2] / "charts/perch/crds/alertproviders.perch.dev.yaml"


def note(kind: NotificationKind = "halted", **overrides: Any) -> Notification:
    spec = parse_spec(SEED_SPEC_CURRENT)
    values: dict[str, Any] = {
        "kind": kind,
        "message": HALT,
        "timestamp": NOW,
        "canary": "podinfo",
        "namespace": "test",
        "revision": "v1-3f9c2a",
        "weight": 20,
        "failed_checks": 3,
        **spec_context(spec),
    }
    values.update(overrides)
    return Notification(**values)


FACTS = {
    "Target": "Deployment/podinfo.test",
    "Revision": "v1-3f9c2a",
    "Canary weight": "20%",
    "Failed checks": "3",
    "Failed checks threshold": "10",
    "Progress deadline": "600s",
    "Traffic routing": "Weight step: 5 max: 50 interval: 30s",
}


# --- payloads, as each service documents them ----------------------------------------------------


def test_every_type_has_a_notifier_and_a_json_payload() -> None:
    assert set(NOTIFIER_TYPES) == set(PROVIDER_TYPES)
    for builder in (
        generic_payload,
        slack_payload,
        msteams_payload,
        discord_payload,
        rocket_payload,
        gchat_payload,
    ):
        json.dumps(builder(note()))


def test_facts_are_flaggers_with_perchs_additions_in_order() -> None:
    assert [(t, v) for t, v, _ in facts(note())] == list(FACTS.items())
    assert [t for t, _, _ in facts(note("started", revision=None, weight=None))] == [
        "Target",
        "Failed checks",
        "Failed checks threshold",
        "Progress deadline",
        "Traffic routing",
    ]


def test_msteams_is_an_adaptive_card_in_a_message() -> None:
    payload = msteams_payload(note("failed"))
    assert payload["type"] == "message"
    (attachment,) = payload["attachments"]
    assert attachment["contentType"] == "application/vnd.microsoft.card.adaptive"
    assert attachment["contentUrl"] is None
    card = attachment["content"]
    assert card["$schema"] == "http://adaptivecards.io/schemas/adaptive-card.json"
    assert (card["type"], card["version"]) == ("AdaptiveCard", ADAPTIVE_CARD_VERSION)
    title, message, fact_set = card["body"]
    assert title == {
        "type": "TextBlock",
        "text": "podinfo.test: canary analysis failed, rolled back",
        "weight": "Bolder",
        "size": "Medium",
        "color": "Attention",
        "wrap": True,
    }
    assert message == {"type": "TextBlock", "text": HALT, "wrap": True}
    assert fact_set["type"] == "FactSet"
    assert {f["title"]: f["value"] for f in fact_set["facts"]} == FACTS


@pytest.mark.parametrize(
    ("kind", "color"),
    [("started", "Accent"), ("halted", "Warning"), ("failed", "Attention"), ("promoted", "Good")],
)
def test_msteams_title_color_by_kind(kind: NotificationKind, color: str) -> None:
    assert msteams_payload(note(kind))["attachments"][0]["content"]["body"][0]["color"] == color


def test_discord_is_its_own_webhook_body_with_one_embed() -> None:
    payload = discord_payload(note("promoted"), username="release-bot")
    assert payload["username"] == "release-bot"
    assert payload["content"] == "podinfo.test: canary promoted"
    assert payload["allowed_mentions"] == {"parse": []}  # never pings @everyone
    (embed,) = payload["embeds"]
    assert embed["title"] == "podinfo.test"
    assert embed["description"] == HALT
    assert embed["color"] == 0x2EB886
    assert embed["timestamp"] == "2024-05-01T12:00:00.123Z"
    assert {f["name"]: f["value"] for f in embed["fields"]} == FACTS
    assert [f["inline"] for f in embed["fields"]][-1] is False  # traffic routing spans the row


def test_discord_limits_are_kept() -> None:
    payload = discord_payload(note(message="x" * 5000), username="u" * 100)
    assert len(payload["username"]) == DISCORD_LIMITS["username"]
    description = payload["embeds"][0]["description"]
    assert len(description) == DISCORD_LIMITS["description"]
    assert description.endswith("…")


def test_rocket_uses_rocket_chats_own_fields() -> None:
    payload = rocket_payload(note("failed"), channel="#releases", username="perch-bot")
    assert payload["alias"] == "perch-bot"
    assert payload["emoji"] == ":bird:"
    assert payload["channel"] == "#releases"
    assert payload["text"] == "podinfo.test: canary analysis failed, rolled back"
    (attachment,) = payload["attachments"]
    assert attachment["title"] == "podinfo.test"
    assert attachment["text"] == HALT  # Rocket.Chat escapes HTML itself
    assert attachment["color"] == "#A30200"
    assert attachment["ts"] == "2024-05-01T12:00:00.123Z"
    assert {f["title"]: f["value"] for f in attachment["fields"]} == FACTS
    assert "channel" not in rocket_payload(note())


def test_gchat_is_text_and_a_cards_v2_card_with_html_escaped() -> None:
    payload = gchat_payload(note("halted"))
    assert payload["text"] == "podinfo.test: canary advancement halted"
    (card,) = payload["cardsV2"]
    assert card["cardId"] == "perch-halted"
    assert card["card"]["header"] == {
        "title": "podinfo.test",
        "subtitle": "canary advancement halted",
    }
    message, details = card["card"]["sections"]
    # Card text is Google Chat's HTML subset: the "<" must not open a tag.
    assert message["widgets"] == [
        {"textParagraph": {"text": "Halt podinfo.test advancement success rate 61.39% &lt; 99%"}}
    ]
    assert details["header"] == "Details"
    got = {w["decoratedText"]["topLabel"]: w["decoratedText"]["text"] for w in details["widgets"]}
    assert got == FACTS


def test_generic_payload_is_perchs_json() -> None:
    assert generic_payload(note())["message"] == HALT
    assert generic_payload(note())["severity"] == "warn"


# --- providers into notifiers ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (
            {
                "type": "slack",
                "url": SECRET_URL,
                "channel": "#c",
                "username": "u",
                "proxy": "http://p:3128",
            },
            ChatNotifier(
                "slack",
                SECRET_URL,
                channel="#c",
                username="u",
                label="alert a",
                proxy="http://p:3128",
            ),
        ),
        (
            {"type": "msteams", "url": SECRET_URL},
            ChatNotifier("msteams", SECRET_URL, label="alert a"),
        ),
        (
            {"type": "discord", "url": SECRET_URL, "username": "u", "channel": "ignored"},
            ChatNotifier("discord", SECRET_URL, username="u", label="alert a"),
        ),
        (
            {"type": "rocket", "url": SECRET_URL, "channel": "#c"},
            ChatNotifier("rocket", SECRET_URL, channel="#c", label="alert a"),
        ),
        ({"type": "gchat", "url": SECRET_URL}, ChatNotifier("gchat", SECRET_URL, label="alert a")),
        (
            {"type": "generic", "url": SECRET_URL},
            ChatNotifier("generic", SECRET_URL, label="alert a"),
        ),
    ],
)
def test_each_type_makes_its_notifier(config: ProviderConfig, expected: object) -> None:
    assert notifier_for(config, label="alert a") == expected


def test_discord_slack_compatible_address_is_recognised() -> None:
    assert ChatNotifier("discord", "https://discord.com/api/webhooks/1/tok/slack").slack_compatible
    assert not ChatNotifier("discord", "https://discord.com/api/webhooks/1/tok").slack_compatible


def test_a_proxy_makes_another_destination() -> None:
    assert (
        ChatNotifier("slack", SECRET_URL).key
        != ChatNotifier("slack", SECRET_URL, proxy="http://p:1/").key
    )


# --- the spec's alerts ------------------------------------------------------------------------


def spec_with_alerts(alerts: str) -> str:
    return f"service: {{port: 80}}\nanalysis:\n  alerts: {alerts}\n"


def test_alerts_parse_with_flaggers_defaults() -> None:
    alerts = parse_spec(
        spec_with_alerts(
            "[{name: chat, providerRef: {name: on-call}},"
            " {name: page, severity: error, providerRef: {name: pager, namespace: ops}}]"
        )
    ).analysis.alerts
    assert alerts == (
        Alert("chat", CrossNamespaceRef("on-call"), "info"),
        Alert("page", CrossNamespaceRef("pager", "ops"), "error"),
    )


@pytest.mark.parametrize(
    ("alerts", "where"),
    [
        ("[{name: a, severity: warning, providerRef: {name: p}}]", "analysis.alerts[0].severity"),
        ("[{name: a, severity: 3, providerRef: {name: p}}]", "analysis.alerts[0].severity"),
        ("[{name: a, providerRef: {name: P_Q}}]", "analysis.alerts[0].providerRef.name"),
        (
            "[{name: a, providerRef: {name: p, namespace: Ops}}]",
            "analysis.alerts[0].providerRef.namespace",
        ),
        ("[{name: a, providerRef: {name: p, kind: Slack}}]", "analysis.alerts[0].providerRef"),
        ("[{providerRef: {name: p}}]", "analysis.alerts[0].name"),
    ],
)
def test_bad_alerts_are_refused_naming_the_field(alerts: str, where: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec(spec_with_alerts(alerts))
    assert where in str(caught.value)


# --- AlertProvider objects into providers ------------------------------------------------------


def provider(spec: dict[str, Any], name: str = "on-call") -> dict[str, Any]:
    return {
        "apiVersion": "perch.dev/v1alpha1",
        "kind": "AlertProvider",
        "metadata": {"name": name, "namespace": "test"},
        "spec": spec,
    }


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def secrets(data: dict[str, dict[str, str]]) -> Any:
    def read(name: str) -> Mapping[str, Any] | None:
        return data.get(name)

    return read


def test_address_and_options_are_read() -> None:
    config = provider_config(
        provider(
            {
                "type": "rocket",
                "address": "https://chat.example/hooks/x",
                "channel": "#releases",
                "username": "perch-bot",
                "proxy": "http://proxy.example:3128",
            }
        ),
        read_secret=secrets({}),
    )
    assert config == {
        "type": "rocket",
        "url": "https://chat.example/hooks/x",
        "channel": "#releases",
        "username": "perch-bot",
        "proxy": "http://proxy.example:3128",
    }


def test_the_secrets_address_takes_precedence_and_may_carry_the_proxy() -> None:
    config = provider_config(
        provider(
            {
                "type": "slack",
                "address": "https://ignored.example/",
                "secretRef": {"name": "slack-url"},
            }
        ),
        read_secret=secrets(
            {"slack-url": {"address": b64(SECRET_URL + "\n"), "proxy": b64("http://u:pw@p:3128")}}
        ),
    )
    assert config["url"] == SECRET_URL  # the newline `kubectl create secret --from-file` leaves
    assert config["proxy"] == "http://u:pw@p:3128"


@pytest.mark.parametrize(
    ("spec", "data", "problem"),
    [
        (
            {"type": "slack", "secretRef": {"name": "gone"}},
            {},
            "Secret test/gone of AlertProvider test/on-call not found",
        ),
        (
            {"type": "slack", "secretRef": {"name": "s"}},
            {"s": {"url": b64(SECRET_URL)}},
            "Secret test/s of AlertProvider test/on-call has no key address",
        ),
        (
            {"type": "slack", "secretRef": {"name": "s"}},
            {"s": {"address": b64("hooks.example/SECRET")}},
            "Secret test/s of AlertProvider test/on-call: the address is not an http(s) URL",
        ),
        (
            {"type": "pagerduty", "address": SECRET_URL},
            {},
            "AlertProvider test/on-call is invalid: spec.type must be one of discord, gchat",
        ),
        (
            {"type": "slack"},
            {},
            "AlertProvider test/on-call is invalid: give spec.address or spec.secretRef",
        ),
        (
            {"type": "gchat", "address": "ftp://SECRET"},
            {},
            "AlertProvider test/on-call: the address is not an http(s) URL",
        ),
        (
            {"type": "slack", "address": SECRET_URL, "proxy": "SECRET:3128"},
            {},
            "AlertProvider test/on-call: the proxy is not an http(s) URL",
        ),
    ],
)
def test_an_unusable_provider_says_which_and_why_never_the_address(
    spec: dict[str, Any], data: dict[str, dict[str, str]], problem: str
) -> None:
    with pytest.raises(ProviderUnavailable) as caught:
        provider_config(provider(spec), read_secret=secrets(data))
    assert str(caught.value).startswith(problem)
    assert "SECRET" not in str(caught.value)


def crd_spec_schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD.read_text())
    (version,) = crd["spec"]["versions"]
    return dict(version["schema"]["openAPIV3Schema"]["properties"]["spec"])


def test_the_crd_schema_takes_flaggers_fields_and_refuses_others() -> None:
    spec = crd_spec_schema()
    assert set(spec["properties"]) == {
        "type",
        "address",
        "channel",
        "username",
        "proxy",
        "secretRef",
    }
    assert spec["properties"]["type"]["enum"] == list(PROVIDER_TYPES)
    # address or secretRef: a CEL rule, which the API server checks (the cluster tier shows it).
    assert spec["x-kubernetes-validations"][0]["rule"] == "has(self.address) || has(self.secretRef)"
    for good in (
        provider({"type": "slack", "address": SECRET_URL, "channel": "#c", "username": "u"}),
        provider({"type": "msteams", "secretRef": {"name": "teams-url"}}),
        provider({"type": "generic", "address": "http://audit.example/", "proxy": "http://p:3128"}),
    ):
        validate(good)
    for bad, where in (
        (provider({"type": "pagerduty", "address": SECRET_URL}), "spec.type"),
        (provider({"type": "slack", "address": "hooks.example/x"}), "spec.address"),
        (provider({"type": "slack", "secretRef": {}}), "spec.secretRef"),
        (provider({"type": "slack", "adress": SECRET_URL}), "spec"),  # a typo is not pruned here
    ):
        with pytest.raises(AssertionError, match=f"invalid at {where}"):
            validate(bad)


# --- alerts resolved off the tick's thread --------------------------------------------------------


@dataclass
class Recorder:
    label: str
    key: str
    received: list[Notification] = field(default_factory=list)

    def post(self, notification: Notification, *, session: requests.Session) -> None:
        self.received.append(notification)


@dataclass
class FakeResolver:
    """AlertProviders by (namespace, name); a value that is an exception is raised."""

    providers: dict[tuple[str, str], ProviderConfig | Exception]
    asked: list[tuple[str, str]] = field(default_factory=list)
    gate: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.gate.set()

    def resolve(self, name: str, *, namespace: str) -> ProviderConfig | None:
        self.gate.wait(10)
        self.asked.append((namespace, name))
        found = self.providers.get((namespace, name))
        if isinstance(found, Exception):
            raise found
        return found


@pytest.fixture
def recorders(monkeypatch: pytest.MonkeyPatch) -> dict[str, Recorder]:
    """A ``test`` notifier type whose url names a Recorder."""
    made: dict[str, Recorder] = {}

    def factory(config: ProviderConfig, label: str) -> Recorder:
        return made.setdefault(config["url"], Recorder(label=label, key=config["url"]))

    monkeypatch.setitem(NOTIFIER_TYPES, "test", factory)
    return made


@pytest.fixture
def senders() -> Iterator[list[Notifications]]:
    made: list[Notifications] = []
    yield made
    for each in made:
        each.close(timeout=5)


def alert(name: str, ref: str, severity: Any = "info", namespace: str | None = None) -> Alert:
    return Alert(name, CrossNamespaceRef(ref, namespace), severity)


KINDS: tuple[NotificationKind, ...] = ("started", "halted", "failed", "promoted")


def test_severity_filters_what_each_alert_gets(
    recorders: dict[str, Recorder], senders: list[Notifications]
) -> None:
    resolver = FakeResolver(
        {
            ("test", "chat"): {"type": "test", "url": "chat"},
            ("test", "ops"): {"type": "test", "url": "ops"},
            ("test", "pager"): {"type": "test", "url": "pager"},
        }
    )
    sender = Notifications(resolver=resolver)
    senders.append(sender)
    alerts = [
        alert("chat", "chat", "info"),
        alert("ops", "ops", "warn"),
        alert("page", "pager", "error"),
    ]
    for kind in KINDS:
        sender.send(kind, kind, alerts=alerts, canary="podinfo", namespace="test")
    assert sender.flush(10)
    got = {url: [n.kind for n in r.received] for url, r in recorders.items()}
    assert got == {
        "chat": ["started", "halted", "failed", "promoted"],
        "ops": ["halted", "failed"],
        "pager": ["failed"],
    }
    # An alert is looked up only when its severity wants the kind.
    assert resolver.asked.count(("test", "pager")) == 1


def test_a_ref_with_a_namespace_is_looked_up_there(
    recorders: dict[str, Recorder], senders: list[Notifications]
) -> None:
    resolver = FakeResolver({("ops", "chat"): {"type": "test", "url": "ops-chat"}})
    sender = Notifications(resolver=resolver)
    senders.append(sender)
    sender.send("started", "go", alerts=[alert("a", "chat", namespace="ops")], namespace="test")
    assert sender.flush(10)
    assert resolver.asked == [("ops", "chat")]
    assert len(recorders["ops-chat"].received) == 1


def test_a_missing_provider_is_reported_once_and_the_others_still_get_it(
    recorders: dict[str, Recorder], senders: list[Notifications]
) -> None:
    resolver = FakeResolver(
        {
            ("test", "chat"): {"type": "test", "url": "chat"},
            ("test", "locked"): ProviderUnavailable(
                "Secret test/url of AlertProvider test/locked could not be read: Kubernetes API "
                "answered 403 Forbidden"
            ),
        }
    )
    warnings: list[str] = []
    sender = Notifications(resolver=resolver)
    senders.append(sender)
    alerts = [alert("lost", "nobody"), alert("chat", "chat"), alert("locked", "locked")]
    for _ in range(3):
        sender.send(
            "halted",
            "Halt",
            alerts=alerts,
            on_unresolved=warnings.append,
            canary="podinfo",
            namespace="test",
        )
    assert sender.flush(10)
    assert len(recorders["chat"].received) == 3
    assert warnings == [
        "Alert lost not sent: AlertProvider test/nobody not found",
        "Alert locked not sent: Secret test/url of AlertProvider test/locked could not be read: "
        "Kubernetes API answered 403 Forbidden",
    ]
    assert sender.unresolved == 6


def test_a_missing_provider_is_reported_again_after_the_quiet_period(
    recorders: dict[str, Recorder], senders: list[Notifications]
) -> None:
    clock = [0.0]
    warnings: list[str] = []
    sender = Notifications(resolver=FakeResolver({}), warn_every=60, monotonic=lambda: clock[0])
    senders.append(sender)
    for moment in (0.0, 30.0, 61.0):
        clock[0] = moment
        sender.send(
            "failed",
            "x",
            alerts=[alert("lost", "nobody")],
            on_unresolved=warnings.append,
            canary="podinfo",
            namespace="test",
        )
        assert sender.flush(10)
    assert len(warnings) == 2


def test_the_settings_providers_serve_a_name_no_alert_provider_has(
    recorders: dict[str, Recorder], senders: list[Notifications]
) -> None:
    resolver = FakeResolver({("test", "chat"): {"type": "test", "url": "object"}})
    sender = Notifications(
        resolver=resolver,
        providers={
            "chat": {"type": "test", "url": "settings"},
            "audit": {"type": "test", "url": "audit"},
        },
    )
    senders.append(sender)
    sender.send("failed", "x", alerts=[alert("a", "chat"), alert("b", "audit")], namespace="test")
    assert sender.flush(10)
    # The AlertProvider object wins over the settings' entry of the same name.
    assert sorted(recorders) == ["audit", "object"]


def test_an_invalid_provider_and_a_broken_resolver_cost_only_their_alert(
    recorders: dict[str, Recorder], senders: list[Notifications]
) -> None:
    resolver = FakeResolver(
        {
            ("test", "odd"): {"type": "pagerduty", "url": SECRET_URL},
            ("test", "boom"): RuntimeError("resolver bug " + SECRET_URL),
            ("test", "chat"): {"type": "test", "url": "chat"},
        }
    )
    warnings: list[str] = []
    sender = Notifications(resolver=resolver)
    senders.append(sender)
    alerts = [alert("odd", "odd"), alert("boom", "boom"), alert("chat", "chat")]
    sender.send("failed", "x", alerts=alerts, on_unresolved=warnings.append, namespace="test")
    assert sender.flush(10)
    assert len(recorders["chat"].received) == 1
    assert warnings == [
        "Alert odd not sent: AlertProvider test/odd is invalid: unknown notifier type 'pagerduty' "
        "(known: discord, gchat, generic, msteams, rocket, slack, test)",
        "Alert boom not sent: AlertProvider test/boom could not be read: RuntimeError",
    ]
    assert not any("SECRET" in w for w in warnings)


def test_looking_providers_up_never_holds_the_tick(
    recorders: dict[str, Recorder], senders: list[Notifications]
) -> None:
    resolver = FakeResolver({("test", "chat"): {"type": "test", "url": "chat"}})
    resolver.gate.clear()  # the API server hangs
    sender = Notifications(resolver=resolver)
    senders.append(sender)
    started = time.monotonic()
    for _ in range(5):
        sender.send("halted", "x", alerts=[alert("chat", "chat")], namespace="test")
    assert time.monotonic() - started < 1.0
    assert not sender.flush(0.2)
    resolver.gate.set()
    assert sender.flush(10)
    assert len(recorders["chat"].received) == 5


def test_an_unresolved_callback_that_fails_is_logged_not_raised(
    recorders: dict[str, Recorder], senders: list[Notifications], caplog: pytest.LogCaptureFixture
) -> None:
    def broken(message: str) -> None:
        raise RuntimeError("events API down")

    sender = Notifications(resolver=FakeResolver({}))
    senders.append(sender)
    with caplog.at_level("WARNING", logger="perch.analyzer.notify"):
        sender.send(
            "failed",
            "x",
            alerts=[alert("lost", "nobody")],
            on_unresolved=broken,
            canary="podinfo",
            namespace="test",
        )
        assert sender.flush(10)
    assert [r.getMessage() for r in caplog.records] == [
        "alert warning not recorded",
        "Alert lost not sent: AlertProvider test/nobody not found",
    ]
