"""Leader election through a ``coordination.k8s.io/v1`` Lease, with client-go's semantics.

Two or more analyzer replicas run; only the holder of the Lease runs canary jobs. The rules are
those of client-go's ``leaderelection`` package, so that ``kubectl get lease`` reads the same as for
any controller and the timing guarantees carry over:

- A candidate takes the Lease when it does not exist, when its holder is empty (released), or when
  the record has not changed for ``leaseDurationSeconds`` *as observed by the candidate's own
  clock*. Judging expiry by local observation rather than by the holder's ``renewTime`` makes the
  election immune to clock skew between nodes.
- Every write is conditional: create (409 AlreadyExists when another candidate created it first)
  or replace with the resourceVersion last read (409 when anyone wrote since). A 409 therefore
  means someone else wrote; the elector reads the Lease again and only keeps leading if it still
  names this identity.
- The leader renews every ``retry_period`` on its own thread. It stops leading (and calls
  ``on_stopped_leading`` at once) when it sees another holder, or when no renewal succeeded for
  ``renew_deadline``. ``renew_deadline`` plus the longest renewal attempt is shorter than the
  lease duration, so the old leader has stopped before any candidate can consider the Lease
  expired.
- On a clean shutdown the leader stops its work first, then releases the Lease (empty holder,
  ``leaseDurationSeconds: 1``), so that a standby takes over within one retry period instead of a
  whole lease duration.

After losing the Lease the elector becomes a candidate again (client-go programs usually exit);
the analyzer's callbacks stop and start the scheduler, which supports any number of terms.
"""

from __future__ import annotations

import copy
import logging
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Final, Literal, Protocol

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from perch.kube import describe_api_error, is_conflict, is_not_found
from perch.resources import DEFAULT_TIMEOUT_SECONDS, Kube, Resource

__all__ = [
    "DEFAULT_LEASE_DURATION",
    "DEFAULT_LEASE_NAME",
    "DEFAULT_RENEW_DEADLINE",
    "DEFAULT_RETRY_PERIOD",
    "LEASES",
    "AlwaysLeader",
    "Leadership",
    "LeaseElector",
    "default_identity",
    "format_micro_time",
    "parse_micro_time",
]

LEASES: Final = Resource("coordination.k8s.io", "v1", "leases")

DEFAULT_LEASE_NAME: Final = "perch-analyzer"
# client-go's defaults (and kube-controller-manager's): 15 s lease, 10 s renew deadline, 2 s retry.
DEFAULT_LEASE_DURATION: Final = 15
DEFAULT_RENEW_DEADLINE: Final = 10.0
DEFAULT_RETRY_PERIOD: Final = 2.0
# client-go's JitterFactor: candidates spread their attempts so that they do not collide in step.
JITTER_FACTOR: Final = 1.2
# A renewal is at most three requests (PUT, then GET and PUT after a 409); all three must fit in the
# margin between the renew deadline and the lease duration.
_REQUESTS_PER_ATTEMPT: Final = 3

Callback = Callable[[], None]
Clock = Callable[[], float]
_Outcome = Literal["ok", "held", "conflict"]

log = logging.getLogger("perch.analyzer.leader")


def format_micro_time(ts: float) -> str:
    """``metav1.MicroTime`` as the API expects it: RFC 3339 in UTC with six fractional digits."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_micro_time(value: object) -> float | None:
    """Seconds since the epoch from a MicroTime or Time string; None when absent or malformed."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def default_identity() -> str:
    """``<hostname>_<uuid>`` as client-go builds it: the pod name says who leads, the uuid keeps
    a restarted container with the same hostname from mistaking the old holder's lease for its own.
    """
    return f"{socket.gethostname()}_{uuid.uuid4()}"


def _noop() -> None:
    pass


class Leadership(Protocol):
    """What the analyzer's main needs of an elector, whether elections are on or off."""

    def start(self) -> None: ...

    def stop(self, *, release: bool = True) -> None: ...

    def is_leader(self) -> bool: ...


def _call_safely(callback: Callback, what: str) -> None:
    # A failing callback must not kill the elector thread: the lease would stop being renewed
    # while the process kept running, and a standby would take over a half-dead leader's work.
    try:
        callback()
    except Exception:
        log.exception("leader election callback %s failed", what)


def _start_in_thread(callback: Callback) -> None:
    # client-go runs OnStartedLeading in its own goroutine: a slow start (first resync of many
    # canaries) must not delay the first renewal.
    threading.Thread(
        target=_call_safely,
        args=(callback, "on_started_leading"),
        name="perch-leader-started",
        daemon=True,
    ).start()


class AlwaysLeader:
    """``--no-leader-elect``: a single replica that leads from start to stop, with no Lease."""

    def __init__(
        self,
        *,
        on_started_leading: Callback = _noop,
        on_stopped_leading: Callback = _noop,
    ) -> None:
        self._on_started = on_started_leading
        self._on_stopped = on_stopped_leading
        self._leading = threading.Event()

    def start(self) -> None:
        if self._leading.is_set():
            return
        self._leading.set()
        _start_in_thread(self._on_started)

    def stop(self, *, release: bool = True) -> None:
        del release  # nothing to release: there is no Lease
        if self._leading.is_set():
            self._leading.clear()
            _call_safely(self._on_stopped, "on_stopped_leading")

    def is_leader(self) -> bool:
        return self._leading.is_set()

    def wait_for_leadership(self, timeout: float | None = None) -> bool:
        return self._leading.wait(timeout)


class LeaseElector:
    """Campaigns for one Lease on a daemon thread and reports winning and losing it.

    ``on_started_leading`` runs on a thread of its own each time the Lease is won;
    ``on_stopped_leading`` runs on the elector thread as soon as it is lost (or on ``stop()``),
    before anything else happens, and should return quickly (stop jobs, do not wait for them).
    The two may overlap when the Lease is lost while ``on_started_leading`` still runs; the
    callbacks must tolerate that (the analyzer's scheduler serialises start and stop).

    ``clock`` gives seconds since the epoch; it stamps ``renewTime``/``acquireTime`` and measures
    expiry and the renew deadline, so a test can make a Lease expire without waiting.
    """

    def __init__(
        self,
        api_client: client.ApiClient,
        *,
        namespace: str,
        name: str = DEFAULT_LEASE_NAME,
        identity: str | None = None,
        lease_duration: int = DEFAULT_LEASE_DURATION,
        renew_deadline: float = DEFAULT_RENEW_DEADLINE,
        retry_period: float = DEFAULT_RETRY_PERIOD,
        on_started_leading: Callback = _noop,
        on_stopped_leading: Callback = _noop,
        clock: Clock = time.time,
    ) -> None:
        # client-go's own checks: a leader must give up before its lease can look expired to
        # others, and must get more than one renewal attempt within the deadline.
        if not isinstance(lease_duration, int) or lease_duration < 1:
            raise ValueError("lease_duration must be a whole number of seconds (the API's int32)")
        if not lease_duration > renew_deadline:
            raise ValueError("lease_duration must be greater than renew_deadline")
        if not renew_deadline > JITTER_FACTOR * retry_period:
            raise ValueError(f"renew_deadline must be greater than {JITTER_FACTOR} × retry_period")
        if retry_period <= 0:
            raise ValueError("retry_period must be positive")
        self.namespace = namespace
        self.name = name
        self.identity = identity or default_identity()
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        # Bounded requests: a hung renewal must end in time for the deadline check to run before
        # the lease can expire in the eyes of a standby.
        request_timeout = min(
            DEFAULT_TIMEOUT_SECONDS, (lease_duration - renew_deadline) / _REQUESTS_PER_ATTEMPT
        )
        self._kube = Kube(api_client, timeout=request_timeout, field_manager="perch-analyzer")
        self._on_started = on_started_leading
        self._on_stopped = on_stopped_leading
        self._clock = clock

        self._leading = threading.Event()
        self._stopping = threading.Event()
        self._release_on_stop = True
        self._thread: threading.Thread | None = None
        # Only the elector thread touches these.
        self._lease: dict[str, Any] | None = None  # the Lease as last read or written
        self._observed_spec: dict[str, Any] | None = None
        self._observed_at = 0.0
        self._last_renew = 0.0

    # --- public ---------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("a LeaseElector runs once; make a new one")
        self._thread = threading.Thread(
            target=self._run, name=f"perch-leader-{self.name}", daemon=True
        )
        self._thread.start()

    def stop(self, *, release: bool = True, timeout: float | None = None) -> None:
        """Stop campaigning; if leading, call on_stopped_leading and then (``release``) free the
        Lease. ``release=False`` leaves the Lease to expire, as a crash would."""
        self._release_on_stop = release
        self._stopping.set()
        thread = self._thread
        # on_stopped_leading may call stop() from the elector thread itself.
        if thread is not None and thread is not threading.current_thread():
            thread.join(self.lease_duration if timeout is None else timeout)

    def is_leader(self) -> bool:
        return self._leading.is_set()

    def wait_for_leadership(self, timeout: float | None = None) -> bool:
        return self._leading.wait(timeout)

    @property
    def api_calls(self) -> int:
        """Requests sent to the API server so far (telemetry)."""
        return self._kube.calls

    # --- the elector thread ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                if self._leading.is_set():
                    self._stopping.wait(self.retry_period)
                    if not self._stopping.is_set():
                        self._renew()
                else:
                    self._campaign()
                    if not self._leading.is_set():
                        self._stopping.wait(self._jittered_retry())
        finally:
            was_leading = self._leading.is_set()
            if was_leading:
                # Work stops before the Lease is freed: two leaders must never overlap.
                self._lose("shutting down")
            if was_leading and self._release_on_stop:
                self._release()

    def _jittered_retry(self) -> float:
        return self.retry_period * random.uniform(1.0, JITTER_FACTOR)  # noqa: S311 - not a secret

    def _campaign(self) -> None:
        started = self._clock()
        try:
            outcome = self._try_acquire_or_renew()
        except Exception as exc:
            log.warning("cannot read or write the lease %s: %s", self._key, describe_api_error(exc))
            return
        if outcome == "ok":
            self._last_renew = started
            self._leading.set()
            log.info("became the leader (lease %s, identity %s)", self._key, self.identity)
            _start_in_thread(self._on_started)

    def _renew(self) -> None:
        started = self._clock()
        if started - self._last_renew >= self.renew_deadline:
            self._lose(f"no renewal for {self.renew_deadline:g}s")
            return
        try:
            outcome = self._renew_once(started)
        except Exception as exc:
            log.warning("cannot renew the lease %s: %s", self._key, describe_api_error(exc))
            outcome = "conflict"
        if outcome == "ok":
            # The start of the attempt, not its end: the API server wrote the new renewTime at
            # some moment in between, and a standby starts counting from its own observation.
            self._last_renew = started
        elif outcome == "held":
            holder = (self._observed_spec or {}).get("holderIdentity")
            self._lose(f"the lease is now held by {holder!r}")
        elif self._clock() - self._last_renew >= self.renew_deadline:
            self._lose(f"no renewal for {self.renew_deadline:g}s")

    def _renew_once(self, now: float) -> _Outcome:
        lease = self._lease
        if lease is None:
            return self._try_acquire_or_renew()
        # One PUT against the resourceVersion we wrote last: no GET per renewal. Anyone else's
        # write in between turns it into a 409.
        body = self._claimed(lease, now)
        try:
            written = self._kube.replace(LEASES, self.namespace, self.name, body)
        except ApiException as exc:
            if not (is_conflict(exc) or is_not_found(exc)):
                raise
            log.info("the lease %s changed under us; reading it again", self._key)
            return self._try_acquire_or_renew()
        self._lease = written
        self._observe(written, now)
        return "ok"

    def _try_acquire_or_renew(self) -> _Outcome:
        """client-go's tryAcquireOrRenew: read, decide, write conditionally."""
        now = self._clock()
        lease = self._kube.get(LEASES, self.namespace, self.name)
        if lease is None:
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": self._spec(None, now),
            }
            try:
                created = self._kube.create(LEASES, self.namespace, body)
            except ApiException as exc:
                if is_conflict(exc):
                    return "conflict"  # another candidate created it first; read it next time
                raise
            self._lease = created
            self._observe(created, now)
            return "ok"

        self._lease = lease
        self._observe(lease, now)
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        if holder and holder != self.identity and self._valid(now):
            return "held"
        try:
            written = self._kube.replace(
                LEASES, self.namespace, self.name, self._claimed(lease, now)
            )
        except ApiException as exc:
            if is_conflict(exc):
                return "conflict"
            raise
        self._lease = written
        self._observe(written, now)
        return "ok"

    def _release(self) -> None:
        lease = self._lease
        if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
            return
        now = self._clock()
        body = copy.deepcopy(lease)
        spec = body.setdefault("spec", {})
        # client-go's release: no holder and a one-second duration, so that candidates that
        # still hold the old record in mind also see it expire at once.
        spec.update(
            holderIdentity="",
            leaseDurationSeconds=1,
            acquireTime=format_micro_time(now),
            renewTime=format_micro_time(now),
        )
        try:
            self._lease = self._kube.replace(LEASES, self.namespace, self.name, body)
        except Exception as exc:
            # Not fatal: a standby takes over when the lease expires instead.
            log.warning("cannot release the lease %s: %s", self._key, describe_api_error(exc))
            return
        log.info("released the lease %s", self._key)

    def _lose(self, reason: str) -> None:
        self._leading.clear()
        log.warning("stopped leading (lease %s): %s", self._key, reason)
        _call_safely(self._on_stopped, "on_stopped_leading")

    # --- the record -----------------------------------------------------------------------------

    def _observe(self, lease: dict[str, Any], now: float) -> None:
        # Expiry is counted from when this process saw the record change, as client-go does:
        # renewTime was written by another machine's clock.
        spec = lease.get("spec") or {}
        if spec != self._observed_spec:
            self._observed_spec = copy.deepcopy(spec)
            self._observed_at = now

    def _valid(self, now: float) -> bool:
        duration = (self._observed_spec or {}).get("leaseDurationSeconds")
        if not isinstance(duration, int | float) or duration <= 0:
            duration = self.lease_duration
        return self._observed_at + duration > now

    def _spec(self, old: dict[str, Any] | None, now: float) -> dict[str, Any]:
        # Fields this elector does not know (strategy, preferredHolder) are kept as they are.
        spec = copy.deepcopy(old) if old is not None else {}
        stamp = format_micro_time(now)
        if old is None:
            spec["leaseTransitions"] = 0
            spec["acquireTime"] = stamp
        elif old.get("holderIdentity") != self.identity:
            spec["leaseTransitions"] = int(old.get("leaseTransitions") or 0) + 1
            spec["acquireTime"] = stamp
        elif not old.get("acquireTime"):
            spec["acquireTime"] = stamp
        spec["holderIdentity"] = self.identity
        spec["leaseDurationSeconds"] = self.lease_duration
        spec["renewTime"] = stamp
        return spec

    def _claimed(self, lease: dict[str, Any], now: float) -> dict[str, Any]:
        body = copy.deepcopy(lease)
        body["spec"] = self._spec(lease.get("spec") or {}, now)
        return body  # metadata.resourceVersion makes the PUT conditional

    @property
    def _key(self) -> str:
        return f"{self.namespace}/{self.name}"
