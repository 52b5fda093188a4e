"""What the cluster tier must never find in a log line or an Event: secrets it handed out.

Fixtures and tests ``remember`` every secret they give Perch (ServiceAccount tokens, keys,
passwords, notifier addresses) and every log file Perch writes (``log_file``);
tests/cluster/test_no_secrets_leak.py greps all of them, and every Event, at the end of the tier.
"""

from __future__ import annotations

import threading
from pathlib import Path

_lock = threading.Lock()
_secrets: set[str] = set()
_logs: set[Path] = set()
# Shorter strings match by accident (and a secret that short is no secret).
MIN_LENGTH = 8


def remember(*values: str) -> None:
    with _lock:
        _secrets.update(v for v in values if len(v) >= MIN_LENGTH)


def log_file(path: Path) -> None:
    with _lock:
        _logs.add(path)


def secrets() -> set[str]:
    with _lock:
        return set(_secrets)


def logs() -> set[Path]:
    with _lock:
        return set(_logs)
