"""The global cap's count reads three fields of each Canary's status, not the whole status.

wire_holds_slot must say exactly what CanaryStatus.from_wire(raw).holds_slot says, for any status
the API could hand back (old, new, partial or hand-edited), or the cap would count differently
from the state machine that honours it.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from perch.status import PHASES, CanaryStatus, wire_holds_slot

REVISIONS = st.one_of(
    st.none(), st.sampled_from(["", "v1-aaaa", "v1-bbbb"]), st.integers(0, 2), st.booleans()
)
PHASE = st.one_of(st.none(), st.sampled_from([*PHASES, "", "Bogus", "progressing"]), st.integers())


@st.composite
def statuses(draw: st.DrawFn) -> dict[str, Any] | None:
    if draw(st.booleans()) and draw(st.booleans()):
        return None
    raw: dict[str, Any] = {}
    for key, values in (
        ("phase", PHASE),
        ("canaryRevision", REVISIONS),
        ("analysedRevision", REVISIONS),
        ("canaryWeight", st.integers(0, 100)),
    ):
        if draw(st.booleans()):
            raw[key] = draw(values)
    return raw


@settings(max_examples=2000)
@given(statuses())
def test_the_caps_count_agrees_with_the_status(raw: dict[str, Any] | None) -> None:
    assert wire_holds_slot(raw) == CanaryStatus.from_wire(raw).holds_slot


def test_who_holds_a_slot() -> None:
    taken_up = {"phase": "Progressing", "canaryRevision": "v1-a", "analysedRevision": "v1-a"}
    assert wire_holds_slot(taken_up)
    assert not wire_holds_slot({**taken_up, "phase": "Waiting", "analysedRevision": ""})
    assert not wire_holds_slot({**taken_up, "phase": "Succeeded"})
    assert not wire_holds_slot({**taken_up, "canaryRevision": "", "analysedRevision": ""})
    # A status without a phase reads as Initializing, which is active.
    assert wire_holds_slot({"canaryRevision": "v1-a", "analysedRevision": "v1-a"})
