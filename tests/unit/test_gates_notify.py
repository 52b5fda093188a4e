"""Gates and notifications without a network: payloads, decisions, configuration, the queues."""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, get_args

import pytest
import requests

from analyzer.gates import (
    CONFIRM_TYPES,
    WebhookGate,
    approved,
    backoff_seconds,
    confirm_state,
    event_payload,
    run_gates,
    webhook_payload,
)
from analyzer.model import GateResult, NotificationKind
from analyzer.notify import (
    KIND_SEVERITY,
    NOTIFIER_TYPES,
    ChatNotifier,
    Notification,
    Notifications,
    NotifyError,
    Route,
    generic_payload,
    kinds_for,
    notifier_for,
    notifiers_for_alerts,
    notifiers_from_settings,
    providers_from_settings,
    slack_payload,
    spec_context,
    traffic_routing,
)
from perch.spec import Alert, CrossNamespaceRef, FrozenDict, Webhook, WebhookType, parse_spec
from tests.seed import SEED_SPEC_CURRENT, SEED_SPEC_EARLY

NOW = datetime(2024, 5, 1, 12, 0, 0, 123000, tzinfo=UTC)
CMD = "hey -z 1m -q 10 -c 2 http://podinfo.test:9898/"


def hook(**overrides: Any) -> Webhook:
    values: dict[str, Any] = {
        "name": "load-test",
        "url": "http://flagger-loadtester.test/",
        "metadata": FrozenDict({"cmd": CMD}),
    }
    values.update(overrides)
    return Webhook(**values)


# --- gate payloads ------------------------------------------------------------------------------


def test_webhook_payload_is_flaggers_with_metadata_verbatim() -> None:
    payload = webhook_payload(
        hook(), name="podinfo", namespace="test", phase="Progressing", checksum="v1-abc"
    )
    assert payload == {
        "name": "podinfo",
        "namespace": "test",
        "phase": "Progressing",
        "checksum": "v1-abc",
        "metadata": {"cmd": CMD},
    }


def test_webhook_payload_without_metadata_sends_an_empty_object() -> None:
    payload = webhook_payload(
        hook(metadata=FrozenDict()), name="podinfo", namespace="test", phase="Waiting", checksum=""
    )
    assert payload["metadata"] == {}


def test_seed_webhook_payload_carries_the_load_test_command() -> None:
    (load_test,) = parse_spec(SEED_SPEC_EARLY).analysis.webhooks
    payload = webhook_payload(
        load_test, name="podinfo", namespace="test", phase="Progressing", checksum="v1-abc"
    )
    assert payload["metadata"]["cmd"] == CMD


def test_event_payload_merges_hook_metadata_and_event_keys_win() -> None:
    events = hook(type="event", metadata=FrozenDict({"team": "web", "eventType": "from-the-spec"}))
    payload = event_payload(
        events,
        name="podinfo",
        namespace="test",
        phase="Progressing",
        checksum="v1-abc",
        message="Advance podinfo.test canary weight 10",
        event_type="Normal",
        now=NOW,
    )
    assert payload == {
        "name": "podinfo",
        "namespace": "test",
        "phase": "Progressing",
        "checksum": "v1-abc",
        "metadata": {
            "team": "web",
            "eventMessage": "Advance podinfo.test canary weight 10",
            "eventType": "Normal",
            "timestamp": str(int(NOW.timestamp() * 1000)),
        },
    }


# --- confirm gates ------------------------------------------------------------------------------


def test_confirm_types_are_the_three_flagger_confirm_hooks() -> None:
    expected = {"confirm-rollout", "confirm-traffic-increase", "confirm-promotion"}
    assert expected == CONFIRM_TYPES
    assert CONFIRM_TYPES.issubset(get_args(WebhookType))


ASKED = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("elapsed", "max_wait", "on_timeout", "expected"),
    [
        (10_000, None, "abort", "waiting"),  # no max wait: Flagger waits for ever
        (59, 60, "abort", "waiting"),
        (60, 60, "abort", "abort"),
        (61, 60, "proceed", "proceed"),
        (3600, 60, "wait", "waiting"),
        (-5, 60, "abort", "waiting"),  # a clock that went back is not a timeout
    ],
)
def test_confirm_state(
    elapsed: float, max_wait: float | None, on_timeout: Any, expected: str
) -> None:
    state = confirm_state(
        first_asked_at=ASKED,
        now=ASKED + timedelta(seconds=elapsed),
        max_wait_seconds=max_wait,
        on_timeout=on_timeout,
    )
    assert state == expected


def test_approved_needs_every_confirm_gate_to_pass() -> None:
    ok = GateResult("a", "confirm-rollout", "pass", "HTTP 200")
    not_yet = GateResult("b", "confirm-rollout", "fail", "HTTP 403")
    down = GateResult("c", "confirm-rollout", "error", "connection failed: Connection refused")
    assert approved([ok])
    assert approved([])
    assert not approved([ok, not_yet])
    assert not approved([ok, down])


# --- WebhookGate against a fake session -----------------------------------------------------------


def response(status: int, body: bytes = b"", reason: str = "") -> requests.Response:
    answer = requests.Response()
    answer.status_code = status
    answer.reason = reason
    answer.raw = io.BytesIO(body)
    return answer


@dataclass
class FakeSession:
    """Answers each post() with the next item: a Response, or an exception to raise."""

    answers: list[requests.Response | Exception]
    calls: list[dict[str, Any]] = field(default_factory=list)

    def post(self, url: str, **kwargs: Any) -> requests.Response:
        self.calls.append({"url": url, **kwargs})
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


def gate(session: FakeSession, **overrides: Any) -> tuple[WebhookGate, list[float]]:
    pauses: list[float] = []
    return WebhookGate(hook(**overrides), session, sleep=pauses.append), pauses  # type: ignore[arg-type]


def check(the_gate: WebhookGate) -> GateResult:
    return the_gate.check(
        webhook_payload(
            the_gate.hook, name="podinfo", namespace="test", phase="Progressing", checksum="v1"
        )
    )


def test_2xx_passes_and_the_request_is_flaggers() -> None:
    session = FakeSession([response(202)])
    result = check(gate(session, disable_tls=True)[0])
    assert result == GateResult("load-test", "rollout", "pass", "HTTP 202")
    (call,) = session.calls
    assert call["headers"] == {"Content-Type": "application/json"}
    assert call["verify"] is False


@pytest.mark.parametrize("status", [199, 300, 400, 404, 500])
def test_non_2xx_fails_with_status_and_an_excerpt(status: int) -> None:
    body = b"error:   command failed\n" + b"x" * 5000
    result = check(gate(FakeSession([response(status, body, "Oops")]))[0])
    assert result.outcome == "fail"
    assert result.message.startswith(f"HTTP {status} Oops: error: command failed x")
    assert len(result.message) < 260


@pytest.mark.parametrize(
    ("exc", "outcome"),
    [
        (requests.exceptions.ReadTimeout("slow"), "timeout"),
        (requests.exceptions.ConnectTimeout("slow"), "timeout"),
        (requests.exceptions.ConnectionError("refused"), "error"),
        (requests.exceptions.SSLError("bad cert"), "error"),
        (requests.exceptions.InvalidSchema("ftp"), "error"),
    ],
)
def test_transport_failures_map_to_outcomes(exc: Exception, outcome: str) -> None:
    assert check(gate(FakeSession([exc]))[0]).outcome == outcome


def test_retries_on_5xx_then_passes_with_backoff() -> None:
    session = FakeSession([response(503), response(502), response(200)])
    the_gate, pauses = gate(session, retries=3)
    result = check(the_gate)
    assert result.outcome == "pass"
    assert result.message == "HTTP 200 (after 3 attempts)"
    assert pauses == [backoff_seconds(0), backoff_seconds(1)]


def test_retries_stop_at_the_limit() -> None:
    session = FakeSession([requests.exceptions.ConnectionError("refused")])
    the_gate, pauses = gate(session, retries=2)
    result = check(the_gate)
    assert result.outcome == "error"
    assert "after 3 attempts" in result.message
    assert len(session.calls) == 3
    assert len(pauses) == 2


@pytest.mark.parametrize(
    "answer",
    [response(400), response(403), response(501), requests.exceptions.SSLError("bad cert")],
)
def test_no_retry_where_flagger_does_not_retry(answer: Any) -> None:
    session = FakeSession([answer])
    check(gate(session, retries=3)[0])
    assert len(session.calls) == 1


def test_429_is_retried() -> None:
    session = FakeSession([response(429), response(200)])
    assert check(gate(session, retries=1)[0]).outcome == "pass"


def test_backoff_is_short_and_capped() -> None:
    assert [backoff_seconds(n) for n in range(5)] == [0.5, 1.0, 2.0, 2.0, 2.0]


def test_max_seconds_covers_every_attempt_and_pause() -> None:
    the_gate, _ = gate(FakeSession([response(200)]), timeout_seconds=5.0, retries=2)
    assert the_gate.max_seconds() == 3 * 5.0 + backoff_seconds(0) + backoff_seconds(1)


def test_run_gates_without_webhooks_does_nothing() -> None:
    assert run_gates((), name="podinfo", namespace="test", phase="Progressing", checksum="") == ()


# --- notification payloads ----------------------------------------------------------------------


def note(kind: NotificationKind = "failed", **overrides: Any) -> Notification:
    values: dict[str, Any] = {
        "kind": kind,
        "message": "Halt podinfo.test advancement success rate 61.39% < 99%",
        "timestamp": NOW,
        "canary": "podinfo",
        "namespace": "test",
    }
    values.update(overrides)
    return Notification(**values)


@pytest.mark.parametrize(
    ("severity", "kinds"),
    [
        ("info", {"started", "halted", "failed", "promoted"}),
        ("warn", {"halted", "failed"}),
        ("error", {"failed"}),
    ],
)
def test_severity_filters_kinds(severity: Any, kinds: set[str]) -> None:
    assert kinds_for(severity) == kinds


def test_kind_severity_is_flaggers() -> None:
    assert KIND_SEVERITY == {
        "started": "info",
        "promoted": "info",
        "halted": "warn",
        "failed": "error",
    }


def test_generic_payload_has_every_documented_key() -> None:
    payload = generic_payload(note(revision="v1-abc", phase="Failed", weight=0, failed_checks=10))
    assert payload == {
        "kind": "failed",
        "severity": "error",
        "canary": "podinfo",
        "namespace": "test",
        "revision": "v1-abc",
        "phase": "Failed",
        "message": "Halt podinfo.test advancement success rate 61.39% < 99%",
        "weight": 0,
        "failedChecks": 10,
        "timestamp": "2024-05-01T12:00:00.123Z",
    }


def test_generic_payload_unknowns_are_null() -> None:
    payload = generic_payload(note("started"))
    assert payload["revision"] is None
    assert payload["weight"] is None
    assert payload["failedChecks"] is None


@pytest.mark.parametrize(
    ("kind", "color"),
    [("started", "#439FE0"), ("halted", "warning"), ("failed", "danger"), ("promoted", "good")],
)
def test_slack_color_by_kind(kind: NotificationKind, color: str) -> None:
    assert slack_payload(note(kind))["attachments"][0]["color"] == color


def test_slack_payload_is_flagger_like_and_escaped() -> None:
    spec = parse_spec(SEED_SPEC_CURRENT)
    payload = slack_payload(
        note(revision="v1-abc", weight=20, failed_checks=3, **spec_context(spec)),
        channel="#deploys",
    )
    assert payload["channel"] == "#deploys"
    assert payload["username"] == "perch"
    assert payload["text"] == "podinfo.test: canary analysis failed, rolled back"
    (attachment,) = payload["attachments"]
    assert attachment["title"] == "podinfo.test"
    # "<" would start a Slack link and swallow the rest of the message.
    assert attachment["text"] == "Halt podinfo.test advancement success rate 61.39% &lt; 99%"
    fields = {item["title"]: item["value"] for item in attachment["fields"]}
    assert fields == {
        "Target": "Deployment/podinfo.test",
        "Revision": "v1-abc",
        "Canary weight": "20%",
        "Failed checks": "3",
        "Failed checks threshold": "10",
        "Progress deadline": "600s",
        "Traffic routing": "Weight step: 5 max: 50 interval: 30s",
    }


def test_slack_payload_without_channel_leaves_the_webhook_default() -> None:
    assert "channel" not in slack_payload(note())


def test_traffic_routing_for_step_weights() -> None:
    spec = parse_spec("service: {port: 80}\nanalysis: {stepWeights: [10, 20, 50]}")
    assert traffic_routing(spec.analysis) == "Weight steps: 10,20,50 max: 50"


# --- configuration ------------------------------------------------------------------------------


SLACK = "https://hooks.slack.com/services/T000/B000/SECRET"


def test_settings_without_urls_configure_nothing() -> None:
    assert notifiers_from_settings({}) == ()
    assert providers_from_settings({}) == {}


def test_settings_configure_slack_and_generic_for_every_kind() -> None:
    routes = notifiers_from_settings(
        {
            "PERCH_SLACK_URL": SLACK,
            "PERCH_SLACK_CHANNEL": "#deploys",
            "PERCH_NOTIFY_URL": "http://audit.example/perch",
        }
    )
    assert [route.notifier for route in routes] == [
        ChatNotifier("slack", SLACK, channel="#deploys"),
        ChatNotifier("generic", "http://audit.example/perch"),
    ]
    assert all(route.kinds == {"started", "halted", "failed", "promoted"} for route in routes)


def test_a_bad_url_is_refused_without_echoing_it() -> None:
    with pytest.raises(ValueError, match="PERCH_SLACK_URL") as caught:
        notifiers_from_settings({"PERCH_SLACK_URL": "hooks.slack.com/services/SECRET"})
    assert "SECRET" not in str(caught.value)


def test_providers_parse() -> None:
    text = json.dumps(
        {
            "on-call": {"type": "slack", "url": SLACK, "channel": "#on-call", "timeout": 2},
            "audit": {"type": "generic", "url": "http://audit.example/"},
        }
    )
    providers = providers_from_settings({"PERCH_ALERT_PROVIDERS": text})
    assert providers == {
        "on-call": {"type": "slack", "url": SLACK, "channel": "#on-call", "timeout": 2.0},
        "audit": {"type": "generic", "url": "http://audit.example/"},
    }


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("{not json", "not JSON"),
        ("[]", "JSON object"),
        ('{"x": "slack"}', r"\['x'\] must be an object"),
        ('{"x": {"type": "teams", "url": "http://a/"}}', r"\['x'\].type must be one of"),
        ('{"x": {"type": "slack"}}', r"\['x'\].url must be a string"),
        ('{"x": {"type": "slack", "url": "ftp://a/"}}', r"\['x'\].url is not"),
        ('{"x": {"type": "slack", "url": "http://a/", "timeout": 0}}', "timeout must be"),
        ('{"x": {"type": "slack", "url": "http://a/", "channel": 5}}', "channel must be"),
    ],
)
def test_bad_providers_are_refused(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        providers_from_settings({"PERCH_ALERT_PROVIDERS": text})


def alert(name: str, provider: str, severity: Any = "info", namespace: str | None = None) -> Alert:
    return Alert(name, CrossNamespaceRef(provider, namespace), severity)


def test_alerts_resolve_providers_and_filter_by_severity(caplog: pytest.LogCaptureFixture) -> None:
    providers = {
        "on-call": {"type": "slack", "url": SLACK},
        "ops/audit": {"type": "generic", "url": "http://audit.example/"},
    }
    with caplog.at_level(logging.WARNING, logger="perch.analyzer.notify"):
        routes = notifiers_for_alerts(
            [
                alert("page", "on-call", "error"),
                alert("audit", "audit", "warn", namespace="ops"),
                alert("lost", "nobody"),
            ],
            providers,  # type: ignore[arg-type]
        )
    assert [(route.notifier.label, route.kinds) for route in routes] == [
        ("alert page", {"failed"}),
        ("alert audit", {"halted", "failed"}),
    ]
    (record,) = caplog.records
    assert record.getMessage() == "alert provider not configured"
    assert record.fields["alert"] == "lost"  # type: ignore[attr-defined]


def test_unknown_notifier_type() -> None:
    with pytest.raises(ValueError, match="unknown notifier type 'teams'"):
        notifier_for({"type": "teams", "url": "http://a/"}, label="x")


# --- Notifications: fan-out and the queues ------------------------------------------------------------


@dataclass
class Recorder:
    """A notifier that remembers what it got; ``gate`` holds every post until it is set."""

    label: str = "recorder"
    key: str = "recorder"
    fail: bool = False
    received: list[Notification] = field(default_factory=list)
    gate: threading.Event = field(default_factory=threading.Event)
    started: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.gate.set()

    def post(self, notification: Notification, *, session: requests.Session) -> None:
        self.started.set()
        self.gate.wait(10)
        if self.fail:
            raise NotifyError("HTTP 500: down")
        self.received.append(notification)


@pytest.fixture
def notifications() -> Iterator[list[Notifications]]:
    made: list[Notifications] = []
    yield made
    for each in made:
        each.close(timeout=5)


def test_send_fans_out_by_kind(notifications: list[Notifications]) -> None:
    everything = Recorder(label="all", key="all")
    failures = Recorder(label="failures", key="failures")
    sender = Notifications(
        [Route(everything), Route(failures, kinds_for("error"))], clock=lambda: NOW
    )
    notifications.append(sender)
    sender.send("started", "New revision detected", canary="podinfo", namespace="test")
    sender.send("failed", "Rolling back", canary="podinfo", namespace="test", failed_checks=10)
    assert sender.flush(10)
    assert [n.kind for n in everything.received] == ["started", "failed"]
    assert [n.kind for n in failures.received] == ["failed"]
    assert failures.received[0] == Notification(
        kind="failed",
        message="Rolling back",
        timestamp=NOW,
        canary="podinfo",
        namespace="test",
        failed_checks=10,
    )
    assert sender.stats()["all"].sent == 2


def test_alerts_replace_the_settings_notifiers(
    notifications: list[Notifications], monkeypatch: pytest.MonkeyPatch
) -> None:
    default = Recorder(label="default", key="default")
    paged = Recorder(label="alert page", key="page")
    monkeypatch.setitem(NOTIFIER_TYPES, "test", lambda config, label: paged)
    sender = Notifications([Route(default)], providers={"pager": {"type": "test", "url": "x"}})
    notifications.append(sender)
    sender.send("failed", "Rolling back", alerts=[alert("page", "pager", "error")])
    sender.send("started", "New revision", alerts=[alert("page", "pager", "error")])
    assert sender.flush(10)
    assert [n.kind for n in paged.received] == ["failed"]
    assert default.received == []


def test_one_destination_gets_one_copy(notifications: list[Notifications]) -> None:
    first = Recorder(label="a", key="same")
    second = Recorder(label="b", key="same")
    sender = Notifications([Route(first), Route(second)])
    notifications.append(sender)
    sender.send("promoted", "Promotion completed!")
    assert sender.flush(10)
    assert len(first.received) + len(second.received) == 1


def test_a_full_queue_drops_the_oldest(
    notifications: list[Notifications], caplog: pytest.LogCaptureFixture
) -> None:
    slow = Recorder()
    slow.gate.clear()
    sender = Notifications([Route(slow)], queue_size=2)
    notifications.append(sender)
    sender.send("started", "in flight")
    assert slow.started.wait(10)  # the first one is out of the queue, held in post()
    with caplog.at_level(logging.WARNING, logger="perch.analyzer.notify"):
        for text in ("oldest", "middle", "newest"):
            sender.send("halted", text)
    slow.gate.set()
    assert sender.flush(10)
    assert [n.message for n in slow.received] == ["in flight", "middle", "newest"]
    assert sender.stats()["recorder"].dropped == 1
    assert [r.getMessage() for r in caplog.records] == ["notification dropped: queue full"]


def test_a_failing_notifier_is_counted_and_logged(
    notifications: list[Notifications], caplog: pytest.LogCaptureFixture
) -> None:
    broken = Recorder(label="slack", fail=True)
    sender = Notifications([Route(broken)])
    notifications.append(sender)
    with caplog.at_level(logging.WARNING, logger="perch.analyzer.notify"):
        sender.send("failed", "Rolling back", canary="podinfo", namespace="test")
        sender.send("failed", "Rolling back", canary="podinfo", namespace="test")
        assert sender.flush(10)
    assert sender.stats()["slack"].failed == 2
    fields = caplog.records[-1].fields  # type: ignore[attr-defined]
    assert fields == {
        "notifier": "slack",
        "kind": "failed",
        "canary": "podinfo.test",
        "error": "HTTP 500: down",
        "failed": 2,
    }


def test_send_never_raises(notifications: list[Notifications]) -> None:
    def broken_clock() -> datetime:
        raise RuntimeError("clock")

    sender = Notifications([Route(Recorder())], clock=broken_clock)
    notifications.append(sender)
    sender.send("failed", "Rolling back")
    assert sender.flush(1)


def test_after_close_send_is_a_no_op() -> None:
    recorder = Recorder()
    sender = Notifications([Route(recorder)])
    sender.send("started", "one")
    assert sender.close(timeout=10)
    sender.send("started", "two")
    assert [n.message for n in recorder.received] == ["one"]


def test_flush_without_workers_is_immediately_true() -> None:
    assert Notifications().flush(0)


def test_from_env(notifications: list[Notifications]) -> None:
    sender = Notifications.from_env({"PERCH_NOTIFY_URL": "http://audit.example/"})
    notifications.append(sender)
    assert sender.stats() == {}


def test_context_in_wire_spelling_is_accepted_and_unknown_keys_ignored(
    notifications: list[Notifications], caplog: pytest.LogCaptureFixture
) -> None:
    recorder = Recorder()
    sender = Notifications([Route(recorder)], clock=lambda: NOW)
    notifications.append(sender)
    context: dict[str, Any] = {"canary": "podinfo", "failedChecks": 4, "bogus": 1}
    with caplog.at_level(logging.WARNING, logger="perch.analyzer.notify"):
        sender.send("halted", "Halt", **context)
        assert sender.flush(10)
    (received,) = recorder.received
    assert (received.canary, received.failed_checks) == ("podinfo", 4)
    assert [r.fields for r in caplog.records] == [{"key": "bogus"}]  # type: ignore[attr-defined]
