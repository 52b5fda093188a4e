"""Leader election on a real API server, as the analyzer's ServiceAccount.

What only a real API server shows: the chart's RBAC for the Lease (create, and get/update on the
name ``analyzer.leaseName`` only), a real 409 when someone else wrote the Lease since the
elector read it, a real 409 AlreadyExists between candidates creating it at once, and the Lease
as ``kubectl`` shows it.

The chart grants get/update on one Lease name, so every test uses that Lease (``perch-analyzer``
in the release namespace) in turn: each starts and ends with no Lease (deleted with the admin
client). Each candidate has an ApiClient of its own, as separate analyzer pods would. Durations
are short (a 5 s lease, 3 s renew deadline, 0.5 s retry period); the bounds on time are one-sided
or generous, since this machine is shared and noisy. Scenarios that need a fake clock or
injected API errors stay on the API stand-in (tests/integration/test_leader.py).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml
from kubernetes import client

from analyzer.leader import LEASES, LeaseElector, format_micro_time, parse_micro_time
from perch.kube import load_api_client
from perch.resources import Kube
from tests.support import controlplane
from tests.support.install import Installed
from tests.support.kubelet import wait_for

pytestmark = pytest.mark.cluster

LEASE = "perch-analyzer"  # the chart's analyzer.leaseName
LEASE_SECONDS = 5
RENEW_DEADLINE = 3.0
RETRY_PERIOD = 0.5
MICRO_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
# What client-go's LeaseLock writes into a Lease's spec (without coordinated leader election).
CLIENT_GO_FIELDS = {
    "holderIdentity",
    "leaseDurationSeconds",
    "acquireTime",
    "renewTime",
    "leaseTransitions",
}


def holds_for(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not condition():
            return False
        time.sleep(0.02)
    return True


class Candidate:
    """An elector with a client of its own and a record of its callbacks, as the analyzer
    wires it."""

    def __init__(
        self,
        kubeconfig: str,
        namespace: str,
        identity: str,
        *,
        name: str = LEASE,
        lease_duration: int = LEASE_SECONDS,
        renew_deadline: float = RENEW_DEADLINE,
        on_started: Callable[[], None] | None = None,
    ) -> None:
        self.started: list[float] = []
        self.stopped: list[float] = []
        self._on_started = on_started
        self.elector = LeaseElector(
            load_api_client(kubeconfig),
            namespace=namespace,
            name=name,
            identity=identity,
            lease_duration=lease_duration,
            renew_deadline=renew_deadline,
            retry_period=RETRY_PERIOD,
            on_started_leading=self._started,
            on_stopped_leading=self._stopped,
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
def lease_ns(installed: Installed) -> str:
    return installed.release.namespace


@pytest.fixture
def admin(api: client.ApiClient) -> Kube:
    return Kube(api, timeout=30.0)


@pytest.fixture
def no_lease(admin: Kube, lease_ns: str) -> Iterator[None]:
    """No Lease before the test (another test's analyzer may have left one) nor after it."""
    admin.delete(LEASES, lease_ns, LEASE)
    yield
    admin.delete(LEASES, lease_ns, LEASE)


@pytest.fixture
def candidates(
    installed: Installed, lease_ns: str, no_lease: None
) -> Iterator[Callable[..., Candidate]]:
    made: list[Candidate] = []

    def make(identity: str, **kwargs: Any) -> Candidate:
        candidate = Candidate(str(installed.analyzer.kubeconfig), lease_ns, identity, **kwargs)
        made.append(candidate)
        candidate.elector.start()
        return candidate

    yield make
    for candidate in made:
        candidate.elector.stop(release=False)


def read_lease(admin: Kube, namespace: str) -> dict[str, Any]:
    found = admin.get(LEASES, namespace, LEASE)
    assert found is not None, "no Lease"
    return found


def lease_requests(
    plane: controlplane.ControlPlane, installed: Installed, since: float, *, name: str = LEASE
) -> list[dict[str, Any]] | None:
    """The analyzer's completed requests on the Lease since `since`; None without an audit log."""
    if plane.audit_log is None:
        return None
    return [
        e
        for e in plane.audit_events()
        if e.get("user", {}).get("username") == installed.analyzer.username
        and e.get("objectRef", {}).get("resource") == "leases"
        and e["objectRef"].get("name") == name
        and (parse_micro_time(e.get("requestReceivedTimestamp")) or 0) >= since
    ]


def codes(requests: list[dict[str, Any]] | None, verb: str) -> list[int]:
    return [e["responseStatus"]["code"] for e in requests or [] if e["verb"] == verb]


def test_two_candidates_exactly_one_leads(
    candidates: Callable[..., Candidate], admin: Kube, lease_ns: str
) -> None:
    a, b = candidates("analyzer-a"), candidates("analyzer-b")
    wait_for(lambda: a.started or b.started, what="a leader")
    assert holds_for(lambda: a.leads() != b.leads(), 2.0), "both or neither led"
    leader, other = (a, b) if a.leads() else (b, a)
    assert len(leader.started) == 1
    assert not other.started and not a.stopped and not b.stopped
    assert other.elector.api_calls > 0  # the other one campaigned, and was told no

    spec = read_lease(admin, lease_ns)["spec"]
    assert spec["holderIdentity"] == leader.identity
    assert spec["leaseDurationSeconds"] == LEASE_SECONDS
    assert spec["leaseTransitions"] == 0
    # The leader renews every retry period, keeping the acquireTime of its term.
    first = parse_micro_time(spec["renewTime"])
    assert first is not None
    wait_for(
        lambda: (parse_micro_time(read_lease(admin, lease_ns)["spec"]["renewTime"]) or 0) > first,
        what="a renewal",
    )
    assert read_lease(admin, lease_ns)["spec"]["acquireTime"] == spec["acquireTime"]


def test_a_dead_leader_is_replaced_only_after_its_lease_expires(
    candidates: Callable[..., Candidate], admin: Kube, lease_ns: str
) -> None:
    a = candidates("analyzer-a")
    wait_for(a.leads, what="a to lead")
    b = candidates("analyzer-b")
    wait_for(lambda: b.elector.api_calls > 0, what="b to read the Lease")

    killed = time.monotonic()
    a.elector.stop(release=False)  # as a crash would: the Lease still names a
    assert read_lease(admin, lease_ns)["spec"]["holderIdentity"] == "analyzer-a"
    wait_for(lambda: b.started, what="b to take over", deadline=LEASE_SECONDS + 20)
    # b counts the lease from the last change it saw: a's last renewal, at most one retry period
    # (and a request) before the kill. Anything much sooner would be two leaders at once.
    assert b.started[0] - killed >= LEASE_SECONDS - RETRY_PERIOD - 1.0
    spec = read_lease(admin, lease_ns)["spec"]
    assert spec["holderIdentity"] == "analyzer-b"
    assert spec["leaseTransitions"] == 1


def test_a_released_lease_is_taken_over_at_once(
    candidates: Callable[..., Candidate], admin: Kube, lease_ns: str
) -> None:
    # A long lease: a takeover well before 15 s can only come from the release.
    a = candidates("analyzer-a", lease_duration=15, renew_deadline=10)
    wait_for(a.leads, what="a to lead")
    b = candidates("analyzer-b", lease_duration=15, renew_deadline=10)
    wait_for(lambda: b.elector.api_calls > 0, what="b to read the Lease")
    assert not b.leads()

    released = time.monotonic()
    a.elector.stop(release=True)
    assert a.stopped and not a.leads()
    wait_for(lambda: b.started, what="b to take over")
    assert b.started[0] - released < 7.5
    assert a.stopped[0] < b.started[0]  # a stopped its work before it gave the Lease up
    spec = read_lease(admin, lease_ns)["spec"]
    assert spec["holderIdentity"] == "analyzer-b"
    assert spec["leaseTransitions"] == 1


def test_renewal_goes_on_while_the_start_callback_is_blocked(
    candidates: Callable[..., Candidate], admin: Kube, lease_ns: str
) -> None:
    unblock = threading.Event()
    a = candidates("analyzer-a", on_started=lambda: unblock.wait(60))
    wait_for(a.leads, what="a to lead")
    b = candidates("analyzer-b")
    first = parse_micro_time(read_lease(admin, lease_ns)["spec"]["renewTime"]) or 0.0

    # The start callback (a first resync of many canaries, say) stays blocked for longer than
    # the lease lasts; the Lease is renewed all along, so b never takes it.
    def renewed_past_a_lease() -> bool:
        renewed = parse_micro_time(read_lease(admin, lease_ns)["spec"]["renewTime"]) or 0.0
        return renewed - first > LEASE_SECONDS + 1

    wait_for(renewed_past_a_lease, what="renewals spanning a whole lease", deadline=30)
    unblock.set()
    assert a.leads() and not b.leads()
    assert not a.stopped and not b.started
    assert b.elector.api_calls > 0
    assert read_lease(admin, lease_ns)["spec"]["holderIdentity"] == "analyzer-a"


def test_a_competing_writer_deposes_the_leader_through_a_409(
    plane: controlplane.ControlPlane,
    installed: Installed,
    candidates: Callable[..., Candidate],
    admin: Kube,
    lease_ns: str,
) -> None:
    # A long renew deadline: stopping within a few seconds can only come from seeing the holder.
    a = candidates("analyzer-a", lease_duration=15, renew_deadline=10)
    wait_for(a.leads, what="a to lead")

    # Another elector (here: the test, as admin) takes the Lease with a write of its own.
    since = time.time()
    current = read_lease(admin, lease_ns)
    current["spec"].update(
        holderIdentity="intruder",
        leaseDurationSeconds=30,
        renewTime=format_micro_time(time.time()),
    )
    admin.replace(LEASES, lease_ns, LEASE, current)

    wait_for(lambda: a.stopped, what="a to stop leading", deadline=8)
    assert not a.leads()
    requests = lease_requests(plane, installed, since)
    if requests is not None:
        assert 409 in codes(requests, "update"), "a's renewal should have met a 409"
    # The intruder's Lease is valid for 30 s: a stays a candidate and does not take it back.
    assert holds_for(lambda: not a.leads(), 1.5)
    assert len(a.started) == 1
    assert read_lease(admin, lease_ns)["spec"]["holderIdentity"] == "intruder"


def test_a_write_that_keeps_the_holder_costs_a_409_but_not_the_lease(
    plane: controlplane.ControlPlane,
    installed: Installed,
    candidates: Callable[..., Candidate],
    admin: Kube,
    lease_ns: str,
) -> None:
    a = candidates("analyzer-a")
    wait_for(a.leads, what="a to lead")
    since = time.time()
    # Someone labels the Lease: its resourceVersion changes, its holder does not.
    plane.kubectl("label", "lease", LEASE, "-n", lease_ns, "team=platform")
    labelled = read_lease(admin, lease_ns)
    renewed = parse_micro_time(labelled["spec"]["renewTime"]) or 0.0

    wait_for(
        lambda: (parse_micro_time(read_lease(admin, lease_ns)["spec"]["renewTime"]) or 0) > renewed,
        what="a renewal after the label",
    )
    requests = lease_requests(plane, installed, since)
    if requests is not None:
        assert 409 in codes(requests, "update"), "the first renewal after the label meets a 409"
    assert holds_for(a.leads, 1.0)
    assert not a.stopped
    lease = read_lease(admin, lease_ns)
    assert lease["spec"]["holderIdentity"] == "analyzer-a"
    assert lease["metadata"]["labels"] == {"team": "platform"}  # renewals keep others' fields


def test_kubectl_shows_the_lease_as_client_go_writes_it(
    plane: controlplane.ControlPlane,
    installed: Installed,
    candidates: Callable[..., Candidate],
    lease_ns: str,
) -> None:
    def kubectl_lease() -> dict[str, Any]:
        # As the analyzer's own account: the chart lets it read its Lease.
        shown = plane.kubectl(
            "get",
            "lease",
            LEASE,
            "-n",
            lease_ns,
            "-o",
            "yaml",
            kubeconfig=installed.analyzer.kubeconfig,
        )
        return yaml.safe_load(shown.stdout)  # type: ignore[no-any-return]

    a = candidates("analyzer-a")
    wait_for(a.leads, what="a to lead")
    spec = kubectl_lease()["spec"]
    assert set(spec) == CLIENT_GO_FIELDS
    assert spec["holderIdentity"] == "analyzer-a"
    assert spec["leaseDurationSeconds"] == LEASE_SECONDS
    assert spec["leaseTransitions"] == 0
    assert MICRO_TIME.match(spec["acquireTime"]) and MICRO_TIME.match(spec["renewTime"])
    # The table's HOLDER column (by name: the chart grants get on this Lease, not list).
    table = plane.kubectl(
        "get", "lease", LEASE, "-n", lease_ns, kubeconfig=installed.analyzer.kubeconfig
    )
    assert re.search(rf"^{LEASE}\s+analyzer-a\s", table.stdout, re.MULTILINE), table.stdout

    # Handed over: a new term, one more transition.
    b = candidates("analyzer-b")
    a.elector.stop(release=True)
    wait_for(b.leads, what="b to take over")
    spec = kubectl_lease()["spec"]
    assert spec["holderIdentity"] == "analyzer-b"
    assert spec["leaseTransitions"] == 1

    # Released as client-go releases: no holder, a one-second duration, transitions kept.
    b.elector.stop(release=True)
    spec = kubectl_lease()["spec"]
    assert set(spec) == CLIENT_GO_FIELDS
    assert spec["holderIdentity"] == ""
    assert spec["leaseDurationSeconds"] == 1
    assert spec["leaseTransitions"] == 1
    assert spec["acquireTime"] == spec["renewTime"]
    assert MICRO_TIME.match(spec["renewTime"])


def test_the_chart_lets_the_analyzer_elect_only_on_its_own_lease_name(
    plane: controlplane.ControlPlane,
    installed: Installed,
    candidates: Callable[..., Candidate],
    admin: Kube,
    lease_ns: str,
) -> None:
    # An analyzer started with --lease-name other than the chart's analyzer.leaseName.
    since = time.time()
    stray = candidates("analyzer-a", name="perch-analyzer-other")
    requests: list[dict[str, Any]] | None = None
    if plane.audit_log is not None:
        requests = wait_for(
            lambda: lease_requests(plane, installed, since, name="perch-analyzer-other"),
            what="the stray elector's requests",
        )
        assert set(codes(requests, "get")) == {403}
    assert holds_for(lambda: not stray.leads(), 1.0)
    assert not stray.started
    assert admin.get(LEASES, lease_ns, "perch-analyzer-other") is None
