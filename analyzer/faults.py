"""Crash points for fault-injection tests: the analyzer dies at a chosen point of a tick.

``PERCH_CRASH_AFTER=ACTION[@PHASE]`` makes the process exit at once (``os._exit``, no clean-up,
as SIGKILL or an OOM kill would) right after it has performed the first action of that kind,
optionally only in a tick whose new status is in PHASE. ``PromoteTemplate``, ``CommitStatus@Failed``
and ``SetWeights@Finalising`` are the points between the writes of a promotion. The tests use it to
show that every such point is finished by the next analyzer, never stalled or repeated. Unset (as
in every deployment), it costs one comparison per action.
"""

from __future__ import annotations

import logging
import os
from typing import Final

ENV: Final = "PERCH_CRASH_AFTER"
EXIT_CODE: Final = 137  # what a SIGKILLed process reports

log = logging.getLogger("perch.analyzer")


def _parse(value: str) -> tuple[str, str] | None:
    action, _, phase = value.strip().partition("@")
    return (action, phase) if action else None


_POINT = _parse(os.environ.get(ENV, ""))


def after(action: object, *, phase: str) -> None:
    """Called by the shell after performing `action` in a tick whose new status is in `phase`."""
    if _POINT is None:
        return
    kind, wanted = _POINT
    if type(action).__name__ == kind and wanted in ("", phase):
        log.warning("crash point %s reached: exiting", os.environ.get(ENV))
        logging.shutdown()
        os._exit(EXIT_CODE)
