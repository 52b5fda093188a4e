"""A TCP relay in front of a server that a test can unplug, plug back, or point elsewhere.

Clients keep one address while the server behind it is cut off, restarted, or moved to another
port (kube-up may pick a new port for a restarted API server while the old one's sockets linger).
TLS passes through untouched: the server's certificate is for 127.0.0.1, the relay's address too.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable


class Cable:
    """A TCP relay between a client and the API server, which the test can unplug: open
    connections are cut and new ones closed at once until it is plugged back in."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._server.getsockname()[1]
        self._plugged = threading.Event()
        self._plugged.set()
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._closed = False
        threading.Thread(target=self._accept, name="cable", daemon=True).start()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def unplug(self) -> None:
        self._plugged.clear()
        with self._lock:
            cut, self._open = self._open, set()
        for conn in cut:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def plug(self, upstream_port: int | None = None) -> None:
        if upstream_port is not None:
            self.upstream_port = upstream_port
        self._plugged.set()

    def close(self) -> None:
        self._closed = True
        self.unplug()
        self._server.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                down, _ = self._server.accept()
            except OSError:
                return
            if not self._plugged.is_set():
                down.close()
                continue
            try:
                up = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
                up.settimeout(None)
            except OSError:
                down.close()
                continue
            with self._lock:
                self._open |= {down, up}
            splice(down, up, closed=self._closed_pair)

    def _closed_pair(self, pair: set[socket.socket]) -> None:
        with self._lock:
            self._open -= pair


def splice(
    down: socket.socket, up: socket.socket, *, closed: Callable[[set[socket.socket]], None]
) -> None:
    """Copies bytes both ways, a thread per direction; when either side ends, both sockets are
    shut and closed and ``closed`` is told which."""
    for src, dst in ((down, up), (up, down)):
        threading.Thread(target=_pump, args=(src, dst, closed), daemon=True).start()


def _pump(
    src: socket.socket, dst: socket.socket, closed: Callable[[set[socket.socket]], None]
) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for conn in (src, dst):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        closed({src, dst})
