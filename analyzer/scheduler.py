"""APScheduler wiring: one job per active canary at its own interval, and a resync job.

The analyzer's clock is an APScheduler 3 ``BackgroundScheduler`` in the analyzer's own process
(never in a gunicorn worker: the webhook does not import the analyzer, an import-linter contract
says so). Jobs follow the watch cache:

- a Canary appears or changes → ``interval_for(canary)`` decides: None removes the job (idle
  phases), a number adds the job or reschedules it when the interval changed;
- a Canary disappears → its job goes;
- a change of the Deployment of the same name re-evaluates its Canary (the spec, and so the
  interval, lives in the Deployment's annotation); a change of it or of its canary copy
  (``<name>-canary``) runs the Canary's tick at once when ``wake_on_rollout(canary)`` says it
  waits for a rollout (a promotion waiting for the primary's: finished the moment the rollout is;
  a new revision waiting for its canary's pods: its first step the moment they are ready), not up
  to an interval later;
- every ``resync_seconds`` a resync job reconciles all jobs with the cache, so that a lost or
  failed callback costs at most one resync period.

Each job has ``max_instances=1`` (a slow tick never overlaps itself; the scheduler skips the runs
that fall inside it) and ``coalesce=True`` (after a pause, runs that piled up become one). A new job
runs at once, so a canary admitted by the webhook starts without waiting a whole interval.

Leadership: ``start()`` when the Lease is won, ``stop()`` (or ``pause_all()``) when it is lost.
Both take effect at once: no tick starts after they return, including ticks already handed to the
thread pool and waiting for a worker. Ticks already running finish; their writes are guarded by
resourceVersion preconditions, so a deposed leader's late write is refused, not applied twice.

Tick lag (actual start minus scheduled run time) is recorded for every tick in a bounded buffer, for
telemetry and for the benchmark: it grows when the thread pool is too small for the canaries.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal, Protocol

from apscheduler.events import (
    EVENT_JOB_ERROR,
    EVENT_JOB_EXECUTED,
    EVENT_JOB_MAX_INSTANCES,
    EVENT_JOB_MISSED,
    JobEvent,
)
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from analyzer.cache import EventType, Kind, Listener
from perch.names import CANARY_SUFFIX

__all__ = [
    "DEFAULT_RESYNC_SECONDS",
    "RESYNC_JOB_ID",
    "CanaryScheduler",
    "CanarySource",
    "IntervalFn",
    "SchedulerStats",
    "TickFn",
    "job_id",
]

TickFn = Callable[[str, str], None]
IntervalFn = Callable[[Mapping[str, Any]], float | None]
State = Literal["stopped", "running", "paused"]
# interval_for failed: leave the canary's job as it is.
_Keep = Literal["keep"]

DEFAULT_RESYNC_SECONDS: Final = 30.0
DEFAULT_MAX_WORKERS: Final = 10
DEFAULT_LAG_SAMPLES: Final = 10_000
# No slash: canary job ids always have one, so the two can never collide.
RESYNC_JOB_ID: Final = "perch:resync"
# A tick may start late by up to one interval and still run; later than that it is skipped
# (EVENT_JOB_MISSED), since the next one is due anyway. Never below a second: on a busy machine
# a sub-second interval would otherwise miss most of its runs.
_MIN_MISFIRE_GRACE: Final = 1
_INTERVAL_TOLERANCE: Final = 1e-6

log = logging.getLogger("perch.analyzer.scheduler")


class CanarySource(Protocol):
    """What the scheduler reads: the watch cache (analyzer.cache.WatchCache)."""

    def get(self, namespace: str, name: str, *, kind: Kind = "Canary") -> dict[str, Any] | None: ...

    def items(self, kind: Kind = "Canary") -> list[dict[str, Any]]: ...

    def synced(self) -> bool: ...

    def subscribe(self, listener: Listener) -> Callable[[], None]: ...


@dataclass(frozen=True, slots=True)
class SchedulerStats:
    ticks: int  # ticks that ran (successfully or not)
    errors: int  # ticks that raised
    skipped: int  # runs skipped because the previous tick of that canary was still running
    missed: int  # runs that started later than their misfire grace time, and were dropped
    jobs: int  # canary jobs scheduled now


def _offset(job: str, interval: float, *, spread: bool) -> timedelta:
    """A stable offset within the interval (the same job lands at the same point every term)."""
    if not spread or interval <= 0:
        return timedelta(0)
    return timedelta(seconds=(zlib.crc32(job.encode()) % 1000) / 1000 * interval)


def job_id(namespace: str, name: str) -> str:
    return f"{namespace}/{name}"


def _split(job: str) -> tuple[str, str]:
    namespace, _, name = job.partition("/")
    return namespace, name


def _identity(obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


class CanaryScheduler:
    """Runs ``tick(namespace, name)`` for every canary ``interval_for`` gives an interval."""

    def __init__(
        self,
        *,
        cache: CanarySource,
        tick: TickFn,
        interval_for: IntervalFn,
        resync_seconds: float = DEFAULT_RESYNC_SECONDS,
        max_workers: int = DEFAULT_MAX_WORKERS,
        lag_samples: int = DEFAULT_LAG_SAMPLES,
        wake_on_rollout: Callable[[Mapping[str, Any]], bool] = lambda canary: False,
    ) -> None:
        self._cache = cache
        self._tick = tick
        self._interval_for = interval_for
        self._wake_on_rollout = wake_on_rollout
        self._resync_seconds = resync_seconds
        self._max_workers = max_workers

        # _lock serialises start/stop/pause and every change to the job set. _gate is held only
        # for a few instructions: a tick checks the state under it, so a tick starting on a pool
        # thread never waits for a long resync.
        self._lock = threading.RLock()
        self._gate = threading.Lock()
        self._state: State = "stopped"
        self._term = 0  # a leadership term; ticks submitted in an earlier term never run
        self._scheduler: BackgroundScheduler | None = None

        self._stats_lock = threading.Lock()
        self._lags: deque[float] = deque(maxlen=lag_samples)
        self._durations: deque[float] = deque(maxlen=lag_samples)
        self._started: dict[str, float] = {}  # job id → start of its running tick
        self._ticks = self._errors = self._skipped = self._missed = 0
        self._last_resync: float | None = None  # time.monotonic(); read by the liveness probe

        self._unsubscribe = cache.subscribe(self._on_change)

    # --- leadership -----------------------------------------------------------------------------

    def start(self) -> None:
        """Begin (or resume) ticking every active canary; call when the Lease is won."""
        with self._lock:
            if self._state == "running":
                return
            if self._state == "paused" and self._scheduler is not None:
                with self._gate:
                    self._state = "running"
                self.resync()
                # Runs due during the pause are coalesced into one per canary.
                self._scheduler.resume()
                return
            scheduler = BackgroundScheduler(
                timezone=UTC,
                executors={"default": ThreadPoolExecutor(max_workers=self._max_workers)},
                job_defaults={"coalesce": True, "max_instances": 1},
                daemon=True,
            )
            scheduler.add_listener(
                self._on_job_event,
                EVENT_JOB_EXECUTED | EVENT_JOB_ERROR | EVENT_JOB_MAX_INSTANCES | EVENT_JOB_MISSED,
            )
            scheduler.add_job(
                self.resync,
                trigger=IntervalTrigger(seconds=self._resync_seconds, timezone=UTC),
                id=RESYNC_JOB_ID,
                name="resync with the watch cache",
                max_instances=1,
                coalesce=True,
            )
            with self._gate:
                self._term += 1
                self._state = "running"
            self._scheduler = scheduler
            scheduler.start()
            self.resync()
            log.info("scheduler started (term %d)", self._term)

    def stop(self) -> None:
        """Stop every job at once and forget them; call when the Lease is lost or on shutdown.

        Does not wait for ticks already running (their writes are conditional, see the module
        docstring); no tick starts after this returns.
        """
        with self._lock:
            with self._gate:
                was = self._state
                self._state = "stopped"
                self._term += 1
            scheduler, self._scheduler = self._scheduler, None
            if scheduler is not None:
                scheduler.remove_all_jobs()
                # wait=False: the elector calls this on its own thread and must get back to
                # renewing (or releasing) the Lease, not wait for a slow Prometheus query.
                scheduler.shutdown(wait=False)
            with self._stats_lock:
                self._started.clear()
            if was != "stopped":
                log.info("scheduler stopped")

    def pause_all(self) -> None:
        """Stop every job at once but keep them; ``start()`` resumes them."""
        with self._lock:
            if self._state != "running" or self._scheduler is None:
                return
            with self._gate:
                self._state = "paused"
            self._scheduler.pause()
            log.info("scheduler paused")

    def close(self) -> None:
        """Stop and stop listening to the cache (the process is ending)."""
        self.stop()
        self._unsubscribe()

    @property
    def state(self) -> State:
        return self._state

    # --- the job set ----------------------------------------------------------------------------

    def resync(self) -> None:
        """Reconcile the jobs with the cache: add missing, remove stale, reschedule changed."""
        # Under the lock, together with the cache's snapshot: a callback that arrives meanwhile
        # is applied after this resync, never undone by its stale snapshot.
        with self._lock:
            scheduler = self._scheduler
            if self._state == "stopped" or scheduler is None:
                return
            # When it starts, not when it ends: a resync that hangs stops the next ones (one
            # instance at most), and the stamp going stale is what tells the probe.
            self._last_resync = time.monotonic()
            # An unsynced cache is incomplete, not a cluster without canaries: until it has
            # listed everything, resync only adds.
            complete = self._cache.synced()
            wanted: dict[str, float | _Keep | None] = {}
            for obj in self._cache.items():
                namespace, name = _identity(obj)
                wanted[job_id(namespace, name)] = self._interval_or_keep(obj)
            for job in scheduler.get_jobs():
                if complete and job.id != RESYNC_JOB_ID and job.id not in wanted:
                    self._remove(job.id)
            for job, interval in wanted.items():
                # Jobs added in bulk (start, resync) are spread over their interval, so that a
                # thousand canaries are not all due in the same instant, every interval.
                self._apply(job, interval, spread=True)

    def last_resync(self) -> float | None:
        """``time.monotonic()`` when the resync last ran, or was turned away by a worker as late;
        None before the first. Not reset on stop: a caller judging staleness must count from
        when leadership began as well."""
        return self._last_resync

    def jobs(self) -> dict[str, float]:
        """The canary jobs scheduled now: job id (``namespace/name``) → interval in seconds."""
        with self._lock:
            scheduler = self._scheduler
            if scheduler is None:
                return {}
            return {
                job.id: job.trigger.interval.total_seconds()
                for job in scheduler.get_jobs()
                if job.id != RESYNC_JOB_ID
            }

    def _on_change(self, kind: Kind, event_type: EventType, obj: dict[str, Any]) -> None:
        namespace, name = _identity(obj)
        wake = False
        if kind == "Deployment":
            # Read only: no copy where the cache can lend its own (WatchCache.peek).
            peek = getattr(self._cache, "peek", None) or self._cache.get
            canary = peek(namespace, name)
            if canary is None:
                # The canary copy of a Deployment: only a wake concerns it (its primary's
                # annotations, not its own, carry the spec and so the interval).
                if name.endswith(CANARY_SUFFIX):
                    owner = peek(namespace, name.removesuffix(CANARY_SUFFIX))
                    if owner is not None and event_type != "DELETED" and self._wants_wake(owner):
                        self._wake(job_id(namespace, name.removesuffix(CANARY_SUFFIX)))
                return
            # A canary waiting for a rollout (a promotion's) ticks as soon as the primary
            # changes, rather than up to an interval later.
            wake = event_type != "DELETED" and self._wants_wake(canary)
            kind, event_type, obj = "Canary", "MODIFIED", canary
        with self._lock:
            if self._state == "stopped":
                return  # start() resyncs everything
            job = job_id(namespace, name)
            if event_type == "DELETED":
                self._remove(job)
                return
            self._apply(job, self._interval_or_keep(obj))
            if wake:
                self._wake(job)

    def _wake(self, job: str) -> None:
        with self._lock:
            if self._state == "stopped" or self._scheduler is None:
                return
            if self._scheduler.get_job(job) is not None:
                self._scheduler.modify_job(job, next_run_time=datetime.now(UTC))

    def _wants_wake(self, canary: Mapping[str, Any]) -> bool:
        try:
            return self._wake_on_rollout(canary)
        except Exception:
            log.exception("wake_on_rollout failed for canary %s/%s", *_identity(canary))
            return False

    def _interval_or_keep(self, obj: Mapping[str, Any]) -> float | _Keep | None:
        try:
            interval = self._interval_for(obj)
            if interval is None:
                return None
            seconds = float(interval)
        except Exception:
            # A spec that fails to parse now ran fine before (admission validates it): keep the
            # canary going at its last interval rather than drop its analysis.
            log.exception("interval_for failed for canary %s/%s", *_identity(obj))
            return "keep"
        return seconds if math.isfinite(seconds) and seconds > 0 else None

    def _apply(self, job: str, interval: float | _Keep | None, *, spread: bool = False) -> None:
        scheduler = self._scheduler
        if scheduler is None or interval == "keep":
            return
        if interval is None:
            self._remove(job)
            return
        current = scheduler.get_job(job)
        # APScheduler takes whole seconds here.
        grace = max(_MIN_MISFIRE_GRACE, math.ceil(interval))
        trigger = IntervalTrigger(seconds=interval, timezone=UTC)
        if current is None:
            namespace, name = _split(job)
            scheduler.add_job(
                self._run_tick,
                trigger=trigger,
                args=(self._term, namespace, name),
                id=job,
                name=f"tick {job}",
                max_instances=1,
                coalesce=True,
                misfire_grace_time=grace,
                next_run_time=datetime.now(UTC) + _offset(job, interval, spread=spread),
                replace_existing=True,
            )
            log.info("scheduled canary %s every %gs", job, interval)
        elif abs(current.trigger.interval.total_seconds() - interval) > _INTERVAL_TOLERANCE:
            scheduler.modify_job(job, misfire_grace_time=grace)
            scheduler.reschedule_job(job, trigger=trigger)
            log.info("rescheduled canary %s every %gs", job, interval)

    def _remove(self, job: str) -> None:
        scheduler = self._scheduler
        if scheduler is None:
            return
        try:
            scheduler.remove_job(job)
        except JobLookupError:
            return
        log.info("unscheduled canary %s", job)

    # --- ticks and their measurement ------------------------------------------------------------

    def _run_tick(self, term: int, namespace: str, name: str) -> None:
        job = job_id(namespace, name)
        with self._gate:
            # Submitted before a stop or pause and only now given a worker: not ours to run.
            if self._state != "running" or term != self._term:
                return
            with self._stats_lock:
                self._started[job] = time.time()
        self._tick(namespace, name)

    def _on_job_event(self, event: JobEvent) -> None:
        if event.job_id == RESYNC_JOB_ID:
            if event.code == EVENT_JOB_MISSED:
                # A worker picked the resync up too late to run it: the pool is busy with ticks,
                # not stuck, and restarting the process would not make it less busy.
                self._last_resync = time.monotonic()
            return
        now = time.time()
        with self._stats_lock:
            if event.code == EVENT_JOB_MAX_INSTANCES:
                self._skipped += 1
                return
            if event.code == EVENT_JOB_MISSED:
                self._missed += 1
                return
            # max_instances=1: the start recorded for this job belongs to this very run.
            started = self._started.pop(event.job_id, None)
            if started is None:
                return  # the run was turned away by the state check
            self._ticks += 1
            if event.code == EVENT_JOB_ERROR:
                self._errors += 1
            self._lags.append(started - event.scheduled_run_time.timestamp())
            self._durations.append(now - started)

    def tick_lags(self) -> list[float]:
        """Seconds between each recent tick's scheduled run time and its actual start, oldest
        first (at most ``lag_samples``)."""
        with self._stats_lock:
            return list(self._lags)

    def tick_durations(self) -> list[float]:
        """Seconds each recent tick ran, oldest first (at most ``lag_samples``)."""
        with self._stats_lock:
            return list(self._durations)

    def dropped_ticks(self) -> dict[str, int]:
        """Runs that did not happen, by reason: ``late`` (missed) and ``overlapping`` (skipped)."""
        with self._stats_lock:
            return {"late": self._missed, "overlapping": self._skipped}

    def stats(self) -> SchedulerStats:
        jobs = len(self.jobs())
        with self._stats_lock:
            return SchedulerStats(
                ticks=self._ticks,
                errors=self._errors,
                skipped=self._skipped,
                missed=self._missed,
                jobs=jobs,
            )
