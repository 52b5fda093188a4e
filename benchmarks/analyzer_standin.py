"""The Kubernetes API stand-in (tests/standin.py) in a process of its own, for analyzer_scale.py.

    .venv/bin/python benchmarks/analyzer_standin.py [--namespace NS ...]

Prints one JSON line ``{"url": ..., "pid": ...}`` once the server listens, then answers commands
read from stdin, one JSON line each on stdout:

- ``calls``: requests received so far, by ``"<verb> <resource>"`` (StandIn.calls());
- ``canaries``: a summary of every Canary object (phases, weights, failed checks, taken up);
- ``timeline``: every write to a Canary or an Event so far, with the stand-in's wall-clock time
  of the write (``[t, plural, type, namespace, name, phase, weight, message]``);
- ``quit``: stop the server and exit (also on end of input).

In its own process the stand-in's CPU is not the analyzer's, and its GIL is not the analyzer's.
Bodies of answered requests are dropped (the call log would otherwise keep every status patch).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: tests.standin
    sys.path.insert(0, str(REPO))

from tests import standin as standin_module  # noqa: E402

TIMELINE_PLURALS = frozenset({"canaries", "events"})

_timeline: list[tuple[float, str, str, str, str, str, int, str]] = []
_timeline_lock = threading.Lock()


def _install_hooks() -> None:
    original_commit = standin_module.Emulator._commit

    def commit(self: Any, res: Any, type_: str, old: Any, new: dict[str, Any]) -> None:
        original_commit(self, res, type_, old, new)
        if res.plural not in TIMELINE_PLURALS:
            return
        meta = new.get("metadata") or {}
        status = new.get("status") or {}
        entry = (
            time.time(),
            res.plural,
            type_,
            str(meta.get("namespace") or ""),
            str(meta.get("name") or ""),
            str(status.get("phase") or "") if isinstance(status, dict) else "",
            int(status.get("canaryWeight") or 0) if isinstance(status, dict) else 0,
            str(new.get("message") or ""),
        )
        with _timeline_lock:
            _timeline.append(entry)

    standin_module.Emulator._commit = commit  # type: ignore[method-assign]


def _forget_bodies(server: standin_module.StandIn, stop: threading.Event) -> None:
    """Drop the bodies of answered calls: the benchmark counts calls, it never reads bodies."""
    done = 0
    while not stop.wait(2.0):
        with server.emulator.lock:
            calls = server.emulator.calls
            while done < len(calls) and calls[done].status is not None:
                calls[done].body = None
                done += 1


def _canaries(server: standin_module.StandIn) -> dict[str, Any]:
    with server.emulator.lock:
        statuses = [
            dict(o.get("status") or {})
            for k, o in server.emulator.store.items()
            if k[0] == "canaries"
        ]
    weights = [int(s.get("canaryWeight") or 0) for s in statuses]
    return {
        "count": len(statuses),
        "phases": dict(Counter(str(s.get("phase") or "") for s in statuses)),
        "taken_up": sum(
            1
            for s in statuses
            if s.get("analysedRevision") and s.get("analysedRevision") == s.get("canaryRevision")
        ),
        "with_weight": sum(1 for w in weights if w > 0),
        "weight_min": min(weights, default=0),
        "weight_max": max(weights, default=0),
        "weight_mean": sum(weights) / len(weights) if weights else 0.0,
        "with_failed_checks": sum(1 for s in statuses if int(s.get("failedChecks") or 0) > 0),
    }


def _answer(server: standin_module.StandIn, command: str) -> dict[str, Any]:
    if command == "calls":
        counts = Counter(f"{c.verb} {c.resource}" for c in server.calls())
        return {"calls": dict(counts), "total": sum(counts.values())}
    if command == "canaries":
        return _canaries(server)
    if command == "timeline":
        with _timeline_lock:
            return {"timeline": [list(e) for e in _timeline]}
    if command == "crashes":
        return {"crashes": [repr(e) for e in server.crashes()]}
    return {"error": f"unknown command {command!r}"}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--namespace", action="append", default=[], help="create it (repeatable)")
    args = parser.parse_args(argv)
    _install_hooks()
    server = standin_module.StandIn(namespaces=(*standin_module.NAMESPACES, *args.namespace))
    server.start()
    stop = threading.Event()
    threading.Thread(target=_forget_bodies, args=(server, stop), daemon=True).start()
    print(json.dumps({"url": server.url, "pid": os.getpid()}), flush=True)
    try:
        for line in sys.stdin:
            command = line.strip()
            if command == "quit":
                break
            if command:
                print(json.dumps(_answer(server, command)), flush=True)
    finally:
        stop.set()
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
