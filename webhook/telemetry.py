"""The webhook's metrics and JSON log lines.

prometheus_client is imported lazily on purpose: it decides once, at import time, whether values
live in process memory or in PROMETHEUS_MULTIPROC_DIR files. The server sets that variable in
main(), after this module (and server.py) have been imported, and the metrics must still land in
files so that /metrics can sum what every gunicorn worker counted.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from prometheus_client import Counter, Histogram

MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"

# Admission answers take milliseconds; the API server gives up after timeoutSeconds (5 s by
# default), so the buckets stop soon after that.
DURATION_BUCKETS: Final = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


@dataclass(frozen=True, slots=True)
class _RequestMetrics:
    requests: Counter
    duration: Histogram


_metrics: _RequestMetrics | None = None
_metrics_lock = threading.Lock()


def _request_metrics() -> _RequestMetrics:
    global _metrics  # noqa: PLW0603 -- one set per process, like the registry that holds it
    if _metrics is not None:
        return _metrics
    # gthread workers take their first requests on several threads at once, and registering a
    # metric twice raises: only one of them may build the set.
    with _metrics_lock:
        if _metrics is None:
            from prometheus_client import (  # noqa: PLC0415 -- see the module docstring
                Counter,
                Histogram,
            )

            _metrics = _RequestMetrics(
                requests=Counter(
                    "perch_webhook_requests_total",
                    "AdmissionReview requests answered by /mutate, by decision.",
                    ["decision"],
                ),
                duration=Histogram(
                    "perch_webhook_request_duration_seconds",
                    "Time to answer one /mutate request (body read to response built), "
                    "by decision.",
                    ["decision"],
                    buckets=DURATION_BUCKETS,
                ),
            )
        return _metrics


def observe_request(*, decision: str, seconds: float) -> None:
    metrics = _request_metrics()
    metrics.requests.labels(decision=decision).inc()
    metrics.duration.labels(decision=decision).observe(seconds)


def render_metrics() -> tuple[bytes, str]:
    """The Prometheus exposition of this server: every worker's counts when multiprocess."""
    from prometheus_client import (  # noqa: PLC0415 -- see the module docstring
        CONTENT_TYPE_LATEST,
        REGISTRY,
        CollectorRegistry,
        generate_latest,
    )

    # Registering first means a scrape before any request still lists the metric families.
    _request_metrics()
    if not os.environ.get(MULTIPROC_ENV):
        return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
    from prometheus_client import multiprocess  # noqa: PLC0415 -- see the module docstring

    # A fresh registry per scrape: the collector reads the files of all workers, dead or alive.
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return generate_latest(registry), CONTENT_TYPE_LATEST


def mark_process_dead(pid: int) -> None:
    """Forget a dead worker's live gauges (its counters stay: they still count in the totals)."""
    if not os.environ.get(MULTIPROC_ENV):
        return
    from prometheus_client import multiprocess  # noqa: PLC0415 -- see the module docstring

    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


# --- JSON log lines ---------------------------------------------------------------------------

# Attribute on a LogRecord that carries structured fields (set through `extra`).
_FIELDS_ATTR: Final = "perch_fields"
_RESERVED: Final = frozenset({"ts", "level", "msg", "logger", "pid"})


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, msg, logger, pid, then the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
            "logger": record.name,
            # Several gunicorn workers share one stream; the pid tells their lines apart.
            "pid": record.process,
        }
        fields = getattr(record, _FIELDS_ATTR, None)
        if isinstance(fields, dict):
            # A field never overwrites the envelope: log shippers key on it.
            line.update({k: v for k, v in fields.items() if k not in _RESERVED})
        if record.exc_info and record.exc_info[0] is not None:
            line["exc"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        # default=str: a stray non-JSON value must not cost the whole line.
        return json.dumps(line, default=str, separators=(",", ":"))


def log_event(
    logger: logging.Logger,
    msg: str,
    /,
    *,
    level: int = logging.INFO,
    exc: BaseException | None = None,
    fields: Mapping[str, object] | None = None,
    **more: object,
) -> None:
    """Log one structured line with `fields` and `more` as its fields.

    `exc` adds the traceback under "exc": for the log only, never for a response body.
    """
    if not logger.isEnabledFor(level):
        return
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    logger.log(level, msg, exc_info=exc_info, extra={_FIELDS_ATTR: {**(fields or {}), **more}})


_HANDLER_MARK: Final = "_perch_json"


def configure_logging(level: str | int = logging.INFO) -> None:
    """Send every logger's records to stderr as JSON lines; safe to call more than once."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_MARK, False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    setattr(handler, _HANDLER_MARK, True)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
