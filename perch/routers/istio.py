"""Istio: a VirtualService splitting the host between the primary and canary Services.

Built as Flagger builds it, minus the primary copy: the primary is the user's own Deployment and
Service, so the route's destinations are `<service>` and `<name>-canary`.

While a canary is analysed the VirtualService carries what its strategy adds, before the weighted
route (Istio takes the first http route that matches):

- A/B testing: an ``ab-testing`` route with ``analysis.match`` (ANDed with ``service.match``) to
  the canary alone; the weighted route stays at 100/0, so every other request reaches the primary.
- blue/green with ``mirror``: the weighted route (100/0) mirrors ``mirrorWeight`` percent of its
  requests to the canary (``mirror`` and ``mirrorPercentage``); the canary's answers are dropped.
- session affinity: the canary's destination adds ``Set-Cookie: <cookieName>=<value>``, and a
  ``sticky-canary`` route sends requests carrying it to the canary; with ``primaryCookieName`` the
  primary's destination sets that cookie for one interval and a ``sticky-primary`` route keeps
  its holders on the primary until the next step.

Before and after the analysis it is the weighted route alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from perch.names import PRIMARY_SUFFIX
from perch.routers.base import (
    AB_TESTING_RULE,
    SET_COOKIE,
    STICKY_CANARY_RULE,
    STICKY_PRIMARY_RULE,
    RouteRef,
    RouteTarget,
    analysis_rules,
    cookie_regex,
    cookie_value,
    merged_matches,
    plain,
    primary_cookie_max_age,
    primary_service_name,
    set_cookie,
)
from perch.spec import CanarySpec

GROUP = "networking.istio.io"
VERSION = "v1"
# Traffic from inside the mesh (the load tester, other services) must be split as well.
MESH_GATEWAY = "mesh"
# Istio matches header names in lower case.
COOKIE_HEADER = "cookie"


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
        self, target: RouteTarget, spec: CanarySpec, *, canary_weight: int, revision: str = ""
    ) -> list[dict[str, Any]]:
        objects = [self._virtual_service(target, spec, canary_weight, revision)]
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
        self, target: RouteTarget, spec: CanarySpec, canary_weight: int, revision: str
    ) -> dict[str, Any]:
        svc = spec.service
        primary_host = primary_service_name(target, spec)
        primary_weight, weight = _weight_pair(canary_weight)
        port = {"number": svc.port}
        common: dict[str, Any] = {}
        if svc.timeout:
            common["timeout"] = svc.timeout
        if svc.retries is not None:
            common["retries"] = svc.retries.to_wire()
        if svc.headers is not None:
            common["headers"] = svc.headers.to_wire()
        if svc.rewrite is not None:
            # `type` belongs to the Gateway API's rewrite; Istio's HTTPRewrite has no such field.
            common["rewrite"] = {k: v for k, v in svc.rewrite.to_wire().items() if k != "type"}
        if svc.cors_policy is not None:
            common["corsPolicy"] = plain(svc.cors_policy)
        service_match = [plain(m) for m in svc.match]

        def destination(host: str, share: int) -> dict[str, Any]:
            return {"destination": {"host": host, "port": dict(port)}, "weight": share}

        def only(name: str, host: str, match: list[dict[str, Any]]) -> dict[str, Any]:
            return {"name": name, "match": match, "route": [destination(host, 100)], **common}

        primary = destination(primary_host, primary_weight)
        canary = destination(target.canary, weight)
        route: dict[str, Any] = {"route": [primary, canary]}
        if service_match:
            route["match"] = service_match
        route.update(common)
        http = [route]

        analysis = spec.analysis
        if revision and analysis_rules(spec, canary_weight=weight):
            if analysis.strategy == "ab-testing":
                conditions = [plain(m) for m in analysis.match]
                http.insert(
                    0,
                    only(AB_TESTING_RULE, target.canary, merged_matches(conditions, service_match)),
                )
            if analysis.mirror:
                route["mirror"] = {"host": target.canary, "port": dict(port)}
                if analysis.mirror_weight is not None:
                    route["mirrorPercentage"] = {"value": float(analysis.mirror_weight)}
            affinity = analysis.session_affinity
            if affinity is not None:
                sticky: list[dict[str, Any]] = []
                for dest, host, rule, name, value, max_age in (
                    (
                        canary,
                        target.canary,
                        STICKY_CANARY_RULE,
                        affinity.cookie_name,
                        cookie_value(target, revision),
                        affinity.max_age,
                    ),
                    (
                        primary,
                        primary_host,
                        STICKY_PRIMARY_RULE,
                        affinity.primary_cookie_name,
                        cookie_value(target, revision, step=weight),
                        primary_cookie_max_age(spec),
                    ),
                ):
                    if name is None:
                        continue
                    cookie = set_cookie(affinity, name=name, value=value, max_age=max_age)
                    dest["headers"] = {"response": {"add": {SET_COOKIE: cookie}}}
                    match = {"headers": {COOKIE_HEADER: {"regex": cookie_regex(name, value)}}}
                    sticky.append(only(rule, host, merged_matches([match], service_match)))
                http[:0] = sticky

        hosts = [primary_host, *[h for h in svc.hosts if h != primary_host]]
        vs_spec: dict[str, Any] = {"hosts": hosts, "http": http}
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

    def analysing(self, route: Mapping[str, Any], target: RouteTarget, spec: CanarySpec) -> bool:
        if route.get("kind") != "VirtualService":
            return False
        ours = {primary_service_name(target, spec), target.canary}
        for http in (route.get("spec") or {}).get("http") or ():
            mirrors = [http.get("mirror") or {}]
            mirrors += [m.get("destination") or {} for m in http.get("mirrors") or ()]
            if any(m.get("host") == target.canary for m in mirrors):
                return True
            dests = [
                d
                for d in http.get("route") or ()
                if (d.get("destination") or {}).get("host") in ours
            ]
            hosts = {d["destination"]["host"] for d in dests}
            if len(hosts) == 1 or any(d.get("headers") for d in dests):
                return True
        return False
