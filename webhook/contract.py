"""The contract between the HTTP shell (app.py) and the admission logic behind it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol


class MalformedReview(ValueError):
    """The request body is not a usable AdmissionReview; the shell answers 400 with this reason."""


@dataclass(frozen=True, slots=True)
class AdmitResult:
    # The whole AdmissionReview to send back (apiVersion, kind, response).
    review: dict[str, Any]
    # A short label for metrics and logs, e.g. "allow", "canary-started", "deny".
    decision: str


class Admitter(Protocol):
    def admit(self, body: Mapping[str, Any]) -> AdmitResult:
        """Decide on one AdmissionReview; raise MalformedReview for a request that is not one."""
        ...

    def ready(self) -> bool:
        """True once the admitter can do its work (it can reach the Kubernetes API)."""
        ...
