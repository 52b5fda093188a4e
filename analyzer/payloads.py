"""What a notification says, in the shape each service documents for its incoming webhooks.

Pure: no I/O. :mod:`analyzer.notify` posts these. One builder per AlertProvider type:

- ``slack``: Slack's incoming-webhook message, ``text`` plus one legacy ``attachments`` entry with
  ``fields`` (Flagger's layout), ``channel`` and ``username`` when set.
- ``msteams``: a ``message`` whose one attachment is an Adaptive Card
  (``application/vnd.microsoft.card.adaptive``). Teams' Workflows webhooks take only Adaptive Cards,
  and the retiring Office 365 connectors take them too; Flagger's MessageCard is refused by the
  former.
- ``discord``: Discord's own execute-webhook body, ``content`` plus one embed with fields, and
  ``allowed_mentions`` empty so that no message can ping ``@everyone``. An address that ends in
  ``/slack`` (Discord's Slack-compatible endpoint, which Flagger uses) gets the Slack body instead.
- ``rocket``: Rocket.Chat's message (``alias``, ``emoji``, ``channel``, ``text``, ``attachments``
  with ``fields``), which its incoming webhooks take as chat.postMessage does.
- ``gchat``: Google Chat's message, ``text`` plus a ``cardsV2`` card with the facts.
- ``generic``: Perch's own JSON (:class:`GenericPayload`).

Every builder carries the same facts (target, revision, weight, failed checks and threshold,
progress deadline, traffic routing) and a colour per kind. Each service's own escaping is applied:
Slack's ``&<>`` entities, HTML escaping inside Google Chat cards, Discord's length limits.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, Literal, NotRequired, TypedDict

from analyzer.model import NotificationKind
from perch.spec import Severity
from perch.status import Phase

__all__ = [
    "KIND_SEVERITY",
    "PROVIDER_TYPES",
    "DiscordPayload",
    "GChatPayload",
    "GenericPayload",
    "MSTeamsPayload",
    "Notification",
    "NotificationContext",
    "ProviderType",
    "RocketPayload",
    "SlackPayload",
    "discord_payload",
    "facts",
    "gchat_payload",
    "generic_payload",
    "headline",
    "msteams_payload",
    "rocket_payload",
    "slack_payload",
]

ProviderType = Literal["slack", "msteams", "discord", "rocket", "gchat", "generic"]
PROVIDER_TYPES: Final[tuple[ProviderType, ...]] = (
    "slack",
    "msteams",
    "discord",
    "rocket",
    "gchat",
    "generic",
)

KIND_SEVERITY: Final[Mapping[NotificationKind, Severity]] = {
    "started": "info",
    "halted": "warn",
    "failed": "error",
    "promoted": "info",
}


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


def _timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


_HEADLINES: Final[Mapping[NotificationKind, str]] = {
    "started": "canary analysis started",
    "halted": "canary advancement halted",
    "failed": "canary analysis failed, rolled back",
    "promoted": "canary promoted",
}
# One colour per kind for the services that take a colour (Slack's own names are below).
_COLORS: Final[Mapping[NotificationKind, str]] = {
    "started": "#439FE0",
    "halted": "#DAA038",
    "failed": "#A30200",
    "promoted": "#2EB886",
}


def headline(notification: Notification) -> str:
    """``podinfo.test: canary promoted``: what a phone notification shows."""
    return f"{notification.title}: {_HEADLINES[notification.kind]}"


def facts(notification: Notification) -> list[tuple[str, str, bool]]:
    """(title, value, short) for each known fact, in Flagger's order with Perch's additions."""
    n = notification
    found: list[tuple[str, str, bool]] = [("Target", f"Deployment/{n.title}", True)]
    if n.revision:
        found.append(("Revision", n.revision, True))
    if n.weight is not None:
        found.append(("Canary weight", f"{n.weight}%", True))
    if n.failed_checks is not None:
        found.append(("Failed checks", str(n.failed_checks), True))
    if n.threshold is not None:
        found.append(("Failed checks threshold", str(n.threshold), True))
    if n.progress_deadline_seconds is not None:
        found.append(("Progress deadline", f"{n.progress_deadline_seconds}s", True))
    if n.traffic_routing:
        found.append(("Traffic routing", n.traffic_routing, False))
    return found


# --- generic ------------------------------------------------------------------------------------


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


# --- Slack --------------------------------------------------------------------------------------


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


def _slack_escape(text: str) -> str:
    # Slack reads <...> as links and mentions: "success rate 61.39% < 99%" would lose its tail.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_payload(
    notification: Notification, *, channel: str | None = None, username: str = "perch"
) -> SlackPayload:
    """Flagger's layout: one attachment titled ``podinfo.test``, colored by kind, with fields."""
    n = notification
    fields: list[SlackField] = [
        {"title": title, "value": _slack_escape(value), "short": short}
        for title, value, short in facts(n)
    ]
    payload: SlackPayload = {
        "username": username,
        "icon_emoji": ":bird:",
        "text": _slack_escape(headline(n)),
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


# --- Microsoft Teams: an Adaptive Card ----------------------------------------------------------


AdaptiveColor = Literal["Accent", "Good", "Warning", "Attention"]


class AdaptiveFact(TypedDict):
    title: str
    value: str


class AdaptiveElement(TypedDict, total=False):
    type: Literal["TextBlock", "FactSet"]
    text: str
    wrap: bool
    weight: Literal["Bolder"]
    size: Literal["Medium"]
    color: AdaptiveColor
    facts: list[AdaptiveFact]


AdaptiveCard = TypedDict(
    "AdaptiveCard",
    {
        "$schema": str,
        "type": Literal["AdaptiveCard"],
        "version": str,
        "body": list[AdaptiveElement],
        "msteams": dict[str, str],
    },
)


class MSTeamsAttachment(TypedDict):
    contentType: Literal["application/vnd.microsoft.card.adaptive"]
    contentUrl: None
    content: AdaptiveCard


class MSTeamsPayload(TypedDict):
    type: Literal["message"]
    attachments: list[MSTeamsAttachment]


ADAPTIVE_CARD_VERSION: Final = "1.4"
_TEAMS_COLORS: Final[Mapping[NotificationKind, AdaptiveColor]] = {
    "started": "Accent",
    "halted": "Warning",
    "failed": "Attention",
    "promoted": "Good",
}


def msteams_payload(notification: Notification) -> MSTeamsPayload:
    n = notification
    body: list[AdaptiveElement] = [
        {
            "type": "TextBlock",
            "text": headline(n),
            "weight": "Bolder",
            "size": "Medium",
            "color": _TEAMS_COLORS[n.kind],
            "wrap": True,
        },
        {"type": "TextBlock", "text": n.message, "wrap": True},
        {
            "type": "FactSet",
            "facts": [{"title": title, "value": value} for title, value, _ in facts(n)],
        },
    ]
    return {
        "type": "message",
        "attachments": [
            {
                "contentType": "application/vnd.microsoft.card.adaptive",
                "contentUrl": None,
                "content": {
                    "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
                    "type": "AdaptiveCard",
                    "version": ADAPTIVE_CARD_VERSION,
                    "body": body,
                    "msteams": {"width": "Full"},
                },
            }
        ],
    }


# --- Discord ------------------------------------------------------------------------------------


class DiscordField(TypedDict):
    name: str
    value: str
    inline: bool


class DiscordEmbed(TypedDict):
    title: str
    description: str
    color: int
    fields: list[DiscordField]
    footer: dict[str, str]
    timestamp: str


class DiscordMentions(TypedDict):
    parse: list[str]


class DiscordPayload(TypedDict):
    username: str
    content: str
    embeds: list[DiscordEmbed]
    allowed_mentions: DiscordMentions


# Discord refuses a message past these (its execute-webhook and embed limits).
DISCORD_LIMITS: Final = {
    "username": 80,
    "content": 2000,
    "title": 256,
    "description": 4096,
    "field_name": 256,
    "field_value": 1024,
    "fields": 25,
}


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def discord_payload(notification: Notification, *, username: str = "perch") -> DiscordPayload:
    n = notification
    fields: list[DiscordField] = [
        {
            "name": _cut(title, DISCORD_LIMITS["field_name"]),
            "value": _cut(value, DISCORD_LIMITS["field_value"]),
            "inline": short,
        }
        for title, value, short in facts(n)[: DISCORD_LIMITS["fields"]]
    ]
    return {
        "username": _cut(username, DISCORD_LIMITS["username"]),
        "content": _cut(headline(n), DISCORD_LIMITS["content"]),
        "embeds": [
            {
                "title": _cut(n.title, DISCORD_LIMITS["title"]),
                "description": _cut(n.message, DISCORD_LIMITS["description"]),
                "color": int(_COLORS[n.kind].lstrip("#"), 16),
                "fields": fields,
                "footer": {"text": "perch"},
                "timestamp": _timestamp(n.timestamp),
            }
        ],
        # A message is never a ping: no @everyone, @here, user or role mention is honoured.
        "allowed_mentions": {"parse": []},
    }


# --- Rocket.Chat --------------------------------------------------------------------------------


class RocketField(TypedDict):
    title: str
    value: str
    short: bool


class RocketAttachment(TypedDict):
    title: str
    text: str
    color: str
    ts: str
    fields: list[RocketField]


class RocketPayload(TypedDict):
    alias: str
    emoji: str
    text: str
    attachments: list[RocketAttachment]
    channel: NotRequired[str]


def rocket_payload(
    notification: Notification, *, channel: str | None = None, username: str = "perch"
) -> RocketPayload:
    n = notification
    payload: RocketPayload = {
        "alias": username,
        "emoji": ":bird:",
        "text": headline(n),
        "attachments": [
            {
                "title": n.title,
                "text": n.message,
                "color": _COLORS[n.kind],
                "ts": _timestamp(n.timestamp),
                "fields": [
                    {"title": title, "value": value, "short": short}
                    for title, value, short in facts(n)
                ],
            }
        ],
    }
    if channel:
        payload["channel"] = channel
    return payload


# --- Google Chat --------------------------------------------------------------------------------


class GChatWidget(TypedDict, total=False):
    textParagraph: dict[str, str]
    decoratedText: dict[str, str | bool]


class GChatSection(TypedDict, total=False):
    header: str
    widgets: list[GChatWidget]


class GChatCard(TypedDict):
    header: dict[str, str]
    sections: list[GChatSection]


class GChatCardV2(TypedDict):
    cardId: str
    card: GChatCard


class GChatPayload(TypedDict):
    text: str
    cardsV2: list[GChatCardV2]


def _gchat_escape(text: str) -> str:
    # Card text is Google Chat's HTML subset: "61.39% < 99%" must not open a tag.
    return html.escape(text, quote=False)


def gchat_payload(notification: Notification) -> GChatPayload:
    n = notification
    details: list[GChatWidget] = [
        {"decoratedText": {"topLabel": title, "text": _gchat_escape(value), "wrapText": True}}
        for title, value, _ in facts(n)
    ]
    return {
        "text": headline(n),
        "cardsV2": [
            {
                "cardId": f"perch-{n.kind}",
                "card": {
                    "header": {"title": n.title, "subtitle": _HEADLINES[n.kind]},
                    "sections": [
                        {"widgets": [{"textParagraph": {"text": _gchat_escape(n.message)}}]},
                        {"header": "Details", "widgets": details},
                    ],
                },
            }
        ],
    }
