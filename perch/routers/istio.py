"""Istio: a VirtualService splitting the host between the primary and canary Services.

Built as Flagger builds it, minus the primary copy: the primary is the user's own Deployment and
Service, so the route's destinations are `<service>` and `<name>-canary`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from perch.names import PRIMARY_SUFFIX
from perch.routers.base import RouteRef, RouteTarget, plain, primary_service_name
from perch.spec import CanarySpec

GROUP = "networking.istio.io"
VERSION = "v1"
# Traffic from inside the mesh (the load tester, other services) must be split as well.
MESH_GATEWAY = "mesh"


def _weight_pair(canary_weight: int) -> tuple[int, int]:
    canary = max(0, min(100, canary_weight))
    return 100 - canary, canary


class IstioRouter:
    provider = "istio"

    def refs(self, target: RouteTarget, spec: CanarySpec) -> tuple[RouteRef, ...]:
        refs = [RouteRef(GROUP, VERSION, "virtualservices", "VirtualService", target.name)]
        if spec.service.traffic_policy is not None:
            refs.append(
                RouteRef(
                    GROUP,
                    VERSION,
                    "destinationrules",
                    "DestinationRule",
                    target.name + PRIMARY_SUFFIX,
                )
            )
            refs.append(
                RouteRef(GROUP, VERSION, "destinationrules", "DestinationRule", target.canary)
            )
        return tuple(refs)

    def build(
        self, target: RouteTarget, spec: CanarySpec, *, canary_weight: int
    ) -> list[dict[str, Any]]:
        objects = [self._virtual_service(target, spec, canary_weight)]
        policy = spec.service.traffic_policy
        # DestinationRules only carry a trafficPolicy. Without one Perch makes none, so that it
        # never shadows a DestinationRule the user keeps for the same host (mTLS, outlier rules).
        if policy is not None:
            primary_host = primary_service_name(target, spec)
            for name, host in (
                (target.name + PRIMARY_SUFFIX, primary_host),
                (target.canary, target.canary),
            ):
                objects.append(
                    {
                        "apiVersion": f"{GROUP}/{VERSION}",
                        "kind": "DestinationRule",
                        "metadata": target.metadata(name),
                        "spec": {"host": host, "trafficPolicy": plain(policy)},
                    }
                )
        return objects

    def _virtual_service(
        self, target: RouteTarget, spec: CanarySpec, canary_weight: int
    ) -> dict[str, Any]:
        svc = spec.service
        primary_host = primary_service_name(target, spec)
        primary_weight, weight = _weight_pair(canary_weight)
        port = {"number": svc.port}
        route: dict[str, Any] = {
            "route": [
                {"destination": {"host": primary_host, "port": port}, "weight": primary_weight},
                {"destination": {"host": target.canary, "port": dict(port)}, "weight": weight},
            ]
        }
        if svc.match:
            route["match"] = [plain(m) for m in svc.match]
        if svc.timeout:
            route["timeout"] = svc.timeout
        if svc.retries is not None:
            route["retries"] = svc.retries.to_wire()
        if svc.headers is not None:
            route["headers"] = svc.headers.to_wire()
        if svc.rewrite is not None:
            # `type` belongs to the Gateway API's rewrite; Istio's HTTPRewrite has no such field.
            route["rewrite"] = {k: v for k, v in svc.rewrite.to_wire().items() if k != "type"}
        if svc.cors_policy is not None:
            route["corsPolicy"] = plain(svc.cors_policy)
        hosts = [primary_host, *[h for h in svc.hosts if h != primary_host]]
        vs_spec: dict[str, Any] = {"hosts": hosts, "http": [route]}
        if svc.gateways:
            gateways = list(svc.gateways)
            if MESH_GATEWAY not in gateways:
                gateways.append(MESH_GATEWAY)
            vs_spec["gateways"] = gateways
        return {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "VirtualService",
            "metadata": target.metadata(target.name),
            "spec": vs_spec,
        }

    def weights(
        self, route: Mapping[str, Any], target: RouteTarget, spec: CanarySpec
    ) -> tuple[int, int] | None:
        if route.get("kind") != "VirtualService":
            return None
        primary_host = primary_service_name(target, spec)
        for http in (route.get("spec") or {}).get("http") or ():
            found: dict[str, int] = {}
            for dest in http.get("route") or ():
                host = (dest.get("destination") or {}).get("host")
                if host in (primary_host, target.canary):
                    found[host] = int(dest.get("weight") or 0)
            if len(found) == 2:
                return found[primary_host], found[target.canary]
        return None
