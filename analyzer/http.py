"""/healthz, /readyz and /metrics on the analyzer's metrics port (a plain threaded HTTP server:
the analyzer is not a web app, and this keeps gunicorn and Flask out of its process).

/healthz is the liveness probe: it fails when one of the process's own loops has died, which only
a restart mends. /readyz is the readiness probe: the watch cache has listed everything once. Both
answer from memory; a probe never calls the API server, so an API outage restarts nothing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Final

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

__all__ = ["STALE_RESYNC_PERIODS", "liveness_problem", "serve"]

# Resync periods a leader may go without a resync before it counts as stuck: one late or missed
# run is load, three in a row is a scheduler that no longer runs anything.
STALE_RESYNC_PERIODS: Final = 3

log = logging.getLogger("perch.analyzer.http")


def liveness_problem(
    *,
    cache_alive: bool,
    leading_since: float | None,
    last_resync: float | None,
    resync_seconds: float,
    now: float,
) -> str | None:
    """Why the analyzer should be restarted, in one line; None while it is healthy.

    ``leading_since`` is when this replica last became the leader (None on a standby, whose only
    loop is the cache); ``last_resync`` is the scheduler's stamp. Both are ``time.monotonic()``.
    Staleness counts from the later of the two, so a new term gets a full allowance even though
    the stamp left by an earlier term is old, and a scheduler that never started is caught too.
    """
    if not cache_alive:
        return "watch cache: a list+watch thread has ended"
    if leading_since is None:
        return None
    since = leading_since if last_resync is None else max(leading_since, last_resync)
    idle = now - since
    if idle > STALE_RESYNC_PERIODS * resync_seconds:
        return (
            f"scheduler: no resync for {idle:.0f}s while leading "
            f"(one is due every {resync_seconds:g}s)"
        )
    return None


def serve(
    *,
    host: str,
    port: int,
    registry: CollectorRegistry,
    ready: Callable[[], bool],
    live: Callable[[], str | None],
) -> ThreadingHTTPServer:
    """Serve in a daemon thread. ``live`` gives liveness_problem's answer: None, or the reason
    /healthz fails."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/healthz":
                try:
                    problem = live()
                except Exception as exc:
                    # A probe that raised would drop the connection: the kubelet would see a
                    # failure with no reason given.
                    problem = f"health check failed: {exc!r}"
                if problem is None:
                    self._send(200, b"ok\n", "text/plain")
                else:
                    line = " ".join(problem.split())
                    # The kubelet's event says only "HTTP probe failed"; the reason is kept here.
                    log.warning("liveness probe failed: %s", line)
                    self._send(503, f"{line}\n".encode(), "text/plain; charset=utf-8")
            elif path == "/readyz":
                ok = ready()
                self._send(200 if ok else 503, b"ok\n" if ok else b"not ready\n", "text/plain")
            elif path == "/metrics":
                self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            else:
                self._send(404, b"not found\n", "text/plain")

        def _send(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            # Probes every few seconds would drown the JSON log.
            return

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
