"""The Admitter behind /mutate: parse, decide (pure), observe and perform (I/O), answer."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from perch.kube import describe_api_error, load_api_client
from perch.resources import Kube
from webhook.admission import AdmissionRequest, parse_review, response_review
from webhook.contract import AdmitResult
from webhook.effects import Conflict, RequestEffects
from webhook.review import Decision, review
from webhook.telemetry import log_event

log = logging.getLogger("perch.webhook")

QUIET_DECISIONS = frozenset({"ignored", "not-opted-in", "deleting", "unchanged", "restart"})
# Two writers racing on one Canary object: the loser re-reads and decides again, a few times.
MAX_ATTEMPTS = 4
READY_CACHE_SECONDS = 5.0


class PerchAdmitter:
    def __init__(self, kube: Kube, *, adopt_timeout: float = 30.0):
        self.kube = kube
        self.adopt_timeout = adopt_timeout
        self._ready_until = 0.0
        self._lock = threading.Lock()

    def admit(self, body: Mapping[str, Any]) -> AdmitResult:
        req = parse_review(body)
        decision = self.decide(req)
        extra: list[str] = []
        if decision.reason == "observe":
            decision, extra = self._observe_and_perform(req, decision)
        elif decision.actions and not req.dry_run:
            extra = self._perform_best_effort(req, decision)
        # Pass-through decisions are most requests and change nothing: DEBUG keeps them off the
        # request path's log lock (the request counter counts them anyway).
        log_event(
            log,
            f"admission {decision.reason}",
            level=logging.DEBUG if decision.reason in QUIET_DECISIONS else logging.INFO,
            uid=req.uid,
            namespace=req.namespace,
            name=req.name,
            operation=req.operation,
            decision=decision.reason,
            allowed=decision.allowed,
            dryRun=req.dry_run,
            user=req.username,
        )
        review_body = response_review(
            uid=req.uid,
            allowed=decision.allowed,
            patch=decision.patch,
            warnings=(*decision.warnings, *extra),
            message=decision.message,
        )
        return AdmitResult(review=review_body, decision=decision.reason)

    def decide(self, req: AdmissionRequest) -> Decision:
        return review(req, None, now=datetime.now(UTC))

    def _observe_and_perform(
        self, req: AdmissionRequest, first: Decision
    ) -> tuple[Decision, list[str]]:
        for _ in range(MAX_ATTEMPTS):
            effects = RequestEffects(self.kube, req, first.spec, adopt_timeout=self.adopt_timeout)
            try:
                decision = review(req, effects.observe(), now=datetime.now(UTC))
                if req.dry_run or not decision.allowed or not decision.actions:
                    return decision, []
                return decision, effects.perform(decision)
            except Conflict:
                continue
            except (ApiException, HTTPError, OSError) as exc:
                return _could_not(req, describe_api_error(exc)), []
        return _could_not(req, "the Canary object kept changing under concurrent updates"), []

    def _perform_best_effort(self, req: AdmissionRequest, decision: Decision) -> list[str]:
        # Only the opt-out hand-back gets here: the user's update must go through even when the
        # clean-up fails; the analyzer removes what is left.
        try:
            return RequestEffects(self.kube, req, None, adopt_timeout=self.adopt_timeout).perform(
                decision
            )
        except (ApiException, HTTPError, OSError) as exc:
            log.warning("hand-back of %s/%s incomplete: %s", req.namespace, req.name, exc)
            return [
                f"perch: could not fully remove the canary ({describe_api_error(exc)}); "
                "the analyzer will finish the clean-up"
            ]

    def ready(self) -> bool:
        now = time.monotonic()
        if now < self._ready_until:
            return True
        with self._lock:
            try:
                self.kube.version()
            except (ApiException, HTTPError, OSError):
                return False
            self._ready_until = now + READY_CACHE_SECONDS
            return True


def _could_not(req: AdmissionRequest, why: str) -> Decision:
    return Decision(
        allowed=False,
        reason="error",
        message=(
            f"perch: could not set up the canary for {req.namespace}/{req.name}: {why}. "
            "The update was not applied; retry it"
        ),
    )


def build_admitter() -> PerchAdmitter:
    """The admitter the server runs: Kubernetes credentials resolved as kubectl resolves them."""
    api_client = load_api_client(os.environ.get("PERCH_KUBECONFIG") or None)
    timeout = float(os.environ.get("PERCH_API_TIMEOUT_SECONDS", "2"))
    adopt = float(os.environ.get("PERCH_ADOPT_TIMEOUT_SECONDS", "30"))
    return PerchAdmitter(
        Kube(api_client, timeout=timeout, field_manager="perch-webhook"), adopt_timeout=adopt
    )
