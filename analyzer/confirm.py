"""How long a confirm gate's "not yet" may last: the pure rule shared by step() and gates."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from perch.spec import OnTimeout

ConfirmState = Literal["waiting", "proceed", "abort"]


def confirm_state(
    *,
    first_asked_at: datetime,
    now: datetime,
    max_wait_seconds: float | None,
    on_timeout: OnTimeout,
) -> ConfirmState:
    """What to do about confirm gates that have not approved yet.

    ``first_asked_at`` is when the gates of this step were first asked for this revision; it must
    come from the stored status, so that a restarted analyzer keeps counting from the first ask.
    ``max_wait_seconds`` None waits for ever, as Flagger does.
    """
    if max_wait_seconds is None or on_timeout == "wait":
        return "waiting"
    if (now - first_asked_at).total_seconds() < max_wait_seconds:
        return "waiting"
    return on_timeout
