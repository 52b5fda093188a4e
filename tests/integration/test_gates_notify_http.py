"""Gates and notifications over real HTTP, against receivers on 127.0.0.1 started by each test.

Time bounds here are generous ceilings (the property is "did not wait for the slow thing"), never
expected durations.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from analyzer.gates import post_event, run_gates
from analyzer.notify import (
    ChatNotifier,
    Notifications,
    Route,
    spec_context,
)
from certs.issue import issue
from perch.spec import Alert, CrossNamespaceRef, FrozenDict, Webhook, parse_spec
from tests.seed import SEED_SPEC_CURRENT

CMD = "hey -z 1m -q 10 -c 2 http://podinfo.test:9898/"
# Long enough that a test which waited for it would be obvious; released at teardown.
HANG_SECONDS = 30.0


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


# A behaviour gets the request and the receiver's release event, and answers (status, body).
Behaviour = Callable[[Request, threading.Event], tuple[int, bytes]]


def answer(status: int, body: bytes = b"") -> Behaviour:
    return lambda request, release: (status, body)


OK = answer(200)


def hang(request: Request, release: threading.Event) -> tuple[int, bytes]:
    release.wait(HANG_SECONDS)
    return 200, b""


def sleep_then_ok(seconds: float) -> Behaviour:
    def behaviour(request: Request, release: threading.Event) -> tuple[int, bytes]:
        release.wait(seconds)
        return 200, b"done"

    return behaviour


def in_turn(*behaviours: Behaviour) -> Behaviour:
    """The first request gets the first behaviour, and so on; the last one repeats."""
    queue = list(behaviours)
    lock = threading.Lock()

    def behaviour(request: Request, release: threading.Event) -> tuple[int, bytes]:
        with lock:
            current = queue.pop(0) if len(queue) > 1 else queue[0]
        return current(request, release)

    return behaviour


@dataclass
class Receiver:
    """An HTTP server on 127.0.0.1 that records every POST and answers by ``behaviour``."""

    behaviour: Behaviour
    tls: ssl.SSLContext | None = None
    requests: list[Request] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    trickle: bool = False

    def __post_init__(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                request = Request(self.path, dict(self.headers.items()), self.rfile.read(length))
                receiver.requests.append(request)
                if receiver.trickle:
                    self._trickle()
                    return
                status, body = receiver.behaviour(request, receiver.release)
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass  # the client gave up waiting, which is what some tests are about

            def _trickle(self) -> None:
                # A status line, then a header one byte at a time: every read succeeds, none ends.
                self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                while not receiver.release.wait(0.1):
                    try:
                        self.wfile.write(b"a")
                        self.wfile.flush()
                    except OSError:
                        return

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if self.tls is not None:
            self.server.socket = self.tls.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self.server.server_address[1]}/"

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receivers() -> Iterator[Callable[..., Receiver]]:
    started: list[Receiver] = []

    def start(behaviour: Behaviour = OK, **kwargs: Any) -> Receiver:
        receiver = Receiver(behaviour, **kwargs)
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        receiver.stop()


@pytest.fixture
def session() -> Iterator[requests.Session]:
    with requests.Session() as http:
        yield http


@pytest.fixture
def notifications() -> Iterator[list[Notifications]]:
    made: list[Notifications] = []
    yield made
    for each in made:
        each.close(timeout=0)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def load_test(url: str, **overrides: Any) -> Webhook:
    """The seed's load-test webhook, pointed at ``url``."""
    (seed_hook,) = parse_spec(SEED_SPEC_CURRENT).analysis.webhooks
    return replace(seed_hook, url=url, **overrides)


def gates(hooks: list[Webhook], session: requests.Session) -> tuple[Any, ...]:
    return run_gates(
        hooks,
        name="podinfo",
        namespace="test",
        phase="Progressing",
        checksum="v1-3f9c2a",
        session=session,
    )


# --- gates ----------------------------------------------------------------------------------------


def test_load_tester_contract(
    receivers: Callable[..., Receiver], session: requests.Session
) -> None:
    tester = receivers(answer(200, b"ok"))
    tricky = (
        'hey -H "X-Name: caf\u00e9" -m POST -d \'{"a": [1, 2]}\' http://podinfo-canary.test:9898/'
    )
    hooks = [
        load_test(tester.url),
        load_test(tester.url + "tricky", name="tricky", metadata=FrozenDict({"cmd": tricky})),
    ]
    results = gates(hooks, session)
    assert [r.outcome for r in results] == ["pass", "pass"]
    by_path = {request.path: request for request in tester.requests}
    seed = by_path["/"]
    assert seed.headers["Content-Type"] == "application/json"
    assert seed.json() == {
        "name": "podinfo",
        "namespace": "test",
        "phase": "Progressing",
        "checksum": "v1-3f9c2a",
        "metadata": {"cmd": CMD},
    }
    assert by_path["/tricky"].json()["metadata"]["cmd"] == tricky


def test_a_gate_answering_500_fails_with_status_and_body(
    receivers: Callable[..., Receiver], session: requests.Session
) -> None:
    tester = receivers(answer(500, b"command hey failed: exit status 1"))
    (result,) = gates([load_test(tester.url)], session)
    assert result.outcome == "fail"
    assert "500" in result.message
    assert "command hey failed" in result.message


def test_a_gate_sleeping_past_its_timeout_times_out(
    receivers: Callable[..., Receiver], session: requests.Session
) -> None:
    tester = receivers(hang)
    hook = load_test(tester.url, timeout="500ms", timeout_seconds=0.5)
    started = time.monotonic()
    (result,) = gates([hook], session)
    assert result.outcome == "timeout"
    assert time.monotonic() - started < HANG_SECONDS / 3


def test_a_gate_that_trickles_its_answer_does_not_hold_the_tick(
    receivers: Callable[..., Receiver], session: requests.Session
) -> None:
    tester = receivers(trickle=True)
    hook = load_test(tester.url, timeout="500ms", timeout_seconds=0.5)
    started = time.monotonic()
    (result,) = gates([hook], session)
    assert result.outcome == "timeout"
    assert time.monotonic() - started < HANG_SECONDS / 3


def test_connection_refused_is_an_error(session: requests.Session) -> None:
    (result,) = gates([load_test(f"http://127.0.0.1:{free_port()}/")], session)
    assert result.outcome == "error"
    assert "refused" in result.message.lower()


def test_retries_until_the_gate_passes(
    receivers: Callable[..., Receiver], session: requests.Session
) -> None:
    tester = receivers(in_turn(answer(503), answer(503), answer(200)))
    (result,) = gates([load_test(tester.url, retries=2)], session)
    assert result.outcome == "pass"
    assert len(tester.requests) == 3


def test_slow_gates_run_in_parallel(
    receivers: Callable[..., Receiver], session: requests.Session
) -> None:
    slow = 1.0
    testers = [receivers(sleep_then_ok(slow)) for _ in range(3)]
    hooks = [load_test(tester.url, name=f"gate-{i}") for i, tester in enumerate(testers)]
    started = time.monotonic()
    results = gates(hooks, session)
    elapsed = time.monotonic() - started
    assert [r.outcome for r in results] == ["pass", "pass", "pass"]
    assert [r.name for r in results] == ["gate-0", "gate-1", "gate-2"]
    assert elapsed < 2.5 * slow


@pytest.fixture(scope="module")
def tls_context(tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    issued = issue(service="loadtester", namespace="test", ips=[ipaddress.ip_address("127.0.0.1")])
    folder: Path = tmp_path_factory.mktemp("tls")
    (folder / "tls.crt").write_bytes(issued.tls_crt)
    (folder / "tls.key").write_bytes(issued.tls_key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(folder / "tls.crt", folder / "tls.key")
    return context


def test_an_untrusted_certificate_is_an_error(
    receivers: Callable[..., Receiver], session: requests.Session, tls_context: ssl.SSLContext
) -> None:
    tester = receivers(answer(200), tls=tls_context)
    (result,) = gates([load_test(tester.url, retries=2)], session)
    assert result.outcome == "error"
    assert "TLS" in result.message
    assert "attempts" not in result.message  # a bad certificate is not retried


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_disable_tls_skips_verification(
    receivers: Callable[..., Receiver], session: requests.Session, tls_context: ssl.SSLContext
) -> None:
    tester = receivers(answer(200), tls=tls_context)
    (result,) = gates([load_test(tester.url, disable_tls=True)], session)
    assert result.outcome == "pass"


def test_event_webhook_gets_flaggers_event_payload(
    receivers: Callable[..., Receiver], session: requests.Session
) -> None:
    sink = receivers(answer(202))
    hook = Webhook(name="events", url=sink.url, type="event", metadata=FrozenDict({"team": "web"}))
    future = post_event(
        hook,
        name="podinfo",
        namespace="test",
        phase="Progressing",
        checksum="v1-3f9c2a",
        message="Advance podinfo.test canary weight 10",
        session=session,
    )
    assert future.result(timeout=15).outcome == "pass"
    (request,) = sink.requests
    body = request.json()
    assert {k: body[k] for k in ("name", "namespace", "phase", "checksum")} == {
        "name": "podinfo",
        "namespace": "test",
        "phase": "Progressing",
        "checksum": "v1-3f9c2a",
    }
    metadata = body["metadata"]
    assert metadata["eventMessage"] == "Advance podinfo.test canary weight 10"
    assert metadata["eventType"] == "Normal"
    assert metadata["timestamp"].isdigit()
    assert metadata["team"] == "web"


def test_a_failing_event_webhook_is_logged_not_raised(
    session: requests.Session, caplog: pytest.LogCaptureFixture
) -> None:
    hook = Webhook(name="events", url=f"http://127.0.0.1:{free_port()}/", type="event")
    with caplog.at_level(logging.WARNING, logger="perch.analyzer.gates"):
        future = post_event(
            hook,
            name="podinfo",
            namespace="test",
            phase="Failed",
            checksum="v1",
            message="Rolling back",
            event_type="Warning",
            session=session,
        )
        assert future.result(timeout=15).outcome == "error"
    assert [r.getMessage() for r in caplog.records] == ["event webhook failed"]


# --- notifications ------------------------------------------------------------------------------


def context() -> dict[str, Any]:
    return {
        "canary": "podinfo",
        "namespace": "test",
        "revision": "v1-3f9c2a",
        "phase": "Failed",
        "weight": 0,
        "failed_checks": 10,
        **spec_context(parse_spec(SEED_SPEC_CURRENT)),
    }


def test_slack_receives_the_message(
    receivers: Callable[..., Receiver], notifications: list[Notifications]
) -> None:
    slack = receivers(answer(200, b"ok"))
    sender = Notifications(
        [Route(ChatNotifier("slack", slack.url + "services/T/B/X", channel="#rel"))]
    )
    notifications.append(sender)
    message = "Rolling back podinfo.test failed checks threshold reached 10"
    sender.send("failed", message, **context())
    assert sender.flush(15)
    (request,) = slack.requests
    assert request.path == "/services/T/B/X"
    assert request.headers["Content-Type"] == "application/json"
    body = request.json()
    assert body["channel"] == "#rel"
    assert body["username"] == "perch"
    assert body["text"] == "podinfo.test: canary analysis failed, rolled back"
    (attachment,) = body["attachments"]
    assert attachment["color"] == "danger"
    assert attachment["title"] == "podinfo.test"
    assert attachment["text"] == message
    fields = {item["title"]: item["value"] for item in attachment["fields"]}
    assert fields["Target"] == "Deployment/podinfo.test"
    assert fields["Failed checks threshold"] == "10"
    assert fields["Traffic routing"] == "Weight step: 5 max: 50 interval: 30s"
    assert sender.stats()["slack"].sent == 1


def test_generic_webhook_receives_its_json(
    receivers: Callable[..., Receiver], notifications: list[Notifications]
) -> None:
    sink = receivers(answer(204))
    sender = Notifications([Route(ChatNotifier("generic", sink.url))])
    notifications.append(sender)
    sender.send("promoted", "Promotion completed! Scaling down podinfo-canary.test", **context())
    assert sender.flush(15)
    (request,) = sink.requests
    assert request.headers["Content-Type"] == "application/json"
    body = request.json()
    timestamp = body.pop("timestamp")
    assert body == {
        "kind": "promoted",
        "severity": "info",
        "canary": "podinfo",
        "namespace": "test",
        "revision": "v1-3f9c2a",
        "phase": "Failed",
        "message": "Promotion completed! Scaling down podinfo-canary.test",
        "weight": 0,
        "failedChecks": 10,
    }
    assert timestamp.endswith("Z")


def test_alerts_go_to_their_provider_by_severity(
    receivers: Callable[..., Receiver], notifications: list[Notifications]
) -> None:
    on_call = receivers(answer(200))
    default = receivers(answer(200))
    env = {
        "PERCH_NOTIFY_URL": default.url,
        "PERCH_ALERT_PROVIDERS": json.dumps({"on-call": {"type": "slack", "url": on_call.url}}),
    }
    sender = Notifications.from_env(env)
    notifications.append(sender)
    alerts = [Alert("page", CrossNamespaceRef("on-call"), "warn")]
    for kind in ("started", "halted", "failed", "promoted"):
        sender.send(kind, f"{kind} message", alerts=alerts, canary="podinfo", namespace="test")
    sender.send("started", "a canary without alerts", canary="other", namespace="test")
    assert sender.flush(15)
    assert [r.json()["attachments"][0]["text"] for r in on_call.requests] == [
        "halted message",
        "failed message",
    ]
    assert [r.json()["canary"] for r in default.requests] == ["other"]


def test_a_hanging_notifier_never_delays_send_and_flush_keeps_its_deadline(
    receivers: Callable[..., Receiver],
    notifications: list[Notifications],
    caplog: pytest.LogCaptureFixture,
) -> None:
    stuck = receivers(hang)
    secret_url = stuck.url + "services/T000/B000/SECRET"
    sender = Notifications([Route(ChatNotifier("slack", secret_url, timeout=1.0))])
    notifications.append(sender)
    with caplog.at_level(logging.WARNING, logger="perch.analyzer.notify"):
        started = time.monotonic()
        sender.send("failed", "Rolling back podinfo.test", canary="podinfo", namespace="test")
        # Well under the notifier's own timeout: send() did not wait for the POST.
        assert time.monotonic() - started < 0.9

        started = time.monotonic()
        assert not sender.flush(0.2)  # still in flight
        assert time.monotonic() - started < HANG_SECONDS / 3

        assert sender.flush(15)  # the POST gives up at its timeout, long before the hang ends
    stats = sender.stats()["slack"]
    assert (stats.sent, stats.failed) == (0, 1)
    (record,) = [r for r in caplog.records if r.getMessage() == "notification failed"]
    assert record.fields["error"] == "no answer within 1s"  # type: ignore[attr-defined]
    assert "SECRET" not in caplog.text


def test_an_unreachable_notifier_does_not_leak_its_url(
    notifications: list[Notifications], caplog: pytest.LogCaptureFixture
) -> None:
    url = f"http://127.0.0.1:{free_port()}/services/T000/B000/SECRET"
    sender = Notifications([Route(ChatNotifier("slack", url))])
    notifications.append(sender)
    with caplog.at_level(logging.WARNING, logger="perch.analyzer.notify"):
        sender.send("failed", "Rolling back", canary="podinfo", namespace="test")
        assert sender.flush(15)
    (record,) = caplog.records
    assert "Connection refused" in record.fields["error"]  # type: ignore[attr-defined]
    assert "SECRET" not in json.dumps(record.fields)  # type: ignore[attr-defined]
