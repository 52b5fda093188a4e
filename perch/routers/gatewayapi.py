"""Gateway API: an HTTPRoute with weighted backendRefs to the primary and canary Services.

With gatewayRefs the route attaches to those Gateways (north-south); without, it attaches to the
primary Service itself, as the GAMMA initiative defines mesh routing (east-west).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from perch.routers.base import RouteRef, RouteTarget, plain, primary_service_name
from perch.spec import CanarySpec

GROUP = "gateway.networking.k8s.io"
VERSION = "v1"


class GatewayAPIRouter:
    provider = "gatewayapi"

    def refs(self, target: RouteTarget, spec: CanarySpec) -> tuple[RouteRef, ...]:
        return (RouteRef(GROUP, VERSION, "httproutes", "HTTPRoute", target.name),)

    def build(
        self, target: RouteTarget, spec: CanarySpec, *, canary_weight: int
    ) -> list[dict[str, Any]]:
        svc = spec.service
        primary = primary_service_name(target, spec)
        canary = max(0, min(100, canary_weight))
        parent_refs: list[dict[str, Any]] = []
        for ref in svc.gateway_refs:
            parent: dict[str, Any] = {"name": ref.name}
            if ref.namespace:
                parent["namespace"] = ref.namespace
            if ref.section_name:
                parent["sectionName"] = ref.section_name
            if ref.port is not None:
                parent["port"] = ref.port
            parent_refs.append(parent)
        if not parent_refs:
            parent_refs.append({"group": "", "kind": "Service", "name": primary, "port": svc.port})
        rule: dict[str, Any] = {
            "backendRefs": [
                {
                    "group": "",
                    "kind": "Service",
                    "name": primary,
                    "port": svc.port,
                    "weight": 100 - canary,
                },
                {
                    "group": "",
                    "kind": "Service",
                    "name": target.canary,
                    "port": svc.port,
                    "weight": canary,
                },
            ]
        }
        if svc.match:
            rule["matches"] = [plain(m) for m in svc.match]
        if svc.timeout:
            rule["timeouts"] = {"request": svc.timeout}
        filters = _header_filters(svc.headers.to_wire() if svc.headers else None)
        if filters:
            rule["filters"] = filters
        route_spec: dict[str, Any] = {"parentRefs": parent_refs, "rules": [rule]}
        if svc.hosts:
            route_spec["hostnames"] = list(svc.hosts)
        return [
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "HTTPRoute",
                "metadata": target.metadata(target.name),
                "spec": route_spec,
            }
        ]

    def weights(
        self, route: Mapping[str, Any], target: RouteTarget, spec: CanarySpec
    ) -> tuple[int, int] | None:
        if route.get("kind") != "HTTPRoute":
            return None
        primary = primary_service_name(target, spec)
        for rule in (route.get("spec") or {}).get("rules") or ():
            found = {
                ref.get("name"): int(ref.get("weight", 1))
                for ref in rule.get("backendRefs") or ()
                if ref.get("name") in (primary, target.canary)
            }
            if len(found) == 2:
                return found[primary], found[target.canary]
        return None


def _header_filters(headers: Any) -> list[dict[str, Any]]:
    """Flagger's Istio-style `headers: {request: {set, add, remove}, response: …}` as filters."""
    if not headers:
        return []
    filters: list[dict[str, Any]] = []
    for side, kind, key in (
        ("request", "RequestHeaderModifier", "requestHeaderModifier"),
        ("response", "ResponseHeaderModifier", "responseHeaderModifier"),
    ):
        ops = headers.get(side)
        if not ops:
            continue
        modifier: dict[str, Any] = {}
        for op in ("set", "add"):
            if ops.get(op):
                modifier[op] = [{"name": k, "value": v} for k, v in ops[op].items()]
        if ops.get("remove"):
            modifier["remove"] = list(ops["remove"])
        if modifier:
            filters.append({"type": kind, key: modifier})
    return filters
