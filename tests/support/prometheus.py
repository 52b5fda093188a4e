"""A real Prometheus server for tests, with series backfilled at chosen past times.

    server = PrometheusServer(tmp_path).backfill(istio_openmetrics(traffic, start=T0, end=T1))
    server.start()
    ... PrometheusProvider(server.url).evaluate(..., at=T1) ...
    server.stop()            # or server.kill() to see how the analyzer copes with a dead one

Backfilling runs ``promtool tsdb create-blocks-from openmetrics`` into the server's data dir;
Prometheus only reads new blocks at start (or at its next block reload, up to a minute later), so
``backfill`` on a running server restarts it on the same port. The server keeps old blocks because
it runs with ``--storage.tsdb.retention.time=100y``. Evaluating at a fixed past time then gives
the same numbers on every run, whatever the clock says.

``scrape("127.0.0.1:PORT")`` adds a scrape target (a local exporter) instead, reloading the
configuration of a running server through ``/-/reload``.

``PrometheusServer(dir, web=WebConfig(users={"perch": "secret"}, tls=issued))`` starts it with a
``--web.config.file`` that requires HTTP basic auth (bcrypt hashes of the passwords) and serves
TLS with a certificate from ``certs.issue.issue`` (``url`` is then ``https://``); ``requests_args``
is what a client needs to be let in. Prometheus itself has no bearer tokens: ``BearerProxy`` puts
a token check in front of a server, as kube-rbac-proxy or an API gateway does in a cluster.

The generators write Istio's (and Envoy's) series the way the mesh exports them: counters that
grow by requests per second times the step, and latency histograms with Istio's buckets.
"""

from __future__ import annotations

import math
import shutil
import signal
import socket
import subprocess
import threading
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import bcrypt
import requests

from certs.issue import IssuedCertificate

# Generous upper bounds; deadlines for a broken setup, never measurements.
START_DEADLINE = 60.0
STOP_DEADLINE = 30.0
PROMTOOL_DEADLINE = 120.0

# Istio's default buckets for istio_request_duration_milliseconds (ms).
ISTIO_MS_BUCKETS: tuple[float, ...] = (
    0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000,
    600000, 1800000, 3600000,
)  # fmt: skip
# The seed's istio_request_duration_seconds used Prometheus's default buckets (s).
ISTIO_SECONDS_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
)  # fmt: skip
# Envoy's upstream_rq_time histogram buckets (ms).
ENVOY_MS_BUCKETS: tuple[float, ...] = (
    0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000,
    600000, 1800000, 3600000,
)  # fmt: skip

HistogramUnit = Literal["milliseconds", "seconds"]


def missing_binaries() -> str | None:
    """Why these tests cannot run here (None when they can): `make system-packages` installs."""
    absent = [name for name in ("prometheus", "promtool") if shutil.which(name) is None]
    if absent:
        return (
            f"{' and '.join(absent)} not installed (Debian package 'prometheus'; "
            "`make system-packages` installs it)"
        )
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _kill_if_running(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait(timeout=STOP_DEADLINE)


class PrometheusError(RuntimeError):
    """The server or promtool failed; the message carries their output."""


@dataclass(frozen=True)
class WebConfig:
    """What ``--web.config.file`` asks of every client: basic auth (user → password), TLS."""

    users: Mapping[str, str] = field(default_factory=dict)
    tls: IssuedCertificate | None = None

    def write(self, directory: Path) -> Path:
        lines: list[str] = []
        if self.tls is not None:
            (directory / "tls.crt").write_bytes(self.tls.tls_crt)
            (directory / "tls.key").write_bytes(self.tls.tls_key)
            (directory / "ca.crt").write_bytes(self.tls.ca_crt)
            lines += ["tls_server_config:", "  cert_file: tls.crt", "  key_file: tls.key"]
        if self.users:
            lines.append("basic_auth_users:")
            for user, password in self.users.items():
                # Go's bcrypt minimum cost: the check runs on every request of the test.
                hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
                lines.append(f"  {user}: {hashed!r}")
        path = directory / "web.yml"
        path.write_text("\n".join(lines) + "\n")
        return path


class PrometheusServer:
    """One Prometheus process on 127.0.0.1 with its own config and data dir under ``directory``."""

    def __init__(
        self, directory: Path, *, scrape_interval: str = "1s", web: WebConfig | None = None
    ) -> None:
        self.directory = directory
        self.data_dir = directory / "data"
        self.config_file = directory / "prometheus.yml"
        self.log_file = directory / "prometheus.log"
        self.scrape_interval = scrape_interval
        self.web = web
        self.port = free_port()
        self._targets: list[tuple[str, str]] = []
        self._process: subprocess.Popen[bytes] | None = None
        self._backfills = 0
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.web_config_file = web.write(directory) if web is not None else None

    @property
    def url(self) -> str:
        scheme = "https" if self.web is not None and self.web.tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> Path | None:
        """The CA that issued the server's certificate (None without TLS)."""
        return self.directory / "ca.crt" if self.web is not None and self.web.tls else None

    @property
    def requests_args(self) -> dict[str, Any]:
        """``auth`` and ``verify`` for requests, so that the test itself is let in."""
        args: dict[str, Any] = {}
        if self.web is not None and self.web.users:
            args["auth"] = next(iter(self.web.users.items()))
        if self.ca_file is not None:
            args["verify"] = str(self.ca_file)
        return args

    def query(self, promql: str) -> list[Any]:
        """An instant query now, as the test's own client: the answer's ``data.result``."""
        answer = requests.get(
            f"{self.url}/api/v1/query", params={"query": promql}, timeout=10, **self.requests_args
        )
        answer.raise_for_status()
        return list(answer.json()["data"]["result"])

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # -- data ------------------------------------------------------------------------------

    def backfill(self, openmetrics: str) -> Self:
        """Write series (OpenMetrics text with timestamps, ending in ``# EOF``) into the TSDB."""
        self._backfills += 1
        source = self.directory / f"backfill-{self._backfills}.om"
        source.write_text(openmetrics)
        was_running = self.running
        if was_running:
            # A running server reads new blocks only at its next reload (up to a minute).
            self.stop()
        done = subprocess.run(
            ["promtool", "tsdb", "create-blocks-from", "openmetrics", str(source),
             str(self.data_dir)],
            capture_output=True,
            text=True,
            timeout=PROMTOOL_DEADLINE,
            check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise PrometheusError(f"promtool failed ({done.returncode}): {done.stderr.strip()}")
        if was_running:
            self.start()
        return self

    def scrape(self, target: str, *, job: str = "exporter") -> Self:
        """Scrape ``host:port``'s /metrics every ``scrape_interval``."""
        self._targets.append((job, target))
        if self.running:
            self._write_config()
            response = requests.post(
                f"{self.url}/-/reload", timeout=STOP_DEADLINE, **self.requests_args
            )
            if response.status_code != 200:
                raise PrometheusError(f"reload failed: {response.status_code} {response.text}")
        return self

    def _write_config(self) -> None:
        lines = ["global:", f"  scrape_interval: {self.scrape_interval}", "scrape_configs:"]
        jobs: dict[str, list[str]] = {}
        for job, target in self._targets:
            jobs.setdefault(job, []).append(target)
        if not jobs:
            lines[-1] += " []"
        for job, targets in jobs.items():
            lines += [
                f"  - job_name: {job}",
                f"    scrape_interval: {self.scrape_interval}",
                "    static_configs:",
                f"      - targets: [{', '.join(repr(t) for t in targets)}]",
            ]
        self.config_file.write_text("\n".join(lines) + "\n")

    # -- life ------------------------------------------------------------------------------

    def start(self, *, deadline: float = START_DEADLINE) -> Self:
        """Start the server and wait until /-/ready answers 200."""
        if self.running:
            return self
        self._write_config()
        web = [f"--web.config.file={self.web_config_file}"] if self.web_config_file else []
        log = self.log_file.open("ab")
        try:
            self._process = subprocess.Popen(
                [
                    "prometheus",
                    f"--config.file={self.config_file}",
                    f"--storage.tsdb.path={self.data_dir}",
                    "--storage.tsdb.retention.time=100y",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--web.enable-lifecycle",
                    "--log.level=warn",
                    *web,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                start_new_session=True,
            )
        finally:
            log.close()
        # If the test process dies without stop(), the server must not outlive it.
        weakref.finalize(self, _kill_if_running, self._process)
        self._wait_ready(deadline)
        return self

    def _wait_ready(self, deadline: float) -> None:
        until = time.monotonic() + deadline
        while time.monotonic() < until:
            if not self.running:
                raise PrometheusError(f"prometheus exited at start:\n{self.log()}")
            try:
                ready = requests.get(f"{self.url}/-/ready", timeout=2, **self.requests_args)
                if ready.status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.05)
        self.kill()
        raise PrometheusError(f"prometheus not ready within {deadline:g}s:\n{self.log()}")

    def stop(self) -> None:
        """Graceful stop (SIGTERM), then SIGKILL if it lingers."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_DEADLINE)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_DEADLINE)

    def kill(self) -> None:
        """Die at once, the way a crashed or evicted Prometheus disappears."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.kill()
        process.wait(timeout=STOP_DEADLINE)

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


class BearerProxy:
    """A token check in front of a Prometheus server: requests with ``Authorization: Bearer
    <token>`` are forwarded (with what the server itself asks for), the rest get 401."""

    def __init__(self, upstream: PrometheusServer, *, token: str) -> None:
        self.upstream = upstream
        self.token = token
        self.port = free_port()
        self.refused = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self._forward("GET")

            def do_POST(self) -> None:
                self._forward("POST")

            def _forward(self, method: str) -> None:
                if self.headers.get("Authorization") != f"Bearer {proxy.token}":
                    proxy.refused += 1
                    self._answer(401, b"Unauthorized\n", "text/plain")
                    return
                length = int(self.headers.get("Content-Length") or 0)
                answer = requests.request(
                    method,
                    f"{proxy.upstream.url}{self.path}",
                    data=self.rfile.read(length) if length else None,
                    headers={"Content-Type": self.headers.get("Content-Type", "")},
                    timeout=STOP_DEADLINE,
                    **proxy.upstream.requests_args,
                )
                self._answer(
                    answer.status_code,
                    answer.content,
                    answer.headers.get("Content-Type", "application/json"),
                )

            def _answer(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                del format, args

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


# --------------------------------------------------------------------------------------------
# Series generators
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Traffic:
    """Steady traffic to one workload over the whole window.

    ``latencies_ms`` maps a latency to the share of requests that take it (shares sum to 1);
    ``error_ratio`` is the share answered with ``error_code``.
    """

    workload: str
    namespace: str = "test"
    requests_per_second: float = 100.0
    error_ratio: float = 0.0
    error_code: str = "500"
    latencies_ms: Mapping[float, float] = field(default_factory=lambda: {50.0: 1.0})

    def __post_init__(self) -> None:
        if not math.isclose(sum(self.latencies_ms.values()), 1.0):
            raise ValueError(f"latency shares must sum to 1, got {dict(self.latencies_ms)}")
        if not 0 <= self.error_ratio <= 1:
            raise ValueError(f"error_ratio must be in [0, 1], got {self.error_ratio}")

    def responses(self) -> dict[str, float]:
        """Requests per second by response code (codes with no requests left out)."""
        shares = {"200": 1 - self.error_ratio, self.error_code: self.error_ratio}
        return {code: self.requests_per_second * s for code, s in shares.items() if s > 0}

    def at_or_below(self, bound_ms: float) -> float:
        """The share of requests taking at most ``bound_ms``."""
        # The tolerance absorbs float noise in bounds converted from seconds (0.05 * 1000).
        limit = bound_ms * (1 + 1e-9)
        return sum(share for latency, share in self.latencies_ms.items() if latency <= limit)


def _timestamps(start: datetime, end: datetime, step_seconds: float) -> list[float]:
    if start.tzinfo is None or end.tzinfo is None:
        raise ValueError("start and end must be timezone-aware")
    first, last = start.timestamp(), end.timestamp()
    count = math.floor((last - first) / step_seconds)
    return [first + i * step_seconds for i in range(count + 1)]


def _labels(pairs: Mapping[str, str]) -> str:
    return "{" + ",".join(f'{key}="{value}"' for key, value in pairs.items()) + "}"


def _number(value: float) -> str:
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def istio_openmetrics(
    traffic: Iterable[Traffic],
    *,
    start: datetime,
    end: datetime,
    step_seconds: float = 15.0,
    histograms: Sequence[HistogramUnit] = ("milliseconds", "seconds"),
) -> str:
    """Istio's destination-side series for ``traffic`` from ``start`` to ``end``.

    ``istio_requests_total`` per response code, and the latency histograms named in
    ``histograms`` (``istio_request_duration_milliseconds`` and/or the seed's ``..._seconds``).
    Counters start at 0 at ``start`` and grow linearly, so ``rate()`` over any window inside
    gives exactly the requested rates.
    """
    flows = list(traffic)
    times = _timestamps(start, end, step_seconds)
    out = ["# TYPE istio_requests counter"]
    for flow in flows:
        for code, rps in flow.responses().items():
            labels = _labels(_istio_labels(flow, code))
            out += [
                f"istio_requests_total{labels} {_number(rps * (t - times[0]))} {_number(t)}"
                for t in times
            ]
    for unit in histograms:
        name = f"istio_request_duration_{unit}"
        buckets = ISTIO_MS_BUCKETS if unit == "milliseconds" else ISTIO_SECONDS_BUCKETS
        factor = 1.0 if unit == "milliseconds" else 1000.0
        out.append(f"# TYPE {name} histogram")
        for flow in flows:
            for code, rps in flow.responses().items():
                base = _istio_labels(flow, code)
                out += _histogram_lines(name, base, flow, rps, times, buckets=buckets, to_ms=factor)
    out.append("# EOF")
    return "\n".join(out) + "\n"


def envoy_openmetrics(
    traffic: Iterable[Traffic],
    *,
    start: datetime,
    end: datetime,
    step_seconds: float = 15.0,
    port: int = 9898,
) -> str:
    """Envoy's upstream cluster series (Contour naming: ``<namespace>_<service>_<port>``).

    ``workload`` is the Service name here (the canary's Service is named like its Deployment).
    """
    flows = list(traffic)
    times = _timestamps(start, end, step_seconds)
    # Envoy exports this counter without the "_total" OpenMetrics requires of counters, so the
    # family is declared untyped: the stored name is what matters to the queries.
    out = ["# TYPE envoy_cluster_upstream_rq unknown"]
    for flow in flows:
        for code, rps in flow.responses().items():
            labels = _labels(_envoy_labels(flow, port, code=code))
            out += [
                f"envoy_cluster_upstream_rq{labels} {_number(rps * (t - times[0]))} {_number(t)}"
                for t in times
            ]
    name = "envoy_cluster_upstream_rq_time"
    out.append(f"# TYPE {name} histogram")
    for flow in flows:
        out += _histogram_lines(
            name,
            _envoy_labels(flow, port),
            flow,
            flow.requests_per_second,
            times,
            buckets=ENVOY_MS_BUCKETS,
            to_ms=1.0,
        )
    out.append("# EOF")
    return "\n".join(out) + "\n"


def _istio_labels(flow: Traffic, code: str) -> dict[str, str]:
    return {
        "reporter": "destination",
        "destination_workload_namespace": flow.namespace,
        "destination_workload": flow.workload,
        "response_code": code,
    }


def _envoy_labels(flow: Traffic, port: int, *, code: str | None = None) -> dict[str, str]:
    labels = {"envoy_cluster_name": f"{flow.namespace}_{flow.workload}_{port}"}
    if code is not None:
        labels["envoy_response_code"] = code
    return labels


def _histogram_lines(
    name: str,
    base: Mapping[str, str],
    flow: Traffic,
    rps: float,
    times: Sequence[float],
    *,
    buckets: Sequence[float],
    to_ms: float,
) -> list[str]:
    # Every response code has the same latency distribution: the shares split its requests.
    mean_ms = sum(latency * share for latency, share in flow.latencies_ms.items())
    lines: list[str] = []
    for t in times:
        elapsed = t - times[0]
        for bound in (*buckets, math.inf):
            share = 1.0 if bound == math.inf else flow.at_or_below(bound * to_ms)
            le = "+Inf" if bound == math.inf else _number(bound)
            labels = _labels({**base, "le": le})
            lines.append(f"{name}_bucket{labels} {_number(rps * elapsed * share)} {_number(t)}")
        lines.append(f"{name}_count{_labels(base)} {_number(rps * elapsed)} {_number(t)}")
        total = rps * elapsed * mean_ms / to_ms
        lines.append(f"{name}_sum{_labels(base)} {_number(total)} {_number(t)}")
    return lines
