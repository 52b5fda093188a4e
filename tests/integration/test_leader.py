"""Leader election over a Lease on the API stand-in, through the real kubernetes client.

Elections against an API server (one leader of two, takeover after expiry and after a release,
renewals while the start callback is blocked, a real 409 from a competing writer or from a write
that keeps the holder, the chart's RBAC, the Lease as kubectl shows it) are shown on a real
control plane in tests/cluster/test_leases.py. What stays here needs what a real API server
cannot be made to do:

- a fake clock: a Lease that expires, or a renew deadline that passes, exactly when the test
  moves time on, and not a moment earlier however long the test waits in real time;
- injected API errors: 500s on every Lease request for two retry periods (ridden out) or for
  good (the leader must stop before its Lease can expire for anyone else);
- no API server at all: the timing checks, the MicroTime format, and ``--no-leader-elect``, which
  must not touch a Lease (the stand-in's request log shows it).

Durations are short (a 3-4 s lease, 1.8 s renew deadline, 0.3 s retry) so each scenario takes
seconds; bounds on time are one-sided or generous, since these machines are noisy.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from analyzer.leader import (
    AlwaysLeader,
    LeaseElector,
    format_micro_time,
    parse_micro_time,
)
from tests.standin import StandIn

NAMESPACE = "perch"
LEASE = "perch-analyzer"


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
    ) -> None:
        self.started: list[float] = []
        self.stopped: list[float] = []
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

    def _stopped(self) -> None:
        self.stopped.append(time.monotonic())

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


def test_a_dead_leader_is_replaced_when_its_lease_expires_on_the_candidates_clock(
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
