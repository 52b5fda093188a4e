"""Turns what the analyzer reads (Deployments, routes, the primary's annotations) into Observations.

Pure functions over API objects as dicts; the tick reads the objects (from the watch cache where it
can) and hands them in.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast, get_args

from analyzer.model import ControlAction, Workload
from perch.names import ANNOTATION_ACTION, ANNOTATION_REVISION
from perch.revision import template_revision
from perch.routers import RouteTarget, router_for
from perch.spec import CanarySpec

_CONTROLS = get_args(ControlAction)


def workload(deployment: Mapping[str, Any] | None, *, canary: bool = False) -> Workload:
    """Readiness of a Deployment as its status reports it.

    The canary's revision is the one Perch recorded on it, since its template is relabelled and
    so hashes differently from the template the user applied.
    """
    if deployment is None:
        return Workload(exists=False, desired=0)
    spec = deployment.get("spec") or {}
    status = deployment.get("status") or {}
    meta = deployment.get("metadata") or {}
    desired = int(spec.get("replicas", 1) if spec.get("replicas") is not None else 1)
    ready = int(status.get("readyReplicas") or 0)
    updated = int(status.get("updatedReplicas") or 0)
    available = int(status.get("availableReplicas") or 0)
    observed = int(status.get("observedGeneration") or 0)
    generation = int(meta.get("generation") or 0)
    rolled_out = (
        observed >= generation
        and updated >= desired
        and available >= desired
        and int(status.get("replicas") or 0) <= desired
    )
    if canary:
        revision = str((meta.get("annotations") or {}).get(ANNOTATION_REVISION) or "")
    else:
        revision = template_revision(spec.get("template") or {})
    return Workload(
        exists=True,
        desired=desired,
        ready=ready,
        updated=updated,
        rolled_out=rolled_out,
        revision=revision,
    )


def control_action(primary: Mapping[str, Any]) -> ControlAction | None:
    value = ((primary.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_ACTION)
    if isinstance(value, str) and value.strip() in _CONTROLS:
        return cast(ControlAction, value.strip())
    return None


def route_weights(
    routes: list[Mapping[str, Any]], *, name: str, namespace: str, spec: CanarySpec
) -> tuple[int, int] | None:
    """(primary, canary) from the first route object that carries both destinations."""
    target = RouteTarget(name=name, namespace=namespace)
    router = router_for(spec.provider)
    for route in routes:
        weights = router.weights(route, target, spec)
        if weights is not None:
            return weights
    return None


def route_analysing(
    routes: list[Mapping[str, Any]], *, name: str, namespace: str, spec: CanarySpec
) -> bool:
    """Whether a route object carries more than the weighted split (an A/B match rule, a mirror,
    session cookies): what the analyzer compares with what the status calls for."""
    target = RouteTarget(name=name, namespace=namespace)
    router = router_for(spec.provider)
    return any(router.analysing(route, target, spec) for route in routes)
