"""Figures a test measures and CI's output should show (the terminal summary prints them).

A test's ``print`` is swallowed by pytest unless ``-s`` is given; a figure reported here is
printed at the end of every run, after the cluster tier's counts.
"""

from __future__ import annotations

import threading

_lock = threading.Lock()
_figures: list[tuple[str, str]] = []


def report(name: str, value: str) -> None:
    with _lock:
        _figures.append((name, value))


def reported() -> list[tuple[str, str]]:
    with _lock:
        return list(_figures)
