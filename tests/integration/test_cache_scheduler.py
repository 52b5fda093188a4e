"""The APScheduler wiring, and what of the watch cache a real API server cannot be made to do,
on the API stand-in over HTTP.

The watch cache's behaviour against an API server (lists and watches, resourceVersions, watches
the server ends, 410 after an API server restart, connections cut, RBAC, copies, stop) is shown on
a real control plane in tests/cluster/test_watch_cache.py. What stays here, and why:

- the cache's answer to API errors that only the stand-in can inject: a list failing with 500
  several times in a row, and a server answering 410 to every watch (a real one answers 410 once,
  and the watch from the fresh list succeeds);
- the scheduler tests: they use the stand-in only as a source of Canary and Deployment objects
  for a real WatchCache to follow. What they show (jobs, intervals, pauses, overlaps, resyncs)
  does not depend on how an API server behaves, and a stand-in per test keeps them fast and
  independent.

Intervals are 0.2-0.5 s; assertions count ticks with generous bounds and never pin timings.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest
from prometheus_client import generate_latest

from analyzer.cache import WatchCache
from analyzer.scheduler import RESYNC_JOB_ID, CanaryScheduler
from analyzer.telemetry import Telemetry
from perch.names import LABEL_MANAGED_BY, LABEL_TRACK, MANAGED_BY_VALUE, TRACK_CANARY
from perch.resources import CANARIES, DEPLOYMENTS, Kube
from tests.standin import StandIn

NS = "test"
INTERVAL = "test.perch.dev/interval"  # the tests' stand-in for the spec's analysis.interval


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def holds_for(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not condition():
            return False
        time.sleep(0.01)
    return True


def canary(name: str, interval: str | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "perch.dev/v1alpha1",
        "kind": "Canary",
        "metadata": {"name": name, "annotations": {INTERVAL: interval} if interval else {}},
        "spec": {"targetRef": {"name": name}},
    }


def deployment(
    name: str, *, annotations: dict[str, str] | None = None, labels: dict[str, str] | None = None
) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "annotations": annotations or {}, "labels": labels or {}},
        "spec": {
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "app", "image": "podinfo:1"}]},
            },
        },
    }


def interval_from_annotation(obj: Mapping[str, Any]) -> float | None:
    value = ((obj.get("metadata") or {}).get("annotations") or {}).get(INTERVAL)
    return None if value in (None, "none") else float(value)


def set_interval(kube: Kube, name: str, interval: str | None) -> None:
    kube.merge_patch(CANARIES, NS, name, {"metadata": {"annotations": {INTERVAL: interval}}})


class Ticks:
    """A tick function that records when each canary's ticks start and whether they overlap."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.starts: dict[str, list[float]] = {}
        self.running: dict[str, int] = {}
        self.max_running: dict[str, int] = {}
        self.sleep: dict[str, float] = {}  # how long a canary's ticks take
        self.sleep_once: dict[str, float] = {}  # ... or only its next tick

    def __call__(self, namespace: str, name: str) -> None:
        key = f"{namespace}/{name}"
        with self._lock:
            self.starts.setdefault(key, []).append(time.monotonic())
            self.running[key] = self.running.get(key, 0) + 1
            self.max_running[key] = max(self.max_running.get(key, 0), self.running[key])
            pause = self.sleep_once.pop(key, None) or self.sleep.get(key, 0.0)
        try:
            time.sleep(pause)
        finally:
            with self._lock:
                self.running[key] -= 1

    def count(self, key: str) -> int:
        with self._lock:
            return len(self.starts.get(key, []))

    def started_after(self, key: str, moment: float) -> list[float]:
        with self._lock:
            return [t for t in self.starts.get(key, []) if t > moment]


@pytest.fixture
def kube(standin: StandIn) -> Kube:
    return Kube(standin.api_client())


@pytest.fixture
def make_cache(standin: StandIn) -> Iterator[Callable[..., WatchCache]]:
    made: list[WatchCache] = []

    def make(**kwargs: Any) -> WatchCache:
        kwargs.setdefault("backoff_initial", 0.05)
        kwargs.setdefault("backoff_max", 0.4)
        cache = WatchCache(standin.api_client(), **kwargs)
        made.append(cache)
        return cache

    yield make
    for cache in made:
        cache.stop()


@pytest.fixture
def cache(make_cache) -> WatchCache:
    cache = make_cache()
    cache.start()
    assert cache.wait_synced(10)
    return cache


@pytest.fixture
def make_scheduler(cache: WatchCache) -> Iterator[Callable[..., tuple[CanaryScheduler, Ticks]]]:
    made: list[CanaryScheduler] = []

    def make(**kwargs: Any) -> tuple[CanaryScheduler, Ticks]:
        ticks = Ticks()
        kwargs.setdefault("interval_for", interval_from_annotation)
        scheduler = CanaryScheduler(cache=kwargs.pop("source", cache), tick=ticks, **kwargs)
        made.append(scheduler)
        return scheduler, ticks

    yield make
    for scheduler in made:
        scheduler.close()


def calls(standin: StandIn, verb: str, resource: str) -> int:
    return sum(1 for c in standin.calls() if c.verb == verb and c.resource == resource)


# --- the cache: what a real API server cannot be made to do ------------------------------------


def test_cache_backs_off_and_retries_a_failing_list(standin: StandIn, make_cache) -> None:
    # Three 500s in a row from a list: injected, a real API server has no switch for it.
    standin.fail("list", "canaries", status=500, times=3)
    cache = make_cache()
    cache.start()
    assert cache.wait_synced(10)
    assert calls(standin, "list", "canaries") == 4
    assert cache.api_calls()["list"] == 5  # and one list of Deployments


def test_a_server_that_keeps_answering_410_is_met_with_the_backoff(
    standin: StandIn, kube: Kube, make_cache
) -> None:
    # A real API server answers 410 once, to a resourceVersion it no longer has, and the next
    # watch from a fresh list succeeds (tests/cluster/test_watch_cache.py); one that answers
    # 410 to every watch (a broken proxy, an etcd being restored) can only be injected.
    cache = make_cache(watch_timeout_seconds=1)
    cache.start()
    assert cache.wait_synced(10)
    lists = calls(standin, "list", "canaries")
    standin.fail("watch", "canaries", status=410, times=None)
    wait_until(lambda: calls(standin, "list", "canaries") >= lists + 3)  # re-listing each time

    # Changes still arrive, through the re-lists.
    kube.create(CANARIES, NS, canary("new"))
    wait_until(lambda: cache.get(NS, "new") is not None)
    # With the backoff (0.05-0.4 s here), not in a hot loop.
    lists = calls(standin, "list", "canaries")
    time.sleep(1.0)
    assert calls(standin, "list", "canaries") - lists <= 10


# --- the scheduler ----------------------------------------------------------------------------


def test_jobs_follow_canaries_appearing_changing_and_disappearing(
    kube: Kube, make_scheduler
) -> None:
    scheduler, ticks = make_scheduler()
    scheduler.start()
    kube.create(CANARIES, NS, canary("podinfo", "0.3"))
    wait_until(lambda: scheduler.jobs() == {"test/podinfo": 0.3})
    wait_until(lambda: ticks.count("test/podinfo") >= 3)

    set_interval(kube, "podinfo", "0.5")
    wait_until(lambda: scheduler.jobs() == {"test/podinfo": 0.5})

    set_interval(kube, "podinfo", "none")  # an idle phase: no job
    wait_until(lambda: scheduler.jobs() == {})
    time.sleep(0.1)  # a tick that had begun
    idle = ticks.count("test/podinfo")
    assert holds_for(lambda: ticks.count("test/podinfo") == idle, 1.0)

    set_interval(kube, "podinfo", "0.3")
    wait_until(lambda: ticks.count("test/podinfo") > idle)

    kube.delete(CANARIES, NS, "podinfo")
    wait_until(lambda: scheduler.jobs() == {})


def test_a_new_canary_ticks_at_once_then_at_its_interval(kube: Kube, make_scheduler) -> None:
    scheduler, ticks = make_scheduler()
    scheduler.start()
    kube.create(CANARIES, NS, canary("slowpoke", "30"))
    # A 30 s interval, and yet the first tick comes right away.
    wait_until(lambda: ticks.count("test/slowpoke") == 1)

    kube.create(CANARIES, NS, canary("podinfo", "0.2"))
    wait_until(lambda: ticks.count("test/podinfo") == 1)
    first = ticks.starts["test/podinfo"][0]
    time.sleep(2.0)
    ran = len(ticks.started_after("test/podinfo", first)) + 1
    assert 5 <= ran <= 13  # 11 at exactly 0.2 s
    assert ticks.count("test/slowpoke") == 1

    lags = scheduler.tick_lags()
    assert len(lags) >= 5
    # A tick never starts before its time, and one later than its misfire grace is dropped.
    assert all(-0.01 <= lag <= 1.1 for lag in lags)
    assert len(scheduler.tick_durations()) == len(lags)
    stats = scheduler.stats()
    assert stats.ticks == len(lags) and stats.errors == 0 and stats.jobs == 2


def test_a_slow_tick_never_overlaps_itself(kube: Kube, make_scheduler) -> None:
    scheduler, ticks = make_scheduler()
    ticks.sleep["test/podinfo"] = 1.0  # five intervals long
    scheduler.start()
    kube.create(CANARIES, NS, canary("podinfo", "0.2"))
    time.sleep(2.6)
    assert ticks.max_running["test/podinfo"] == 1
    assert 2 <= ticks.count("test/podinfo") <= 4
    assert scheduler.stats().skipped >= 3  # the runs that fell inside a running tick
    # and /metrics says so, as the analyzer exports it
    telemetry = Telemetry()
    telemetry.watch_dropped_ticks(scheduler.dropped_ticks)
    text = generate_latest(telemetry.registry).decode()
    overlapping = re.search(
        r'perch_analyzer_ticks_dropped_total\{reason="overlapping"\} (\S+)', text
    )
    assert overlapping and float(overlapping.group(1)) >= 3, text
    assert 'perch_analyzer_ticks_dropped_total{reason="late"} 0.0' in text, text


def test_runs_missed_during_a_pause_are_coalesced(kube: Kube, make_scheduler) -> None:
    scheduler, ticks = make_scheduler()
    scheduler.start()
    kube.create(CANARIES, NS, canary("podinfo", "0.2"))
    wait_until(lambda: ticks.count("test/podinfo") >= 2)

    scheduler.pause_all()
    paused = time.monotonic()
    time.sleep(0.1)  # a tick that had begun
    assert holds_for(lambda: not ticks.started_after("test/podinfo", paused + 0.1), 0.9)

    resumed = time.monotonic()
    scheduler.start()  # four or five runs were due meanwhile: they are one run now
    time.sleep(0.15)
    assert 1 <= len(ticks.started_after("test/podinfo", resumed)) <= 2
    assert scheduler.jobs() == {"test/podinfo": 0.2}


def test_stop_ends_every_job_at_once_and_start_brings_them_back(kube: Kube, make_scheduler) -> None:
    scheduler, ticks = make_scheduler()
    scheduler.start()
    for name in ("a", "b", "c"):
        kube.create(CANARIES, NS, canary(name, "0.2"))
    wait_until(lambda: all(ticks.count(f"test/{n}") >= 2 for n in "abc"))

    scheduler.stop()
    stopped = time.monotonic()
    assert scheduler.jobs() == {}
    assert scheduler.state == "stopped"
    time.sleep(1.0)
    for name in "abc":
        # A tick already past the gate may still enter; nothing starts later.
        assert not ticks.started_after(f"test/{name}", stopped + 0.15), name

    # Cache events while stopped schedule nothing; the next term picks everything up.
    kube.create(CANARIES, NS, canary("d", "0.2"))
    time.sleep(0.3)
    assert scheduler.jobs() == {}
    scheduler.start()
    wait_until(lambda: set(scheduler.jobs()) == {"test/a", "test/b", "test/c", "test/d"})
    wait_until(lambda: ticks.count("test/d") >= 1)


def test_stop_also_cancels_ticks_waiting_for_a_worker(kube: Kube, make_scheduler) -> None:
    scheduler, ticks = make_scheduler(max_workers=1)
    ticks.sleep["test/a"] = 0.8
    scheduler.start()
    kube.create(CANARIES, NS, canary("a", "0.2"))
    wait_until(lambda: ticks.count("test/a") == 1)
    kube.create(CANARIES, NS, canary("b", "0.2"))  # due now, but the only worker is busy
    time.sleep(0.3)
    assert ticks.count("test/b") == 0
    scheduler.stop()
    stopped = time.monotonic()
    time.sleep(1.0)  # a's tick has ended, and the pool has handed b's queued run a worker
    assert ticks.count("test/b") == 0
    assert not ticks.started_after("test/a", stopped)


def test_a_failing_tick_is_counted_and_the_job_keeps_running(kube: Kube, make_scheduler) -> None:
    failures = []

    def tick(namespace: str, name: str) -> None:
        failures.append(name)
        raise RuntimeError("Prometheus is down")

    scheduler, _ = make_scheduler()
    scheduler._tick = tick  # the same scheduler, with a tick that fails
    scheduler.start()
    kube.create(CANARIES, NS, canary("podinfo", "0.2"))
    wait_until(lambda: len(failures) >= 3)
    wait_until(lambda: scheduler.stats().errors >= 3)
    assert scheduler.jobs() == {"test/podinfo": 0.2}


def test_a_deployment_change_reschedules_its_canary(kube: Kube, cache, make_scheduler) -> None:
    # The interval lives in the primary's spec annotation, not on the Canary.
    def interval_for(obj: Mapping[str, Any]) -> float | None:
        meta = obj["metadata"]
        primary = cache.get(meta["namespace"], meta["name"], kind="Deployment")
        return None if primary is None else interval_from_annotation(primary)

    scheduler, _ = make_scheduler(interval_for=interval_for)
    scheduler.start()
    opted_in = {"perch.dev/enabled": "true", INTERVAL: "0.5"}
    kube.create(CANARIES, NS, canary("podinfo"))
    kube.create(DEPLOYMENTS, NS, deployment("podinfo", annotations=opted_in))
    wait_until(lambda: scheduler.jobs() == {"test/podinfo": 0.5})
    kube.merge_patch(DEPLOYMENTS, NS, "podinfo", {"metadata": {"annotations": {INTERVAL: "0.3"}}})
    wait_until(lambda: scheduler.jobs() == {"test/podinfo": 0.3})
    kube.delete(DEPLOYMENTS, NS, "podinfo")
    wait_until(lambda: scheduler.jobs() == {})


def wake_when_changed(kube: Kube, make_scheduler, changed_suffix: str) -> None:
    """Two canaries at a 30 s interval, "podinfo" waiting for a rollout: a change of the
    Deployment named ``<canary><changed_suffix>`` runs podinfo's tick at once and not other's."""
    waiting = {"podinfo"}
    scheduler, ticks = make_scheduler(
        interval_for=lambda obj: 30.0,
        wake_on_rollout=lambda obj: obj["metadata"]["name"] in waiting,
    )
    scheduler.start()
    opted_in = {"perch.dev/enabled": "true"}
    for name in ("podinfo", "other"):
        kube.create(CANARIES, NS, canary(name))
        kube.create(DEPLOYMENTS, NS, deployment(name, annotations=opted_in))
        copy = deployment(f"{name}-canary", annotations={})
        copy["metadata"]["labels"] = {LABEL_MANAGED_BY: MANAGED_BY_VALUE, LABEL_TRACK: TRACK_CANARY}
        kube.create(DEPLOYMENTS, NS, copy)
    wait_until(lambda: ticks.count("test/podinfo") >= 1 and ticks.count("test/other") >= 1)
    changed = time.monotonic()
    for name in ("podinfo", "other"):
        kube.merge_patch(
            DEPLOYMENTS, NS, f"{name}{changed_suffix}", {"metadata": {"labels": {"rolled": "out"}}}
        )
    wait_until(lambda: ticks.started_after("test/podinfo", changed) != [])
    assert holds_for(lambda: ticks.started_after("test/other", changed) == [], 1.0)
    assert set(scheduler.jobs()) == {"test/podinfo", "test/other"}


def test_a_primary_change_runs_a_waiting_canarys_tick_at_once(
    kube: Kube, cache, make_scheduler
) -> None:
    # A promotion waits for the primary's rollout: its next tick is due when the rollout ends,
    # not up to an interval later. A canary not waiting for it keeps its rhythm.
    wake_when_changed(kube, make_scheduler, "")


def test_a_change_of_the_canary_copy_runs_a_waiting_canarys_tick_at_once(
    kube: Kube, cache, make_scheduler
) -> None:
    # A new revision waits for its canary's pods: its first step is due when they are ready, not
    # up to an interval later. The copy carries no spec of its own: it wakes its primary's job.
    wake_when_changed(kube, make_scheduler, "-canary")


def test_the_resync_job_reconciles_what_no_event_announced(kube: Kube, make_scheduler) -> None:
    intervals = {"podinfo": 0.5}

    def interval_for(obj: Mapping[str, Any]) -> float | None:
        return intervals.get(obj["metadata"]["name"])

    scheduler, ticks = make_scheduler(interval_for=interval_for, resync_seconds=0.3)
    scheduler.start()
    kube.create(CANARIES, NS, canary("podinfo"))
    wait_until(lambda: scheduler.jobs() == {"test/podinfo": 0.5})
    intervals["podinfo"] = 0.25  # decided elsewhere, with no change to any watched object
    wait_until(lambda: scheduler.jobs() == {"test/podinfo": 0.25})
    del intervals["podinfo"]
    wait_until(lambda: scheduler.jobs() == {})
    assert RESYNC_JOB_ID not in scheduler.jobs()
    assert ticks.count("test/podinfo") >= 1


def test_a_failing_interval_keeps_the_current_schedule(kube: Kube, make_scheduler) -> None:
    broken = threading.Event()

    def interval_for(obj: Mapping[str, Any]) -> float | None:
        if broken.is_set():
            raise ValueError("the spec does not parse")
        return interval_from_annotation(obj)

    scheduler, _ = make_scheduler(interval_for=interval_for, resync_seconds=0.2)
    scheduler.start()
    kube.create(CANARIES, NS, canary("podinfo", "0.3"))
    wait_until(lambda: scheduler.jobs() == {"test/podinfo": 0.3})
    broken.set()
    set_interval(kube, "podinfo", "0.4")
    assert holds_for(lambda: scheduler.jobs() == {"test/podinfo": 0.3}, 0.8)


def test_an_unsynced_cache_removes_no_job(kube: Kube, cache: WatchCache, make_scheduler) -> None:
    class Unsynced:
        """The real cache's content, while it claims not to have finished listing."""

        def get(self, namespace: str, name: str, *, kind: Any = "Canary") -> Any:
            return cache.get(namespace, name, kind=kind)

        def items(self, kind: Any = "Canary") -> list[dict[str, Any]]:
            return []

        def synced(self) -> bool:
            return False

        def subscribe(self, listener: Any) -> Callable[[], None]:
            return cache.subscribe(listener)

    scheduler, _ = make_scheduler(source=Unsynced(), resync_seconds=0.2)
    scheduler.start()
    kube.create(CANARIES, NS, canary("podinfo", "0.3"))
    wait_until(lambda: scheduler.jobs() == {"test/podinfo": 0.3})
    assert holds_for(lambda: scheduler.jobs() == {"test/podinfo": 0.3}, 0.8)
