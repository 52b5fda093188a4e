"""When the analyzer decides a canary is an orphan: its revision never reached the primary."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from analyzer.service import is_orphan
from perch.status import CanaryStatus

T0 = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def primary(**annotations: str) -> dict:
    return {"metadata": {"annotations": annotations}}


def status(phase: str = "Progressing") -> CanaryStatus:
    return CanaryStatus(
        phase=phase, canary_revision="v1-new", phase_entered_at="2026-11-26T12:00:00Z"
    )  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("case", "s", "p", "after", "orphan"),
    [
        (
            "recorded as held back",
            status(),
            primary(**{"perch.dev/canary-revision": "v1-new"}),
            600,
            False,
        ),
        (
            "promoted into the primary",
            status("Promoting"),
            primary(**{"perch.dev/revision": "v1-new"}),
            600,
            False,
        ),
        (
            "never recorded, past the grace",
            status(),
            primary(**{"perch.dev/revision": "v1-old"}),
            600,
            True,
        ),
        (
            "never recorded, within the grace",
            status(),
            primary(**{"perch.dev/revision": "v1-old"}),
            30,
            False,
        ),
        ("finished canaries are left alone", status("Failed"), primary(), 600, False),
    ],
)
def test_is_orphan(case, s, p, after, orphan):
    assert is_orphan(s, p, now=T0 + timedelta(seconds=after)) is orphan, case
