"""perch-webhook as the API server meets it: a real gunicorn subprocess over real TLS.

The admission logic is replaced by tests/support/echo_admitter.py (served with --app) so that
every answer here is known in advance; what is under test is the server, TLS and the HTTP shell.
Certificates come from `perch-certs issue`, as they would in a cluster without cert-manager.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from tests.support.webhook_server import (
    ECHO_APP,
    REPO,
    CertFiles,
    Server,
    issue_certs,
    server_command,
    server_env,
    start_server,
)

MIB = 1024 * 1024
# Generous upper bounds for waiting on the server; they are deadlines, never measurements.
START_DEADLINE = 60.0
RELOAD_DEADLINE = 30.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start_server(tmp_path_factory.mktemp("webhook"))
    yield running
    running.terminate()


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[Server]:
    """A server for one test that changes it (its certificates, its life)."""
    running = start_server(tmp_path)
    yield running
    running.terminate()


def review(*, uid: str | None = "auto", name: str = "podinfo") -> bytes:
    request: dict[str, Any] = {
        "kind": {"group": "apps", "version": "v1", "kind": "Deployment"},
        "operation": "UPDATE",
        "namespace": "test",
        "name": name,
    }
    if uid is not None:
        request["uid"] = str(uuid.uuid4()) if uid == "auto" else uid
    return json.dumps(
        {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}
    ).encode()


def assert_json_error(response: requests.Response, status: int) -> str:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == "application/json"
    error = response.json()["error"]
    assert isinstance(error, str)
    assert "Traceback" not in response.text
    return error


# --- TLS ------------------------------------------------------------------------------------


def test_https_is_served_with_a_certificate_the_ca_vouches_for(server: Server) -> None:
    response = server.post(review(uid="uid-1"))
    assert response.status_code == 200
    assert response.json()["response"] == {
        "uid": "uid-1",
        "allowed": True,
        "warnings": [response.json()["response"]["warnings"][0]],
    }
    # A client that does not trust this CA must not get through: verification is real.
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"{server.base}/healthz", verify=True, timeout=30)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # ssl flags TLS 1.1 itself
def test_tls_1_1_handshake_is_refused_and_1_2_accepted(server: Server) -> None:
    def handshake(maximum: ssl.TLSVersion) -> str | None:
        context = server.client_context()
        # Let this client offer old versions at all, so that the refusal is the server's.
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
        context.minimum_version = ssl.TLSVersion.TLSv1_1
        context.maximum_version = maximum
        with (
            socket.create_connection(("127.0.0.1", server.port), timeout=30) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            return tls.version()

    with pytest.raises(ssl.SSLError) as refused:
        handshake(ssl.TLSVersion.TLSv1_1)
    assert refused.value.reason == "TLSV1_ALERT_PROTOCOL_VERSION"
    assert handshake(ssl.TLSVersion.TLSv1_2) == "TLSv1.2"


@pytest.mark.parametrize(
    ("cipher", "accepted"),
    [
        ("ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES128-GCM-SHA256", True),
        ("ECDHE-RSA-CHACHA20-POLY1305:ECDHE-ECDSA-CHACHA20-POLY1305", True),
        ("ECDHE-RSA-AES128-SHA:ECDHE-ECDSA-AES128-SHA", False),  # CBC
        ("ECDHE-RSA-AES256-SHA384:ECDHE-ECDSA-AES256-SHA384", False),  # CBC
        ("AES128-GCM-SHA256:AES256-GCM-SHA384", False),  # no forward secrecy
        ("DHE-RSA-AES128-GCM-SHA256", False),  # finite-field DHE
    ],
)
def test_tls_1_2_takes_only_forward_secret_aead_ciphers(
    server: Server, cipher: str, accepted: bool
) -> None:
    context = server.client_context()
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(f"{cipher}:@SECLEVEL=0")
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as raw:
        if not accepted:
            with pytest.raises(ssl.SSLError, match=r"HANDSHAKE_FAILURE|NO_SHARED_CIPHER"):
                context.wrap_socket(raw, server_hostname="127.0.0.1")
            return
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.version() == "TLSv1.2"
            assert tls.cipher()[0] in cipher.split(":")


def test_tls_1_3_is_accepted_and_preferred(server: Server) -> None:
    with (
        socket.create_connection(("127.0.0.1", server.port), timeout=30) as raw,
        server.client_context().wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        assert tls.version() == "TLSv1.3"


# --- /mutate: what the shell refuses --------------------------------------------------------


def test_wrong_content_type_is_400(server: Server) -> None:
    error = assert_json_error(server.post(review(), content_type="text/plain"), 400)
    assert error == "content type must be application/json"


def test_content_type_with_charset_is_accepted(server: Server) -> None:
    response = server.post(review(), content_type="application/json; charset=utf-8")
    assert response.status_code == 200


def test_body_over_3_mib_is_400_and_the_connection_survives(server: Server) -> None:
    conn = server.connection()
    try:
        oversized = b"{" + b" " * (3 * MIB) + b"}"
        conn.request(
            "POST", "/mutate", body=oversized, headers={"Content-Type": "application/json"}
        )
        answer = conn.getresponse()
        payload = json.loads(answer.read())
        assert answer.status == 400
        assert payload == {"error": "request body larger than 3 MiB"}
        local_port = conn.sock.getsockname()[1]
        # The same keep-alive connection still serves: the body was read, not reset.
        conn.request(
            "POST",
            "/mutate",
            body=review(uid="after-big"),
            headers={"Content-Type": "application/json"},
        )
        again = conn.getresponse()
        assert again.status == 200
        assert json.loads(again.read())["response"]["uid"] == "after-big"
        assert conn.sock.getsockname()[1] == local_port
    finally:
        conn.close()


def test_body_of_exactly_3_mib_is_accepted(server: Server) -> None:
    body = review(uid="at-limit")
    padded = body[:-1] + b" " * (3 * MIB - len(body)) + b"}"
    assert len(padded) == 3 * MIB
    response = server.post(padded)
    assert response.status_code == 200
    assert response.json()["response"]["uid"] == "at-limit"


def test_chunked_body_over_3_mib_is_400(server: Server) -> None:
    def chunks() -> Iterator[bytes]:
        yield b"{"
        for _ in range(4):
            yield b" " * MIB
        yield b"}"

    # A generator makes requests send Transfer-Encoding: chunked, with no Content-Length.
    response = requests.post(
        f"{server.base}/mutate",
        data=chunks(),
        headers={"Content-Type": "application/json"},
        verify=str(server.certs.ca),
        timeout=30,
    )
    assert assert_json_error(response, 400) == "request body larger than 3 MiB"


def test_invalid_json_is_400_with_the_reason(server: Server) -> None:
    error = assert_json_error(server.post(b'{"request": {"uid": "x",}}'), 400)
    assert error.startswith("invalid JSON: ")
    assert "line 1 column 25" in error


def test_json_that_is_not_an_object_is_400(server: Server) -> None:
    error = assert_json_error(server.post(b'[{"request": {"uid": "x"}}]'), 400)
    assert error == "request body must be a JSON object (an AdmissionReview), not an array"


def test_review_without_uid_is_400_with_the_admitters_reason(server: Server) -> None:
    assert assert_json_error(server.post(review(uid=None)), 400) == "request.uid is missing"


# --- /mutate: when the admitter fails -------------------------------------------------------


def test_admitter_crash_is_a_denial_with_a_clear_message(server: Server) -> None:
    response = server.post(review(uid="uid-crash", name="explode"))
    assert response.status_code == 200
    answer = response.json()
    assert answer["apiVersion"] == "admission.k8s.io/v1"
    assert answer["kind"] == "AdmissionReview"
    assert answer["response"]["uid"] == "uid-crash"
    assert answer["response"]["allowed"] is False
    message = answer["response"]["status"]["message"]
    assert message.startswith("perch: internal error: RuntimeError: kaboom")
    assert "Traceback" not in response.text
    assert "secret detail" not in response.text
    # The details went to the log instead, as one JSON line keyed by the uid.
    failures = [line for line in server.log_lines() if line.get("uid") == "uid-crash"]
    assert len(failures) == 1
    assert failures[0]["level"] == "error"
    assert "secret detail" in failures[0]["exc"]


def test_admitter_crash_without_a_uid_is_400(server: Server) -> None:
    error = assert_json_error(server.post(review(uid=None, name="explode")), 400)
    assert error == "perch: internal error: RuntimeError: kaboom"


# --- the other routes -----------------------------------------------------------------------


def test_unknown_path_and_wrong_method_answer_json(server: Server) -> None:
    assert assert_json_error(server.get("/nope"), 404) == "not found"
    wrong_method = server.get("/mutate")
    assert assert_json_error(wrong_method, 405) == "method not allowed"
    assert "POST" in wrong_method.headers["Allow"]


def test_healthz_and_readyz_follow_the_admitter(server: Server) -> None:
    healthz = server.get("/healthz")
    assert (healthz.status_code, healthz.text) == (200, "ok")
    assert server.get("/readyz").status_code == 200
    server.not_ready_file.touch()
    try:
        assert assert_json_error(server.get("/readyz"), 503) == "not ready"
        # Liveness is not readiness: a webhook that cannot reach the API is not restarted.
        assert server.get("/healthz").status_code == 200
    finally:
        server.not_ready_file.unlink()
    assert server.get("/readyz").status_code == 200


def scrape(server: Server) -> dict[tuple[str, str], float]:
    response = server.get("/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    values: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name in {
                "perch_webhook_requests_total",
                "perch_webhook_request_duration_seconds_count",
            }:
                values[sample.name, sample.labels["decision"]] = sample.value
    return values


def test_metrics_count_every_decision_across_both_workers(server: Server) -> None:
    before = scrape(server)
    malformed = [review(uid=None), b"not json", b"[]"]
    errors = [review(name="explode")] * 2
    for body in malformed + errors:
        server.post(body)

    def allow_on_a_new_connection(_: int) -> int:
        conn = server.connection()
        try:
            conn.request(
                "POST", "/mutate", body=review(), headers={"Content-Type": "application/json"}
            )
            answer = conn.getresponse()
            assert answer.status == 200
            warning = json.loads(answer.read())["response"]["warnings"][0]
            return int(warning.removeprefix("echo pid "))
        finally:
            conn.close()

    # New connections are spread over the workers by the kernel; keep going until both served.
    pids: set[int] = set()
    allowed = 0
    with ThreadPoolExecutor(max_workers=4) as pool:
        while len(pids) < 2 and allowed < 400:
            pids.update(pool.map(allow_on_a_new_connection, range(20)))
            allowed += 20
    assert len(pids) == 2, "every request went to one worker; nothing shows the sum"

    after = scrape(server)

    def delta(name: str, decision: str) -> float:
        return after.get((name, decision), 0.0) - before.get((name, decision), 0.0)

    expected = {"allow": allowed, "malformed": len(malformed), "error": len(errors)}
    for decision, count in expected.items():
        assert delta("perch_webhook_requests_total", decision) == count, decision
        assert delta("perch_webhook_request_duration_seconds_count", decision) == count, decision


# --- certificate reload ---------------------------------------------------------------------


@dataclass
class KeepAliveClient:
    """Sends reviews on one connection until stopped; any failure is recorded, never retried."""

    server: Server
    sent: int = 0
    failures: list[str] = field(default_factory=list)
    local_ports: set[int] = field(default_factory=set)
    serials: set[int] = field(default_factory=set)
    stop: threading.Event = field(default_factory=threading.Event)

    # False: a new TLS connection (and handshake) for every request, as a client without
    # keep-alive, or the API server after an idle timeout, meets a rotation.
    keep_alive: bool = True

    def run(self) -> None:
        conn = self.server.connection()
        try:
            while not self.stop.is_set():
                if not self.keep_alive:
                    conn.close()
                    conn = self.server.connection()
                uid = str(uuid.uuid4())
                try:
                    conn.request(
                        "POST",
                        "/mutate",
                        body=review(uid=uid),
                        headers={"Content-Type": "application/json"},
                    )
                    answer = conn.getresponse()
                    payload = json.loads(answer.read())
                except (OSError, http.client.HTTPException, ValueError) as exc:
                    self.failures.append(repr(exc))
                    return
                if answer.status != 200 or payload["response"]["uid"] != uid:
                    self.failures.append(f"{answer.status}: {payload}")
                    return
                sock = conn.sock
                assert isinstance(sock, ssl.SSLSocket)
                self.local_ports.add(sock.getsockname()[1])
                der = sock.getpeercert(binary_form=True)
                assert der is not None
                self.serials.add(x509.load_der_x509_certificate(der).serial_number)
                self.sent += 1
        finally:
            conn.close()


def wait_for(condition: Callable[[], bool], *, what: str, server: Server) -> None:
    deadline = time.monotonic() + RELOAD_DEADLINE
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}:\n{server.log()}")


def test_certificate_reload_keeps_connections_and_serves_the_new_certificate(
    own_server: Server,
    tmp_path: Path,
) -> None:
    server = own_server
    # perch-certs issues a new CA with each pair: clients trust both, as during a CA rotation.
    upcoming = issue_certs(tmp_path / "next")
    server.trusted.append(upcoming.ca)
    old_serial, new_serial = server.certs.serial, upcoming.serial
    assert old_serial != new_serial
    clients = [KeepAliveClient(server) for _ in range(4)]
    # Under load, new connections too: they must get one certificate or the other, never fail.
    reconnecting = [KeepAliveClient(server, keep_alive=False) for _ in range(2)]
    threads = [threading.Thread(target=client.run) for client in [*clients, *reconnecting]]
    for thread in threads:
        thread.start()
    try:

        def messages(text: str) -> set[int]:
            return {
                line["pid"]
                for line in server.log_lines()
                if str(line.get("msg", "")).startswith(text)
            }

        wait_for(
            lambda: (
                len(messages("Booting worker")) == 2
                and all(c.sent >= 5 or c.failures for c in clients)
            ),
            what="both workers and the clients to get going",
            server=server,
        )
        workers = messages("Booting worker")

        # Half an update: the new certificate next to the old key. Each worker must try it,
        # refuse it, and keep serving the old certificate.
        server.certs.cert.write_bytes(upcoming.cert.read_bytes())
        wait_for(
            lambda: (
                messages("certificate reload failed; still serving the previous one") >= workers
            ),
            what="both workers to refuse the half-written pair",
            server=server,
        )
        assert server.serial_of_new_connection() == old_serial

        server.certs.key.write_bytes(upcoming.key.read_bytes())
        wait_for(
            lambda: messages("certificate reloaded") >= workers,
            what="both workers to reload",
            server=server,
        )
        sent_at_reload = [client.sent for client in clients]
        # Whichever worker takes them, new connections now get the new certificate.
        assert {server.serial_of_new_connection() for _ in range(20)} == {new_serial}
        wait_for(
            lambda: all(
                c.sent > n or c.failures for c, n in zip(clients, sent_at_reload, strict=True)
            ),
            what="the clients to send after the reload",
            server=server,
        )
    finally:
        for client in [*clients, *reconnecting]:
            client.stop.set()
        for thread in threads:
            thread.join(timeout=60)

    for client in reconnecting:
        assert client.failures == []
        assert client.serials == {old_serial, new_serial}
    for client in clients:
        assert client.failures == []
        # Each client kept its one connection, and with it the certificate it started with.
        assert len(client.local_ports) == 1
        assert client.serials == {old_serial}


# --- process life ---------------------------------------------------------------------------


def test_sigterm_stops_the_server_cleanly(own_server: Server) -> None:
    starting = next(line for line in own_server.log_lines() if line.get("msg") == "starting")
    metrics_dir = Path(starting["metrics_dir"])
    assert metrics_dir.is_dir()
    assert own_server.post(review()).status_code == 200

    assert own_server.terminate() == 0
    log = own_server.log()
    assert "Traceback" not in log
    assert all("not_json" not in line for line in own_server.log_lines()), log
    # The server made its own metrics directory, so it also removes it.
    assert not metrics_dir.exists()


@pytest.fixture(scope="module")
def two_pairs(tmp_path_factory: pytest.TempPathFactory) -> tuple[CertFiles, CertFiles]:
    directory = tmp_path_factory.mktemp("pairs")
    return issue_certs(directory / "a"), issue_certs(directory / "b")


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing-cert", "--certfile: no such file"),
        ("mismatched-key", "cannot load certificate"),
        ("zero-workers", "--workers must be at least 1"),
        ("bad-bind", "--bind must be HOST:PORT"),
        ("unknown-app", "--app: no module named"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(
    tmp_path: Path, two_pairs: tuple[CertFiles, CertFiles], case: str, expected: str
) -> None:
    certs, other = two_pairs
    args = {
        "--bind": "127.0.0.1:8443",
        "--certfile": str(certs.cert),
        "--keyfile": str(certs.key),
        "--app": ECHO_APP,
    }
    match case:
        case "missing-cert":
            args["--certfile"] = str(tmp_path / "absent.crt")
        case "mismatched-key":
            args["--keyfile"] = str(other.key)
        case "zero-workers":
            args["--workers"] = "0"
        case "bad-bind":
            args["--bind"] = "8443"
        case "unknown-app":
            args["--app"] = "tests.support.no_such_module:create_app"
    result = subprocess.run(
        [*server_command(), *(item for pair in args.items() for item in pair)],
        cwd=REPO,
        env=server_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("perch-webhook: error: ")
    assert expected in lines[0]


def test_settings_come_from_the_environment_too(two_pairs: tuple[CertFiles, CertFiles]) -> None:
    certs, _ = two_pairs
    env = server_env(
        {
            "PERCH_WEBHOOK_CERTFILE": str(certs.cert),
            "PERCH_WEBHOOK_KEYFILE": str(certs.key),
            "PERCH_WEBHOOK_WORKERS": "none",
        }
    )
    result = subprocess.run(
        server_command(), cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    # The certificate pair from the environment was accepted; the worker count was not.
    assert result.returncode == 2
    assert "--workers must be a whole number, not 'none'" in result.stderr
