"""Start perch-webhook as a real process over real TLS, with certificates from perch-certs."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography import x509

REPO = Path(__file__).resolve().parents[2]
ECHO_APP = "tests.support.echo_admitter:create_app"
PERCH_APP = "webhook.app:create_app"
NOT_READY_FILE_ENV = "PERCH_TEST_NOT_READY_FILE"
# Generous upper bound for waiting on the server; a deadline, never a measurement.
START_DEADLINE = 60.0


# --- certificates ---------------------------------------------------------------------------


@dataclass
class CertFiles:
    ca: Path
    cert: Path
    key: Path
    serial: int


def certs_command() -> list[str]:
    script = Path(sys.executable).with_name("perch-certs")
    return [str(script)] if script.exists() else [sys.executable, "-m", "certs"]


def issue_certs(directory: Path, *, extra_ip: str | None = None) -> CertFiles:
    """A fresh CA and a serving certificate for 127.0.0.1, issued the way the product does."""
    subprocess.run(
        [
            *certs_command(),
            "issue",
            "--service",
            "perch-webhook",
            "--namespace",
            "perch",
            "--out-dir",
            str(directory),
            "--ip",
            "127.0.0.1",
            *(["--ip", extra_ip] if extra_ip and extra_ip != "127.0.0.1" else []),
        ],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=60,
    )
    cert = directory / "tls.crt"
    serial = x509.load_pem_x509_certificate(cert.read_bytes()).serial_number
    return CertFiles(ca=directory / "ca.crt", cert=cert, key=directory / "tls.key", serial=serial)


# --- the server -----------------------------------------------------------------------------


def server_command() -> list[str]:
    script = Path(sys.executable).with_name("perch-webhook")
    return [str(script)] if script.exists() else [sys.executable, "-m", "webhook.server"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERCH_WEBHOOK_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    # The test admitter lives under tests/, importable from the repository root.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


@dataclass
class Server:
    certs: CertFiles
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    not_ready_file: Path
    _log_file: Any = field(repr=False)
    # CAs the test clients accept; a certificate rotation may add the next one.
    trusted: list[Path] = field(default_factory=list)

    @property
    def base(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_lines(self) -> list[dict[str, Any]]:
        lines = []
        for raw in self.log().splitlines():
            try:
                lines.append(json.loads(raw))
            except json.JSONDecodeError:
                lines.append({"msg": raw, "not_json": True})
        return lines

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.certs.ca))
        for ca in self.trusted:
            context.load_verify_locations(cafile=str(ca))
        return context

    def connection(self) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(
            "127.0.0.1", self.port, context=self.client_context(), timeout=30
        )

    def post(self, body: bytes, *, content_type: str = "application/json") -> requests.Response:
        return requests.post(
            f"{self.base}/mutate",
            data=body,
            headers={"Content-Type": content_type},
            verify=str(self.certs.ca),
            timeout=30,
        )

    def get(self, path: str) -> requests.Response:
        return requests.get(f"{self.base}{path}", verify=str(self.certs.ca), timeout=30)

    def serial_of_new_connection(self) -> int:
        with (
            socket.create_connection(("127.0.0.1", self.port), timeout=30) as raw,
            self.client_context().wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            der = tls.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der).serial_number

    def wait_until_serving(self) -> None:
        deadline = time.monotonic() + START_DEADLINE
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"perch-webhook exited with {self.process.returncode}:\n{self.log()}")
            try:
                if self.get("/healthz").status_code == 200:
                    return
            except requests.exceptions.ConnectionError:
                pass
            time.sleep(0.05)
        pytest.fail(f"perch-webhook did not serve within {START_DEADLINE}s:\n{self.log()}")

    def terminate(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log_file.close()
        return self.process.returncode


def start_server(
    tmp: Path,
    *,
    workers: int = 2,
    app: str = ECHO_APP,
    env: dict[str, str] | None = None,
    bind_host: str = "127.0.0.1",
) -> Server:
    # Another address (where an API server in a container reaches this host) means listening on
    # every interface, with that address in the certificate too.
    certs = issue_certs(tmp / "certs", extra_ip=bind_host)
    listen = "127.0.0.1" if bind_host == "127.0.0.1" else "0.0.0.0"
    port = free_port()
    not_ready_file = tmp / "not-ready"
    log_path = tmp / "server.log"
    log_file = log_path.open("wb")
    process = subprocess.Popen(
        [
            *server_command(),
            "--bind",
            f"{listen}:{port}",
            "--certfile",
            str(certs.cert),
            "--keyfile",
            str(certs.key),
            "--workers",
            str(workers),
            "--threads",
            "4",
            "--app",
            app,
        ],
        cwd=REPO,
        env=server_env({NOT_READY_FILE_ENV: str(not_ready_file), **(env or {})}),
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    server = Server(
        certs=certs,
        port=port,
        process=process,
        log_path=log_path,
        not_ready_file=not_ready_file,
        _log_file=log_file,
    )
    try:
        server.wait_until_serving()
    except BaseException:
        server.terminate()
        raise
    return server
