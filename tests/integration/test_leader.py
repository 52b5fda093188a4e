"""Leader election over a Lease on the API stand-in, through the real kubernetes client.

Durations are short (a 3 s lease, 1.8 s renew deadline, 0.3 s retry) so each scenario takes
seconds; bounds on time are one-sided or generous, since these machines are noisy.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from analyzer.leader import (
    LEASES,
    AlwaysLeader,
    LeaseElector,
    format_micro_time,
    parse_micro_time,
)
from perch.resources import Kube
from tests.standin import StandIn

NAMESPACE = "perch"
LEASE = "perch-analyzer"
MICRO_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> float:
    """Seconds it took; fails the test after ``timeout``."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, "timed out"
        time.sleep(0.01)
    return time.monotonic() - start


def holds_for(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not condition():
            return False
        time.sleep(0.01)
    return True


class FakeClock:
    """Wall-clock seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = time.time()
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


class Candidate:
    """An elector plus a record of its callbacks, as the analyzer would wire it."""

    def __init__(
        self,
        standin: StandIn,
        identity: str,
        *,
        lease_duration: int = 3,
        renew_deadline: float = 1.8,
        retry_period: float = 0.3,
        clock: Callable[[], float] = time.time,
        on_started: Callable[[], None] | None = None,
    ) -> None:
        self.started: list[float] = []
        self.stopped: list[float] = []
        self._on_started = on_started
        self.elector = LeaseElector(
            standin.api_client(),
            namespace=NAMESPACE,
            name=LEASE,
            identity=identity,
            lease_duration=lease_duration,
            renew_deadline=renew_deadline,
            retry_period=retry_period,
            on_started_leading=self._started,
            on_stopped_leading=self._stopped,
            clock=clock,
        )

    def _started(self) -> None:
        self.started.append(time.monotonic())
        if self._on_started is not None:
            self._on_started()

    def _stopped(self) -> None:
        self.stopped.append(time.monotonic())

    @property
    def identity(self) -> str:
        return self.elector.identity

    def leads(self) -> bool:
        return self.elector.is_leader()


@pytest.fixture
def candidates(standin: StandIn) -> Iterator[Callable[..., Candidate]]:
    made: list[Candidate] = []

    def make(identity: str, **kwargs: Any) -> Candidate:
        candidate = Candidate(standin, identity, **kwargs)
        made.append(candidate)
        candidate.elector.start()
        return candidate

    yield make
    for candidate in made:
        candidate.elector.stop(release=False)


def lease(standin: StandIn) -> dict[str, Any]:
    return standin.objects("leases")[("leases", NAMESPACE, LEASE)]


def lease_updates(standin: StandIn, status: int | None = None) -> list[Any]:
    return [
        c
        for c in standin.calls()
        if c.resource == "leases" and c.verb == "update" and status in (None, c.status)
    ]


def test_micro_time_is_what_the_api_expects() -> None:
    assert format_micro_time(1795694400.25) == "2026-11-26T12:00:00.250000Z"
    assert parse_micro_time("2026-11-26T12:00:00.250000Z") == 1795694400.25
    assert parse_micro_time("2026-11-26T12:00:00Z") == 1795694400.0
    assert parse_micro_time("") is None
    assert parse_micro_time("yesterday") is None


def test_electors_refuse_timings_that_could_give_two_leaders(standin: StandIn) -> None:
    api = standin.api_client()
    with pytest.raises(ValueError, match="renew_deadline"):
        LeaseElector(api, namespace=NAMESPACE, lease_duration=2, renew_deadline=2.0)
    with pytest.raises(ValueError, match="retry_period"):
        LeaseElector(
            api, namespace=NAMESPACE, lease_duration=2, renew_deadline=1.0, retry_period=0.9
        )
    with pytest.raises(ValueError, match="whole number"):
        LeaseElector(api, namespace=NAMESPACE, lease_duration=1.5)  # type: ignore[arg-type]


def test_two_candidates_exactly_one_leads(standin: StandIn, candidates) -> None:
    a, b = candidates("analyzer-a"), candidates("analyzer-b")
    wait_until(lambda: bool(a.started or b.started))
    assert holds_for(lambda: a.leads() != b.leads(), 2.0), "both or neither led"
    leader = a if a.leads() else b
    assert len(leader.started) == 1
    assert not a.stopped and not b.stopped
    assert len((b if leader is a else a).started) == 0

    spec = lease(standin)["spec"]
    assert spec["holderIdentity"] == leader.identity
    assert spec["leaseDurationSeconds"] == 3
    assert spec["leaseTransitions"] == 0
    assert MICRO_TIME.match(spec["renewTime"]) and MICRO_TIME.match(spec["acquireTime"])
    # The leader renews (every retry period), keeping its acquireTime.
    first_renewal = parse_micro_time(spec["renewTime"])
    assert first_renewal is not None
    wait_until(lambda: (parse_micro_time(lease(standin)["spec"]["renewTime"]) or 0) > first_renewal)
    assert lease(standin)["spec"]["acquireTime"] == spec["acquireTime"]
    # Every write was conditional on the version read: creates, or updates carrying it.
    for call in lease_updates(standin):
        assert call.body["metadata"]["resourceVersion"]


def test_a_dead_leader_is_replaced_only_after_its_lease_expires(
    standin: StandIn, candidates
) -> None:
    clock = FakeClock()
    a = candidates("analyzer-a", clock=clock)
    wait_until(a.leads)
    b = candidates("analyzer-b", clock=clock)
    wait_until(lambda: any(c.verb == "get" and c.resource == "leases" for c in standin.calls()))

    a.elector.stop(release=False)  # as a crash would: the Lease still names a
    assert lease(standin)["spec"]["holderIdentity"] == "analyzer-a"
    # However long b waits in real time, the lease has not expired on its clock.
    assert holds_for(lambda: not b.leads(), 1.0)
    clock.advance(2.5)
    assert holds_for(lambda: not b.leads(), 1.0), "took over before leaseDurationSeconds"
    clock.advance(1.0)
    wait_until(lambda: bool(b.started))

    spec = lease(standin)["spec"]
    assert spec["holderIdentity"] == "analyzer-b"
    assert spec["leaseTransitions"] == 1
    assert spec["acquireTime"] == format_micro_time(clock())


def test_a_dead_leader_is_replaced_in_real_time(standin: StandIn, candidates) -> None:
    a = candidates("analyzer-a")
    wait_until(a.leads)
    b = candidates("analyzer-b")
    time.sleep(0.5)  # b has seen the lease
    a.elector.stop(release=False)
    killed = time.monotonic()
    wait_until(lambda: bool(b.started))
    # b counts expiry from its last sight of a change, at most one jittered retry before the kill.
    assert b.started[0] - killed >= 3 - 0.3 * 1.2 - 0.05


def test_a_released_lease_is_taken_over_at_once(standin: StandIn, candidates) -> None:
    # A long lease: a takeover well before 15 s can only come from the release.
    a = candidates("analyzer-a", lease_duration=15)
    wait_until(a.leads)
    b = candidates("analyzer-b", lease_duration=15)
    time.sleep(0.5)
    assert not b.leads()

    a.elector.stop(release=True)
    assert a.stopped and not a.leads()
    took = wait_until(lambda: bool(b.started))
    assert took < 7.5
    # a stopped its work before it gave the lease up.
    assert a.stopped[0] < b.started[0]
    released = [c for c in lease_updates(standin, 200) if c.body["spec"]["holderIdentity"] == ""]
    assert len(released) == 1
    assert released[0].body["spec"]["leaseDurationSeconds"] == 1
    spec = lease(standin)["spec"]
    assert spec["holderIdentity"] == "analyzer-b"
    assert spec["leaseTransitions"] == 1


def test_renewal_runs_on_its_own_thread_while_the_rest_is_blocked(
    standin: StandIn, candidates
) -> None:
    unblock = threading.Event()
    a = candidates("analyzer-a", on_started=lambda: unblock.wait(10))
    wait_until(a.leads)
    b = candidates("analyzer-b")
    before = len(lease_updates(standin, 200))

    # The start callback is still blocked, and so is the test's own thread, for longer than
    # the lease lasts: the lease must not change hands.
    time.sleep(4.0)
    unblock.set()

    assert a.leads() and not b.leads()
    assert not a.stopped and not b.started
    assert lease(standin)["spec"]["holderIdentity"] == "analyzer-a"
    assert len(lease_updates(standin, 200)) - before >= 5


def test_a_competing_writer_deposes_the_leader_through_a_409(standin: StandIn, candidates) -> None:
    # A long renew deadline: stopping within a few seconds can only come from seeing the holder.
    a = candidates("analyzer-a", lease_duration=15, renew_deadline=10)
    wait_until(a.leads)

    # Another elector (here: the test) takes the lease with a conditional write of its own.
    kube = Kube(standin.api_client())
    current = kube.get(LEASES, NAMESPACE, LEASE)
    assert current is not None
    current["spec"].update(
        holderIdentity="intruder",
        leaseDurationSeconds=30,
        renewTime=format_micro_time(time.time()),
    )
    kube.replace(LEASES, NAMESPACE, LEASE, current)

    wait_until(lambda: bool(a.stopped), timeout=5)
    assert not a.leads()
    assert lease_updates(standin, 409), "a's renewal should have met a 409"
    # The intruder's lease is valid for 30 s: a stays a candidate and does not take it back.
    assert holds_for(lambda: not a.leads(), 1.0)
    assert len(a.started) == 1
    assert lease(standin)["spec"]["holderIdentity"] == "intruder"


def test_a_409_that_leaves_the_holder_unchanged_keeps_the_lease(
    standin: StandIn, candidates
) -> None:
    a = candidates("analyzer-a")
    wait_until(a.leads)
    standin.fail("update", "leases", status=409, times=1)
    wait_until(lambda: bool(lease_updates(standin, 409)))
    assert holds_for(a.leads, 1.0)
    assert not a.stopped
    assert lease(standin)["spec"]["holderIdentity"] == "analyzer-a"


def test_a_short_api_outage_is_ridden_out(standin: StandIn, candidates) -> None:
    a = candidates("analyzer-a", lease_duration=4)
    wait_until(a.leads)
    standin.fail("*", "leases", status=500, times=2)  # two retry periods, under the deadline
    assert holds_for(a.leads, 1.5)
    assert not a.stopped


def test_renewals_failing_past_the_deadline_stop_the_leader_before_the_lease_expires(
    standin: StandIn, candidates
) -> None:
    a = candidates("analyzer-a", lease_duration=4)
    wait_until(a.leads)
    standin.fail("*", "leases", status=500, times=None)
    outage = time.monotonic()
    wait_until(lambda: bool(a.stopped))
    assert not a.leads()
    # The point of the deadline: a stops before a standby could see the lease expire (4 s after
    # the last renewal, which came before the outage began).
    assert a.stopped[0] - outage < 4.0
    # ... and not at the first failed renewal.
    assert a.stopped[0] - outage >= 1.8 - 0.3
    assert holds_for(lambda: not a.leads(), 1.0)


def test_renew_deadline_is_measured_on_the_given_clock(standin: StandIn, candidates) -> None:
    clock = FakeClock()
    a = candidates("analyzer-a", lease_duration=4, clock=clock)
    wait_until(a.leads)
    standin.fail("*", "leases", status=500, times=None)
    # Time stands still: every renewal fails, yet the deadline has not passed.
    assert holds_for(a.leads, 1.0)
    clock.advance(1.9)
    wait_until(lambda: bool(a.stopped))
    assert not a.leads()


def test_without_leader_election_the_analyzer_always_leads(standin: StandIn) -> None:
    started, stopped = threading.Event(), threading.Event()
    always = AlwaysLeader(on_started_leading=started.set, on_stopped_leading=stopped.set)
    always.start()
    assert always.is_leader()
    assert started.wait(5)
    always.stop()
    assert stopped.is_set() and not always.is_leader()
    assert not [c for c in standin.calls() if c.resource == "leases"]
