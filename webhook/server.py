"""`perch-webhook`: serve a WSGI app factory with gunicorn (gthread) over TLS.

The certificate is reloaded when its files change. gunicorn asks the `ssl_context` hook for a
context on every accepted connection, so each worker hands out the context it holds and a watcher
thread in the worker swaps in a freshly loaded one when the files change: new handshakes get the
new certificate, open connections keep theirs, and a half-written pair (which fails to load) keeps
the old one in service until the files are whole again.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import shutil
import ssl
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NoReturn

from cryptography import x509
from gunicorn.app.base import BaseApplication
from gunicorn.glogging import Logger

from webhook import telemetry
from webhook.telemetry import log_event

PROG: Final = "perch-webhook"
DEFAULT_APP: Final = "webhook.app:create_app"
_ENV_PREFIX: Final = "PERCH_WEBHOOK_"
_LOG_LEVELS: Final = ("debug", "info", "warning", "error", "critical")
CERT_POLL_SECONDS: Final = 1.0
_SHM: Final = "/dev/shm"  # noqa: S108 -- gunicorn's own advice for its heartbeat files

_log = logging.getLogger("perch.webhook.server")


@dataclass(frozen=True, slots=True)
class Settings:
    bind: str
    certfile: str
    keyfile: str
    workers: int
    threads: int
    log_level: str
    app: str
    # Longer than the API server's 90 s idle timeout, so that the client, not the server, closes
    # an idle connection: a POST racing a server-side close is not retried by Go's HTTP client.
    keepalive: int
    graceful_timeout: int


class UsageError(Exception):
    """A bad flag, environment variable or file: exit 2 with one line."""


# --- settings ---------------------------------------------------------------------------------


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog=PROG,
        description="Serve Perch's admission webhook over TLS with gunicorn. Every flag can also "
        f"be set through the environment as {_ENV_PREFIX}<FLAG> (e.g. {_ENV_PREFIX}BIND).",
    )

    def env(name: str, default: str | None = None) -> str | None:
        return environ.get(_ENV_PREFIX + name.upper().replace("-", "_"), default)

    parser.add_argument("--bind", default=env("bind", "0.0.0.0:8443"), metavar="HOST:PORT")
    parser.add_argument(
        "--certfile",
        default=env("certfile"),
        metavar="FILE",
        help="PEM certificate chain, reloaded when it changes",
    )
    parser.add_argument(
        "--keyfile",
        default=env("keyfile"),
        metavar="FILE",
        help="PEM private key, reloaded when it changes",
    )
    parser.add_argument("--workers", default=env("workers", "2"), metavar="N")
    parser.add_argument(
        "--threads", default=env("threads", "4"), metavar="N", help="threads per worker"
    )
    parser.add_argument(
        "--log-level",
        default=env("log-level", "info"),
        metavar="LEVEL",
        help="one of " + ", ".join(_LOG_LEVELS),
    )
    parser.add_argument(
        "--app",
        default=env("app", DEFAULT_APP),
        metavar="MODULE:FACTORY",
        help="WSGI app factory to serve (benchmarks serve a no-op app with it)",
    )
    parser.add_argument("--keepalive", default=env("keepalive", "120"), metavar="SECONDS")
    parser.add_argument(
        "--graceful-timeout",
        default=env("graceful-timeout", "30"),
        metavar="SECONDS",
        help="how long requests in flight may finish on stop",
    )
    return parser


def parse_settings(argv: Sequence[str], environ: Mapping[str, str]) -> Settings:
    args = _parser(environ).parse_args(list(argv))
    if not args.certfile or not args.keyfile:
        raise UsageError(
            f"--certfile and --keyfile are required (or {_ENV_PREFIX}CERTFILE and "
            f"{_ENV_PREFIX}KEYFILE)"
        )
    for flag, path in (("--certfile", args.certfile), ("--keyfile", args.keyfile)):
        if not os.path.isfile(path):
            raise UsageError(f"{flag}: no such file: {path}")
    log_level = str(args.log_level).lower()
    if log_level not in _LOG_LEVELS:
        raise UsageError(f"--log-level must be one of {', '.join(_LOG_LEVELS)}, not {log_level!r}")
    settings = Settings(
        bind=_check_bind(args.bind),
        certfile=args.certfile,
        keyfile=args.keyfile,
        workers=_positive_int("--workers", args.workers),
        threads=_positive_int("--threads", args.threads),
        log_level=log_level,
        app=_check_app(args.app),
        keepalive=_positive_int("--keepalive", args.keepalive),
        graceful_timeout=_positive_int("--graceful-timeout", args.graceful_timeout),
    )
    try:
        server_context(certfile=settings.certfile, keyfile=settings.keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(
            f"cannot load certificate {settings.certfile} with key {settings.keyfile}: {exc}"
        ) from exc
    return settings


def _positive_int(flag: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise UsageError(f"{flag} must be a whole number, not {value!r}") from None
    if number < 1:
        raise UsageError(f"{flag} must be at least 1, not {number}")
    return number


def _check_bind(bind: str) -> str:
    host, sep, port = bind.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise UsageError(f"--bind must be HOST:PORT (e.g. 0.0.0.0:8443 or [::]:8443), not {bind!r}")
    return bind


def _check_app(spec: str) -> str:
    module, sep, factory = spec.partition(":")
    if not sep or not module or not factory.isidentifier():
        raise UsageError(f"--app must be MODULE:FACTORY, not {spec!r}")
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        found = None
    if found is None:
        raise UsageError(f"--app: no module named {module!r}")
    return spec


# --- TLS --------------------------------------------------------------------------------------


# TLS 1.2 only with forward secrecy and an AEAD cipher (Mozilla's "intermediate" profile): no
# CBC, no static RSA key exchange. TLS 1.3's suites are all of that kind and are left as they are.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


def server_context(*, certfile: str, keyfile: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.load_cert_chain(certfile=certfile, keyfile=keyfile)
    return context


_FileId = tuple[int, int, int, int]


class CertReloader:
    """Holds the serving SSLContext and replaces it when the certificate files change."""

    def __init__(self, *, certfile: str, keyfile: str, interval: float = CERT_POLL_SECONDS) -> None:
        self._certfile = certfile
        self._keyfile = keyfile
        self._interval = interval
        # The files' identity is taken before loading so that a change during the load is seen
        # again on the next poll rather than mistaken for what was loaded.
        self._loaded = self._identity()
        self._context = server_context(certfile=certfile, keyfile=keyfile)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing: tuple[_FileId, _FileId] | None = None

    def context(self) -> ssl.SSLContext:
        return self._context

    def _identity(self) -> tuple[_FileId, _FileId] | None:
        try:
            # stat follows symlinks: a Kubernetes Secret volume swaps its ..data link atomically.
            stats = os.stat(self._certfile), os.stat(self._keyfile)
        except OSError:
            return None
        cert, key = ((s.st_dev, s.st_ino, s.st_mtime_ns, s.st_size) for s in stats)
        return cert, key

    def poll(self) -> bool:
        """Reload if the files changed and load as a matching pair; True when it swapped."""
        identity = self._identity()
        if identity is None or identity == self._loaded:
            return False
        try:
            context = server_context(certfile=self._certfile, keyfile=self._keyfile)
        except (OSError, ssl.SSLError) as exc:
            # Usually a pair caught mid-update (new certificate, old key): keep serving the old
            # one and try again next poll. Warn once per state of the files, not every second.
            if identity != self._failing:
                self._failing = identity
                log_event(
                    _log,
                    "certificate reload failed; still serving the previous one",
                    level=logging.WARNING,
                    certfile=self._certfile,
                    keyfile=self._keyfile,
                    error=str(exc),
                )
            return False
        self._context = context
        self._loaded = identity
        self._failing = None
        log_event(
            _log,
            "certificate reloaded",
            certfile=self._certfile,
            fields=_certificate_fields(self._certfile),
        )
        return True

    def start(self) -> None:
        if self._thread is not None:
            return
        # A worker forked long after the arbiter loaded the files catches up before serving.
        self.poll()
        self._thread = threading.Thread(target=self._run, name="perch-cert-reloader", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.poll()
            except Exception as exc:  # the watcher must outlive any surprise
                log_event(_log, "certificate watcher error", level=logging.ERROR, exc=exc)


def _certificate_fields(certfile: str) -> dict[str, object]:
    try:
        cert = x509.load_pem_x509_certificate(Path(certfile).read_bytes())
    except (OSError, ValueError):
        return {}
    return {
        "serial": format(cert.serial_number, "x"),
        "not_after": cert.not_valid_after_utc.isoformat(),
    }


# Built in the arbiter (which validates the files at start) and inherited by every forked worker,
# so a worker that boots while the files are mid-update still has a good certificate to serve.
_reloader: CertReloader | None = None


def _ssl_context_hook(conf: Any, default_factory: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
    # gunicorn's default factory would read the files again for every connection (and fail the
    # handshake while they are mid-update); the reloader builds the same kind of context itself,
    # once per change. gunicorn's ca_certs/cert_reqs/ciphers settings are therefore not used.
    global _reloader  # noqa: PLW0603 -- one reloader per process, shared by the hooks
    if _reloader is None:
        _reloader = CertReloader(certfile=conf.certfile, keyfile=conf.keyfile)
    return _reloader.context()


def _post_worker_init(worker: Any) -> None:
    # Threads are started only after the fork, in the worker that uses them.
    if _reloader is not None:
        _reloader.start()


def _child_exit(server: Any, worker: Any) -> None:
    telemetry.mark_process_dead(worker.pid)


# --- gunicorn ---------------------------------------------------------------------------------


class JsonGunicornLogger(Logger):  # type: ignore[misc]
    """gunicorn's own lines ("Booting worker", "Listening at") as JSON like ours."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        for log in (self.error_log, self.access_log):
            for handler in log.handlers:
                handler.setFormatter(telemetry.JsonFormatter())


def _load_factory(spec: str) -> Any:
    module_name, _, factory_name = spec.partition(":")
    factory = getattr(importlib.import_module(module_name), factory_name)
    return factory()


def gunicorn_options(settings: Settings) -> dict[str, Any]:
    options: dict[str, Any] = {
        "bind": [settings.bind],
        "worker_class": "gthread",
        "workers": settings.workers,
        "threads": settings.threads,
        "keepalive": settings.keepalive,
        "graceful_timeout": settings.graceful_timeout,
        "certfile": settings.certfile,
        "keyfile": settings.keyfile,
        "ssl_context": _ssl_context_hook,
        "post_worker_init": _post_worker_init,
        "child_exit": _child_exit,
        "loglevel": settings.log_level,
        "errorlog": "-",
        "accesslog": None,
        "logger_class": JsonGunicornLogger,
        "proc_name": PROG,
        # A webhook has no business exposing gunicorn's control socket, and two servers on one
        # host would fight over its default path.
        "control_socket_disable": True,
    }
    if os.path.isdir(_SHM):
        # The worker heartbeat file on a disk-backed /tmp can stall under I/O pressure.
        options["worker_tmp_dir"] = _SHM
    return options


class WebhookApplication(BaseApplication):  # type: ignore[misc]
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        super().__init__(prog=PROG)

    def load_config(self) -> None:
        for key, value in gunicorn_options(self._settings).items():
            # Settings newer than the installed gunicorn are skipped, not fatal.
            if key in self.cfg.settings:
                self.cfg.set(key, value)

    def load(self) -> Any:
        return _load_factory(self._settings.app)


# --- metrics directory --------------------------------------------------------------------------


def _prepare_metrics_dir(environ: MutableMapping[str, str]) -> str | None:
    """Point prometheus_client at a multiprocess directory; returns one to delete on exit."""
    given = environ.get(telemetry.MULTIPROC_ENV)
    if not given:
        created = tempfile.mkdtemp(prefix="perch-webhook-metrics-")
        environ[telemetry.MULTIPROC_ENV] = created
        return created
    directory = Path(given)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # Files from a previous run would add its counts to this one's.
        for stale in directory.glob("*.db"):
            stale.unlink()
    except OSError as exc:
        raise UsageError(f"{telemetry.MULTIPROC_ENV}={given}: {exc}") from exc
    return None


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = parse_settings(sys.argv[1:] if argv is None else argv, os.environ)
        telemetry.configure_logging(settings.log_level)
        owned_metrics_dir = _prepare_metrics_dir(os.environ)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    global _reloader  # noqa: PLW0603 -- the arbiter seeds the one its workers inherit
    _reloader = CertReloader(certfile=settings.certfile, keyfile=settings.keyfile)
    log_event(
        _log,
        "starting",
        bind=settings.bind,
        app=settings.app,
        workers=settings.workers,
        threads=settings.threads,
        metrics_dir=os.environ[telemetry.MULTIPROC_ENV],
        fields=_certificate_fields(settings.certfile),
    )
    arbiter_pid = os.getpid()
    try:
        WebhookApplication(settings).run()
    finally:
        # Forked workers unwind through here too (gunicorn ends them with sys.exit): only the
        # arbiter owns the directory.
        if owned_metrics_dir and os.getpid() == arbiter_pid:
            shutil.rmtree(owned_metrics_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
