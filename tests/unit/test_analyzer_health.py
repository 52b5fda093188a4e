"""The analyzer's liveness: the rule /healthz applies, the stamps it reads, and the endpoint."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import requests
from apscheduler.events import EVENT_JOB_MISSED, JobExecutionEvent
from kubernetes import client
from prometheus_client import CollectorRegistry

from analyzer.cache import Kind, Listener, WatchCache
from analyzer.http import STALE_RESYNC_PERIODS, liveness_problem, serve
from analyzer.scheduler import RESYNC_JOB_ID, CanaryScheduler
from tests.seed import podinfo
from tests.standin import StandIn

RESYNC = 30.0


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# --- the rule ------------------------------------------------------------------------------------


def problem(
    *,
    cache_alive: bool = True,
    leading_since: float | None = None,
    last_resync: float | None = None,
    now: float = 10_000.0,
) -> str | None:
    return liveness_problem(
        cache_alive=cache_alive,
        leading_since=leading_since,
        last_resync=last_resync,
        resync_seconds=RESYNC,
        now=now,
    )


STALE = STALE_RESYNC_PERIODS * RESYNC + 1


def test_a_leader_whose_resync_ran_lately_is_healthy() -> None:
    assert problem(leading_since=1_000.0, last_resync=10_000.0 - RESYNC) is None
    # Two missed periods are load, not death.
    assert problem(leading_since=1_000.0, last_resync=10_000.0 - 2.5 * RESYNC) is None


def test_a_leader_whose_resync_is_stale_is_unhealthy() -> None:
    reason = problem(leading_since=1_000.0, last_resync=10_000.0 - STALE)
    assert reason is not None
    assert reason.startswith("scheduler: no resync for 91s while leading")
    assert "\n" not in reason


def test_a_leader_whose_scheduler_never_resynced_is_unhealthy_after_the_allowance() -> None:
    assert problem(leading_since=10_000.0 - 5) is None
    assert problem(leading_since=10_000.0 - STALE) is not None


def test_a_new_term_is_not_judged_by_the_previous_terms_stamp() -> None:
    assert problem(leading_since=10_000.0 - 1, last_resync=10_000.0 - 10 * STALE) is None


def test_a_standby_is_healthy_while_its_cache_is_alive() -> None:
    assert problem(leading_since=None, last_resync=10_000.0 - 10 * STALE) is None
    assert problem(leading_since=None, last_resync=None) is None


@pytest.mark.parametrize("leading_since", [None, 10_000.0 - 1])
def test_a_dead_cache_is_unhealthy_leader_or_not(leading_since: float | None) -> None:
    reason = problem(cache_alive=False, leading_since=leading_since, last_resync=10_000.0)
    assert reason == "watch cache: a list+watch thread has ended"


# --- the stamps ----------------------------------------------------------------------------------


def test_cache_is_alive_while_its_threads_run(standin: StandIn) -> None:
    cache = WatchCache(standin.api_client(), namespaces=["test"], backoff_initial=0.01)
    assert cache.alive()  # nothing has ended before start
    cache.start()
    try:
        assert cache.wait_synced(10)
        assert cache.alive()
    finally:
        cache.stop()
    assert not cache.alive()


class Fatal(BaseException):
    """Not an Exception: the cache's loop does not catch it, as it would not catch a bug of its
    own error handling."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_cache_is_dead_once_a_thread_ended_on_an_uncaught_error(standin: StandIn) -> None:
    dep = podinfo(uid=None)
    for key in ("resourceVersion", "generation"):
        dep["metadata"].pop(key, None)
    client.AppsV1Api(standin.api_client()).create_namespaced_deployment("test", dep)

    def keep(obj: Any) -> bool:
        raise Fatal

    cache = WatchCache(standin.api_client(), namespaces=["test"], keep_deployment=keep)
    cache.start()
    try:
        wait_until(lambda: not cache.alive())
        reason = liveness_problem(
            cache_alive=cache.alive(),
            leading_since=None,
            last_resync=None,
            resync_seconds=RESYNC,
            now=time.monotonic(),
        )
        assert reason is not None and "watch cache" in reason
    finally:
        cache.stop()


class StubCache:
    """One canary, always synced, and no change ever (the scheduler only reads it)."""

    def __init__(self) -> None:
        self.canary = {"metadata": {"namespace": "test", "name": "podinfo"}}

    def get(self, namespace: str, name: str, *, kind: Kind = "Canary") -> dict[str, Any] | None:
        return self.canary if kind == "Canary" else None

    def items(self, kind: Kind = "Canary") -> list[dict[str, Any]]:
        return [self.canary] if kind == "Canary" else []

    def synced(self) -> bool:
        return True

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        return lambda: None


@pytest.fixture
def blocked_tick() -> Iterator[threading.Event]:
    release = threading.Event()
    yield release
    release.set()


def test_a_leader_whose_only_worker_is_stuck_goes_stale(blocked_tick: threading.Event) -> None:
    resync = 0.2
    ticking = threading.Event()

    def tick(namespace: str, name: str) -> None:
        ticking.set()
        blocked_tick.wait(30)

    scheduler = CanaryScheduler(
        cache=StubCache(),
        tick=tick,
        interval_for=lambda obj: 0.05,
        resync_seconds=resync,
        max_workers=1,
    )
    assert scheduler.last_resync() is None
    leading_since = time.monotonic()
    scheduler.start()
    try:
        started = scheduler.last_resync()
        assert started is not None and started >= leading_since  # start() resyncs at once
        assert ticking.wait(5)
        stamped = scheduler.last_resync()

        def reason() -> str | None:
            return liveness_problem(
                cache_alive=True,
                leading_since=leading_since,
                last_resync=scheduler.last_resync(),
                resync_seconds=resync,
                now=time.monotonic(),
            )

        # The one worker is held by the tick: the resync job cannot run, and the stamp ages.
        wait_until(lambda: reason() is not None)
        assert scheduler.last_resync() == stamped
        blocked_tick.set()
        wait_until(lambda: reason() is None)
        assert scheduler.last_resync() != stamped
    finally:
        scheduler.close()


def test_a_resync_turned_away_as_late_still_stamps() -> None:
    scheduler = CanaryScheduler(
        cache=StubCache(), tick=lambda ns, n: None, interval_for=lambda o: None
    )
    before = time.monotonic()
    # What APScheduler's worker reports when it takes the resync up after its grace time: the
    # pool is busy, which a restart would not cure.
    scheduler._on_job_event(  # the listener APScheduler calls
        JobExecutionEvent(EVENT_JOB_MISSED, RESYNC_JOB_ID, "default", datetime.now(UTC))
    )
    stamped = scheduler.last_resync()
    assert stamped is not None and stamped >= before
    scheduler.close()


# --- the endpoint --------------------------------------------------------------------------------


class Health:
    def __init__(self) -> None:
        self.problem: str | None = None
        self.ready = False
        self.fail: Exception | None = None

    def live(self) -> str | None:
        if self.fail is not None:
            raise self.fail
        return self.problem


@pytest.fixture
def endpoint() -> Iterator[tuple[str, Health]]:
    health = Health()
    server = serve(
        host="127.0.0.1",
        port=0,
        registry=CollectorRegistry(),
        ready=lambda: health.ready,
        live=health.live,
    )
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", health
    finally:
        server.shutdown()
        server.server_close()


def test_healthz_follows_the_liveness_callback(endpoint: tuple[str, Health]) -> None:
    base, health = endpoint
    ok = requests.get(f"{base}/healthz", timeout=5)
    assert (ok.status_code, ok.text) == (200, "ok\n")

    health.problem = "scheduler: no resync for 95s while leading\n(second line)"
    failed = requests.get(f"{base}/healthz", timeout=5)
    assert failed.status_code == 503
    assert failed.text == "scheduler: no resync for 95s while leading (second line)\n"

    health.problem = None
    assert requests.get(f"{base}/healthz", timeout=5).status_code == 200


def test_healthz_fails_with_a_reason_when_the_callback_raises(
    endpoint: tuple[str, Health],
) -> None:
    base, health = endpoint
    health.fail = RuntimeError("boom")
    failed = requests.get(f"{base}/healthz", timeout=5)
    assert failed.status_code == 503
    assert failed.text == "health check failed: RuntimeError('boom')\n"


def test_readyz_is_the_cache_being_synced_whatever_the_liveness(
    endpoint: tuple[str, Health],
) -> None:
    base, health = endpoint
    health.problem = "watch cache: a list+watch thread has ended"
    assert requests.get(f"{base}/readyz", timeout=5).status_code == 503
    health.ready = True
    assert requests.get(f"{base}/readyz", timeout=5).status_code == 200
    assert requests.get(f"{base}/healthz", timeout=5).status_code == 503
