"""The router Protocol and what every router needs to know about its target."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from perch.names import LABEL_MANAGED_BY, LABEL_TARGET, MANAGED_BY_VALUE, canary_name
from perch.spec import CanarySpec


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


class Router(Protocol):
    """Builds the route objects for a target at a given canary weight, and reads the weight back."""

    provider: str

    def refs(self, target: RouteTarget, spec: CanarySpec) -> tuple[RouteRef, ...]:
        """The route objects this router owns for the target, in creation order."""
        ...

    def build(
        self, target: RouteTarget, spec: CanarySpec, *, canary_weight: int
    ) -> list[dict[str, Any]]:
        """The full route objects, the canary getting `canary_weight` percent."""
        ...

    def weights(
        self, route: Mapping[str, Any], target: RouteTarget, spec: CanarySpec
    ) -> tuple[int, int] | None:
        """(primary, canary) weights read back from a route object, None when it is not ours."""
        ...
