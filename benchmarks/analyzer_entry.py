"""perch-analyzer as its console script runs it, plus a dump of the scheduler's tick lags.

    PERCH_BENCH_DUMP=/tmp/lags.json .venv/bin/python benchmarks/analyzer_entry.py [FLAGS]

FLAGS are perch-analyzer's.

Runs ``analyzer.__main__.main`` with the same flags and the same code; the only addition is that
the CanaryScheduler it builds keeps more lag samples and is remembered, so that SIGUSR1 writes its
``tick_lags()``, ``tick_durations()`` and ``stats()`` to ``$PERCH_BENCH_DUMP`` (written to a
temporary name, then renamed). analyzer_scale.py signals at the start and at the end of its
measurement window and keeps the samples in between: exact lags per tick, where the analyzer's
/metrics would give histogram buckets or quantiles over whatever samples are still buffered.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import analyzer.__main__ as entry  # noqa: E402
from analyzer.scheduler import CanaryScheduler  # noqa: E402

# Enough for 2,000 canaries ticking every second for 8 minutes: the window never loses a sample.
LAG_SAMPLES = 1_000_000

_schedulers: list[CanaryScheduler] = []


class RecordedScheduler(CanaryScheduler):
    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("lag_samples", LAG_SAMPLES)
        super().__init__(**kwargs)
        _schedulers.append(self)


def _dump(_signum: int, _frame: object) -> None:
    target = os.environ.get("PERCH_BENCH_DUMP")
    if not target:
        return
    data = {
        "t": time.time(),
        "schedulers": [
            {
                "lags": s.tick_lags(),
                "durations": s.tick_durations(),
                "stats": dataclasses.asdict(s.stats()),
            }
            for s in _schedulers
        ],
    }
    temporary = f"{target}.tmp"
    with open(temporary, "w") as out:
        json.dump(data, out)
    os.replace(temporary, target)


def main() -> int:
    entry.CanaryScheduler = RecordedScheduler  # type: ignore[misc]
    signal.signal(signal.SIGUSR1, _dump)
    return entry.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
