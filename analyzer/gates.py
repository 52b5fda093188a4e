"""Gates: the spec's webhooks, called with Flagger's webhook payload so Flagger's tools work as-is.

Wire contract, Flagger's ``CanaryWebhookPayload`` sent as ``POST`` with
``Content-Type: application/json``::

    {"name": "podinfo", "namespace": "test", "phase": "Progressing",
     "checksum": "v1-3f9c2a...", "metadata": {"type": "cmd", "cmd": "hey -z 1m ..."}}

- ``name`` is the primary's name, which is also the Canary object's name.
- ``checksum`` identifies the configuration under analysis. Flagger hashes the Canary's tracked
  configs and last applied spec; Perch sends the revision under analysis, which plays the same part
  (it changes exactly when a new release starts), so a receiver can key its state on it.
- ``metadata`` is the webhook's ``metadata`` verbatim (always present, ``{}`` when empty; Flagger
  omits it when empty, which a Go or Python receiver reads the same way).

Pass condition: any HTTP 2xx. (Flagger's code treats 200-202 as success; its docs say 2xx. Real
receivers such as the load tester answer 200 or 202, so the two agree in practice.)

Outcomes: ``pass`` (2xx), ``fail`` (another status; the message has the status and a short excerpt
of the body), ``timeout`` (no answer within ``timeout``), ``error`` (connection refused, DNS, TLS,
a URL requests cannot send to).

What an outcome *means* depends on the webhook type, and that is step()'s business, not this
module's: a non-2xx from a ``confirm-*`` gate means "not approved yet" (Flagger), a 2xx from a
``rollback`` gate means "roll back now", ``post-rollout`` and ``event`` results are only logged.
:func:`confirm_state` is the pure rule for how long "not yet" may last.

Event webhooks (``type: event``) receive the same payload with ``metadata`` set to
``eventMessage``, ``eventType`` (Normal|Warning) and ``timestamp`` (milliseconds since the epoch, as
a string), merged over the webhook's own metadata as Flagger does; see :func:`post_event`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from threading import Lock
from typing import Any, Final, Protocol, TypedDict, cast

import requests
from urllib3.util import Timeout

from analyzer.confirm import ConfirmState, confirm_state
from analyzer.model import EventType, GateOutcome, GateResult
from perch.spec import OnTimeout, Webhook, WebhookType
from perch.status import Phase

__all__ = [
    "CONFIRM_TYPES",
    "GATE_KINDS",
    "ConfirmState",
    "Gate",
    "OnTimeout",
    "WebhookGate",
    "WebhookPayload",
    "approved",
    "backoff_seconds",
    "confirm_state",
    "event_payload",
    "gate_for",
    "post_event",
    "run_gates",
    "webhook_payload",
]

_log = logging.getLogger("perch.analyzer.gates")

CONFIRM_TYPES: Final[frozenset[WebhookType]] = frozenset(
    {"confirm-rollout", "confirm-traffic-increase", "confirm-promotion"}
)


# Flagger retries with go-retryablehttp (1 s doubling to 30 s). A tick is typically 30-60 s, so
# Perch keeps the same policy with a shorter backoff: the retries must fit inside the interval.
BACKOFF_BASE_SECONDS: Final = 0.5
BACKOFF_MAX_SECONDS: Final = 2.0
# Only the start of a body is kept: enough for the load tester's error text, never a whole page.
_EXCERPT_BYTES: Final = 1024
_EXCERPT_CHARS: Final = 200
# run_gates waits this much beyond a gate's own bound before reporting it as timed out, so that a
# gate finishing right at its timeout is reported with its own outcome and message.
_GRACE_SECONDS: Final = 0.5
_MAX_WORKERS: Final = 8


class WebhookPayload(TypedDict):
    name: str
    namespace: str
    phase: str
    checksum: str
    metadata: dict[str, str]


def webhook_payload(
    hook: Webhook, *, name: str, namespace: str, phase: Phase, checksum: str
) -> WebhookPayload:
    return {
        "name": name,
        "namespace": namespace,
        "phase": phase,
        "checksum": checksum,
        "metadata": dict(hook.metadata),
    }


def event_payload(
    hook: Webhook,
    *,
    name: str,
    namespace: str,
    phase: Phase,
    checksum: str,
    message: str,
    event_type: EventType,
    now: datetime,
) -> WebhookPayload:
    """Flagger's event payload: the event's keys win over the hook's metadata of the same name."""
    event = {
        "eventMessage": message,
        "eventType": event_type,
        "timestamp": str(int(now.timestamp() * 1000)),
    }
    return {
        "name": name,
        "namespace": namespace,
        "phase": phase,
        "checksum": checksum,
        "metadata": {**dict(hook.metadata), **event},
    }


# --- confirm gates -------------------------------------------------------------------------------


def approved(results: Sequence[GateResult]) -> bool:
    """Flagger: every confirm gate of the step must answer 2xx; anything else is "not yet"."""
    return all(result.outcome == "pass" for result in results)


# --- gates ---------------------------------------------------------------------------------------


class Gate(Protocol):
    """One check that answers with a GateResult and never raises."""

    @property
    def name(self) -> str: ...

    @property
    def type(self) -> WebhookType: ...

    def max_seconds(self) -> float:
        """An upper bound on how long :meth:`check` may take, retries included."""
        ...

    def check(self, payload: WebhookPayload) -> GateResult: ...


def backoff_seconds(attempt: int) -> float:
    """The pause before retry number ``attempt`` (0 for the first retry)."""
    return float(min(BACKOFF_BASE_SECONDS * 2**attempt, BACKOFF_MAX_SECONDS))


@dataclass(frozen=True, slots=True)
class _Attempt:
    outcome: GateOutcome
    message: str
    retryable: bool


@dataclass(frozen=True, slots=True)
class WebhookGate:
    """A spec webhook as a gate: one POST per attempt, ``retries`` more on a retryable failure."""

    hook: Webhook
    session: requests.Session
    # Injected by tests so that retries can be counted without waiting out the backoff.
    sleep: Callable[[float], None] = time.sleep

    @property
    def name(self) -> str:
        return self.hook.name

    @property
    def type(self) -> WebhookType:
        return self.hook.type

    def max_seconds(self) -> float:
        attempts = self.hook.retries + 1
        pauses = sum(backoff_seconds(attempt) for attempt in range(self.hook.retries))
        return attempts * self.hook.timeout_seconds + pauses

    def check(self, payload: WebhookPayload) -> GateResult:
        body = _json_bytes(payload)
        result = self._attempt(body)
        attempts = 1
        # As go-retryablehttp (Flagger): retry connection errors, timeouts, 429 and 5xx but 501.
        # A confirm gate's "not yet" is a 4xx or a 5xx and may be retried too; that only delays it.
        while result.retryable and attempts <= self.hook.retries:
            self.sleep(backoff_seconds(attempts - 1))
            result = self._attempt(body)
            attempts += 1
        suffix = f" (after {attempts} attempts)" if attempts > 1 else ""
        return GateResult(
            name=self.hook.name,
            type=self.hook.type,
            outcome=result.outcome,
            message=result.message + suffix,
        )

    def _attempt(self, body: bytes) -> _Attempt:
        seconds = self.hook.timeout_seconds
        deadline = time.monotonic() + seconds
        try:
            with self.session.post(
                self.hook.url,
                data=body,
                headers={"Content-Type": "application/json"},
                timeout=_total_timeout(seconds),
                verify=not self.hook.disable_tls,
                stream=True,
            ) as response:
                status = response.status_code
                reason = response.reason or ""
                if 200 <= status < 300:
                    return _Attempt("pass", f"HTTP {status}", retryable=False)
                excerpt = _excerpt(response, deadline=deadline)
        except requests.exceptions.Timeout:
            # ConnectTimeout is also a ConnectionError: this clause must come first.
            return _Attempt("timeout", f"no answer within {self.hook.timeout}", retryable=True)
        except requests.exceptions.SSLError as exc:
            # A certificate does not become trusted a second later.
            return _Attempt("error", f"TLS error: {_reason(exc)}", retryable=False)
        except requests.exceptions.ConnectionError as exc:
            return _Attempt("error", f"connection failed: {_reason(exc)}", retryable=True)
        except requests.exceptions.RequestException as exc:
            return _Attempt("error", f"request failed: {_reason(exc)}", retryable=False)
        message = f"HTTP {status} {reason}".rstrip() + (f": {excerpt}" if excerpt else "")
        retryable = status == 429 or (status >= 500 and status != 501)
        return _Attempt("fail", message, retryable=retryable)


GateFactory = Callable[[Webhook, requests.Session], Gate]

# Gate implementations by name. The spec has no field to choose one yet, so every webhook is a
# "webhook" gate; the registry is where another kind (say, a ticket approval) would plug in.
GATE_KINDS: Final[dict[str, GateFactory]] = {
    "webhook": lambda hook, session: WebhookGate(hook=hook, session=session),
}


def gate_for(hook: Webhook, *, session: requests.Session, kind: str = "webhook") -> Gate:
    return GATE_KINDS[kind](hook, session)


def run_gates(
    webhooks: Sequence[Webhook],
    *,
    name: str,
    namespace: str,
    phase: Phase,
    checksum: str,
    session: requests.Session | None = None,
) -> tuple[GateResult, ...]:
    """Call every webhook at once and return their results in the order given.

    The call returns within the slowest gate's :meth:`Gate.max_seconds` (plus a short grace): a
    gate still running then is reported as ``timeout`` and left to finish on its own thread, so a
    receiver that trickles its answer cannot hold the tick.
    """
    if not webhooks:
        return ()
    http = session if session is not None else requests.Session()
    gates = [gate_for(hook, session=http) for hook in webhooks]
    payloads = [
        webhook_payload(hook, name=name, namespace=namespace, phase=phase, checksum=checksum)
        for hook in webhooks
    ]
    budget = max(gate.max_seconds() for gate in gates) + _GRACE_SECONDS
    pool = ThreadPoolExecutor(
        max_workers=min(len(gates), _MAX_WORKERS), thread_name_prefix="perch-gate"
    )
    try:
        futures = [
            pool.submit(gate.check, payload) for gate, payload in zip(gates, payloads, strict=True)
        ]
        wait(futures, timeout=budget)
    finally:
        # Never wait for a stuck thread: it ends by its own socket timeout.
        pool.shutdown(wait=False, cancel_futures=True)
    return tuple(
        _result_of(future, gate, budget=budget) for future, gate in zip(futures, gates, strict=True)
    )


def _result_of(future: Future[GateResult], gate: Gate, *, budget: float) -> GateResult:
    if future.done() and not future.cancelled():
        exc = future.exception()
        if exc is None:
            return future.result()
        # check() does not raise; if it ever does, the rollout must see a failed gate, not crash.
        _log_event(
            "gate raised", level=logging.ERROR, gate=gate.name, type=gate.type, error=repr(exc)
        )
        return GateResult(gate.name, gate.type, "error", f"internal error: {exc!r}")
    return GateResult(gate.name, gate.type, "timeout", f"no answer within {budget:.1f}s")


# --- event webhooks ------------------------------------------------------------------------------

_event_pool: ThreadPoolExecutor | None = None
_event_pool_lock = Lock()


def _events() -> ThreadPoolExecutor:
    global _event_pool  # noqa: PLW0603 -- one lazily created pool per process, shared by all ticks
    with _event_pool_lock:
        if _event_pool is None:
            _event_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="perch-event")
        return _event_pool


def post_event(
    hook: Webhook,
    *,
    name: str,
    namespace: str,
    phase: Phase,
    checksum: str,
    message: str,
    event_type: EventType = "Normal",
    now: datetime | None = None,
    session: requests.Session | None = None,
) -> Future[GateResult]:
    """Send one event to an ``event`` webhook in the background and return at once.

    Each attempt is bounded by the hook's timeout; a failure is logged and never raised. The future
    is for tests and shutdown; callers may drop it.
    """
    payload = event_payload(
        hook,
        name=name,
        namespace=namespace,
        phase=phase,
        checksum=checksum,
        message=message,
        event_type=event_type,
        now=now or datetime.now(UTC),
    )
    http = session if session is not None else requests.Session()

    def deliver() -> GateResult:
        try:
            result = gate_for(hook, session=http).check(payload)
        except Exception as exc:  # fire and forget: nothing may escape
            result = GateResult(hook.name, hook.type, "error", f"internal error: {exc!r}")
        if result.outcome != "pass":
            _log_event(
                "event webhook failed",
                level=logging.WARNING,
                webhook=hook.name,
                canary=f"{name}.{namespace}",
                outcome=result.outcome,
                error=result.message,
            )
        return result

    return _events().submit(deliver)


# --- helpers -------------------------------------------------------------------------------------


def _json_bytes(payload: Mapping[str, object]) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


def _total_timeout(seconds: float) -> Any:
    # requests documents a float or a (connect, read) pair, each applied on its own, so a slow
    # connect plus a slow read could take twice the webhook's timeout. urllib3's Timeout (which
    # requests passes through unchanged) also bounds the sum; the stubs do not know it.
    return cast(Any, Timeout(connect=seconds, read=seconds, total=seconds))


def _excerpt(response: requests.Response, *, deadline: float) -> str:
    data = b""
    try:
        for chunk in response.iter_content(chunk_size=256):
            data += chunk
            if len(data) >= _EXCERPT_BYTES or time.monotonic() >= deadline:
                break
    except requests.exceptions.RequestException:
        pass  # the status decides the outcome; the body is only for the message
    text = " ".join(data[:_EXCERPT_BYTES].decode("utf-8", "replace").split())
    return text if len(text) <= _EXCERPT_CHARS else text[: _EXCERPT_CHARS - 1] + "…"


def root_cause(exc: BaseException) -> BaseException:
    """The innermost exception of a chain (requests nests urllib3's, which nests the socket's)."""
    root: BaseException = exc
    seen = {id(root)}
    while (nxt := root.__cause__ or root.__context__) is not None and id(nxt) not in seen:
        seen.add(id(nxt))
        root = nxt
    return root


def _reason(exc: BaseException) -> str:
    """The root cause in a few words ("Connection refused"), not requests' nested repr."""
    root = root_cause(exc)
    if isinstance(root, OSError) and root.strerror:
        return root.strerror
    verify = getattr(root, "verify_message", None)
    if isinstance(verify, str) and verify:
        return f"certificate verify failed: {verify}"
    text = str(root) or type(root).__name__
    return text if len(text) <= _EXCERPT_CHARS else text[: _EXCERPT_CHARS - 1] + "…"


def _log_event(msg: str, *, level: int, **fields: object) -> None:
    # analyzer.telemetry.JsonFormatter writes the "fields" extra as the JSON line's own keys.
    _log.log(level, msg, extra={"fields": fields})
