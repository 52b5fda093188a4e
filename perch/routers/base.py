"""The router Protocol and what every router needs to know about its target."""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from perch.names import LABEL_MANAGED_BY, LABEL_TARGET, MANAGED_BY_VALUE, canary_name
from perch.spec import CanarySpec, SessionAffinity

# Names of the rules an analysis adds before the weighted split (Istio http routes, Gateway API
# rules), so that a reader of the route sees what each is for.
AB_TESTING_RULE = "ab-testing"
STICKY_CANARY_RULE = "sticky-canary"
STICKY_PRIMARY_RULE = "sticky-primary"
SET_COOKIE = "Set-Cookie"


@dataclass(frozen=True, slots=True)
class RouteRef:
    """Where a route object lives in the API: enough to GET, create or patch it."""

    group: str
    version: str
    plural: str
    kind: str
    name: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"


@dataclass(frozen=True, slots=True)
class RouteTarget:
    """The primary a route serves: its name, namespace and what Perch objects inherit from it."""

    name: str
    namespace: str
    owner_references: tuple[Mapping[str, Any], ...] = ()

    @property
    def canary(self) -> str:
        return canary_name(self.name)

    def metadata(self, name: str) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "name": name,
            "namespace": self.namespace,
            "labels": {LABEL_MANAGED_BY: MANAGED_BY_VALUE, LABEL_TARGET: self.name},
        }
        if self.owner_references:
            meta["ownerReferences"] = [dict(o) for o in self.owner_references]
        return meta


def primary_service_name(target: RouteTarget, spec: CanarySpec) -> str:
    """The user's Service in front of the primary: spec.service.name, else the Deployment's name."""
    return spec.service.name or target.name


def plain(value: Any) -> Any:
    """JSON-compatible deep copy of spec values (which may be read-only mappings or tuples)."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def analysis_rules(spec: CanarySpec, *, canary_weight: int) -> bool:
    """Whether a route built while the canary is analysed, at this weight, carries more than the
    weighted split: the A/B match rule, the mirror, or the session-affinity rules and cookies.

    Each belongs to one strategy (perch.spec refuses the others): A/B testing's match for the
    whole analysis; blue/green's mirror while the canary is held at weight 0 (not once all the
    traffic has switched to it); the session cookies while a weighted canary has some weight.
    """
    analysis = spec.analysis
    if analysis.strategy == "ab-testing":
        return True
    if analysis.strategy == "blue-green":
        return analysis.mirror and canary_weight == 0
    return analysis.session_affinity is not None and canary_weight > 0


def cookie_value(target: RouteTarget, revision: str, *, step: int | None = None) -> str:
    """A session cookie's value, derived from the release (and the step, for the primary's).

    Flagger draws a random value and keeps it in the Canary's status; derived, it is the same for
    every analyzer and after a restart, and a cookie of an earlier release matches no rule of a
    later one. The primary's changes at each step, so its holders are split again by the new
    weight.
    """
    seed = f"{target.namespace}/{target.name}/{revision}"
    if step is not None:
        seed += f"/{step}"
    return hashlib.sha256(seed.encode()).hexdigest()[:20]


def set_cookie(affinity: SessionAffinity, *, name: str, value: str, max_age: int) -> str:
    """The Set-Cookie header value. Path defaults to / (Flagger sets none, so a browser would
    keep the cookie for the directory of the first response only)."""
    parts = [f"{name}={value}", f"Max-Age={max_age}", f"Path={affinity.path or '/'}"]
    if affinity.domain:
        parts.append(f"Domain={affinity.domain}")
    if affinity.same_site:
        parts.append(f"SameSite={affinity.same_site}")
    for flag, on in (
        ("HttpOnly", affinity.http_only),
        ("Secure", affinity.secure),
        ("Partitioned", affinity.partitioned),
    ):
        if on:
            parts.append(flag)
    return "; ".join(parts)


def primary_cookie_max_age(spec: CanarySpec) -> int:
    """The primary's cookie lasts one step (Flagger: the analysis interval)."""
    return max(1, math.ceil(spec.analysis.interval_seconds))


def cookie_regex(name: str, value: str) -> str:
    """An RE2 pattern for a Cookie header that carries name=value among its cookies; anchored, so
    it means the same to engines that match the whole value and to those that search in it."""
    escaped = name.replace(".", "\\.")
    return rf"^(.*;\s*)?{escaped}={value}(;.*)?$"


def merged_matches(
    conditions: Sequence[Mapping[str, Any]], service: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Each condition ANDed with each of service.match (the conditions alone without any).

    Maps (Istio's headers, queryParams, sourceLabels) are merged and lists of named entries (the
    Gateway API's headers, queryParams) joined, the condition's entry winning a name both have;
    any other field of the condition replaces the service's. (Flagger keeps only the condition's
    headers and sourceLabels, dropping its uri, method or queryParams.)
    """
    if not service:
        return [copy.deepcopy(dict(condition)) for condition in conditions]
    merged: list[dict[str, Any]] = []
    for condition in conditions:
        for base in service:
            match = copy.deepcopy(dict(base))
            for key, value in condition.items():
                old = match.get(key)
                if isinstance(value, Mapping) and isinstance(old, Mapping):
                    match[key] = {**old, **copy.deepcopy(dict(value))}
                elif isinstance(value, list) and isinstance(old, list):
                    names = {entry.get("name") for entry in value}
                    kept = [entry for entry in old if entry.get("name") not in names]
                    match[key] = kept + copy.deepcopy(value)
                else:
                    match[key] = copy.deepcopy(value)
            merged.append(match)
    return merged


class Router(Protocol):
    """Builds the route objects for a target and reads back what a route says.

    A route is a pure function of the spec, the canary's weight and the revision under analysis:
    without a revision it is the plain weighted split (before and after an analysis); with one it
    also carries what the analysis adds (:func:`analysis_rules`).
    """

    provider: str

    def refs(self, target: RouteTarget, spec: CanarySpec) -> tuple[RouteRef, ...]:
        """The route objects this router owns for the target, in creation order."""
        ...

    def build(
        self, target: RouteTarget, spec: CanarySpec, *, canary_weight: int, revision: str = ""
    ) -> list[dict[str, Any]]:
        """The full route objects, the canary getting `canary_weight` percent of the weighted
        split; `revision` is the canary revision under analysis, "" when none."""
        ...

    def weights(
        self, route: Mapping[str, Any], target: RouteTarget, spec: CanarySpec
    ) -> tuple[int, int] | None:
        """(primary, canary) weights of the weighted split read back from a route object, None
        when it is not ours."""
        ...

    def analysing(self, route: Mapping[str, Any], target: RouteTarget, spec: CanarySpec) -> bool:
        """Whether a route object carries more than the weighted split (what build() adds when
        analysis_rules() holds): a rule to the canary or the primary alone, a mirror to the
        canary, or a Set-Cookie on a destination. Read from the structure, not from names or
        cookie values, so that an API server's defaults do not change the answer."""
        ...
