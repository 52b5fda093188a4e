"""Gateway API: an HTTPRoute with weighted backendRefs to the primary and canary Services.

With gatewayRefs the route attaches to those Gateways (north-south); without, it attaches to the
primary Service itself, as the GAMMA initiative defines mesh routing (east-west).

While a canary is analysed the HTTPRoute carries what its strategy adds, as rules that take
precedence over the weighted rule (the Gateway API prefers the rule with more header matches,
then the first in the list):

- A/B testing: an ``ab-testing`` rule whose matches are ``analysis.match`` translated from
  Flagger's (Istio's) form (headers and query parameters Exact or RegularExpression, uri as path
  Exact, PathPrefix or RegularExpression, method) to the canary alone; the weighted rule stays at
  100/0. perch.spec refuses what an HTTPRouteMatch cannot say (sourceLabels, prefix header
  matches, ...), naming the field.
- blue/green with ``mirror``: a RequestMirror filter on the weighted rule, with ``percent`` =
  ``mirrorWeight`` (in the standard channel since Gateway API v1.3).
- session affinity: a ResponseHeaderModifier filter on the canary's backendRef adds the
  ``Set-Cookie``, and a ``sticky-canary`` rule matches it on the ``Cookie`` header
  (RegularExpression, which the Gateway API leaves to the implementation's dialect: Perch's
  pattern is plain RE2); ``primaryCookieName`` likewise for the primary.

Before and after the analysis it is the weighted rule alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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

GROUP = "gateway.networking.k8s.io"
VERSION = "v1"
COOKIE_HEADER = "Cookie"
_STRING_MATCH_TYPES = {"exact": "Exact", "regex": "RegularExpression"}
_PATH_MATCH_TYPES = {"exact": "Exact", "prefix": "PathPrefix", "regex": "RegularExpression"}


class GatewayAPIRouter:
    provider = "gatewayapi"

    def refs(self, target: RouteTarget, spec: CanarySpec) -> tuple[RouteRef, ...]:
        return (RouteRef(GROUP, VERSION, "httproutes", "HTTPRoute", target.name),)

    def build(
        self, target: RouteTarget, spec: CanarySpec, *, canary_weight: int, revision: str = ""
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

        def backend(name: str, weight: int | None = None) -> dict[str, Any]:
            ref: dict[str, Any] = {"group": "", "kind": "Service", "name": name, "port": svc.port}
            if weight is not None:
                ref["weight"] = weight
            return ref

        common: dict[str, Any] = {}
        if svc.timeout:
            common["timeouts"] = {"request": svc.timeout}
        filters = _header_filters(svc.headers.to_wire() if svc.headers else None)
        service_match = [plain(m) for m in svc.match]

        def only(name: str, service: str, matches: list[dict[str, Any]]) -> dict[str, Any]:
            rule: dict[str, Any] = {"name": name, "matches": matches}
            rule["backendRefs"] = [backend(service)]
            if filters:
                rule["filters"] = [dict(f) for f in filters]
            rule.update(common)
            return rule

        primary_ref = backend(primary, 100 - canary)
        canary_ref = backend(target.canary, canary)
        rule: dict[str, Any] = {"backendRefs": [primary_ref, canary_ref]}
        if service_match:
            rule["matches"] = service_match
        rule.update(common)
        if filters:
            rule["filters"] = filters
        rules = [rule]

        analysis = spec.analysis
        if revision and analysis_rules(spec, canary_weight=canary):
            if analysis.strategy == "ab-testing":
                conditions = [_route_match(plain(m)) for m in analysis.match]
                matches = merged_matches(conditions, service_match)
                rules.insert(0, only(AB_TESTING_RULE, target.canary, matches))
            if analysis.mirror:
                mirror: dict[str, Any] = {"backendRef": backend(target.canary)}
                if analysis.mirror_weight is not None:
                    mirror["percent"] = analysis.mirror_weight
                rule["filters"] = [*filters, {"type": "RequestMirror", "requestMirror": mirror}]
            affinity = analysis.session_affinity
            if affinity is not None:
                sticky: list[dict[str, Any]] = []
                for backend_ref, service, name_of_rule, name, value, max_age in (
                    (
                        canary_ref,
                        target.canary,
                        STICKY_CANARY_RULE,
                        affinity.cookie_name,
                        cookie_value(target, revision),
                        affinity.max_age,
                    ),
                    (
                        primary_ref,
                        primary,
                        STICKY_PRIMARY_RULE,
                        affinity.primary_cookie_name,
                        cookie_value(target, revision, step=canary),
                        primary_cookie_max_age(spec),
                    ),
                ):
                    if name is None:
                        continue
                    cookie = set_cookie(affinity, name=name, value=value, max_age=max_age)
                    backend_ref["filters"] = [
                        {
                            "type": "ResponseHeaderModifier",
                            "responseHeaderModifier": {
                                "add": [{"name": SET_COOKIE, "value": cookie}]
                            },
                        }
                    ]
                    match = {
                        "headers": [
                            {
                                "name": COOKIE_HEADER,
                                "type": "RegularExpression",
                                "value": cookie_regex(name, value),
                            }
                        ]
                    }
                    sticky.append(
                        only(name_of_rule, service, merged_matches([match], service_match))
                    )
                rules[:0] = sticky

        route_spec: dict[str, Any] = {"parentRefs": parent_refs, "rules": rules}
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

    def analysing(self, route: Mapping[str, Any], target: RouteTarget, spec: CanarySpec) -> bool:
        if route.get("kind") != "HTTPRoute":
            return False
        ours = {primary_service_name(target, spec), target.canary}
        for rule in (route.get("spec") or {}).get("rules") or ():
            for f in rule.get("filters") or ():
                mirrored = ((f.get("requestMirror") or {}).get("backendRef") or {}).get("name")
                if f.get("type") == "RequestMirror" and mirrored == target.canary:
                    return True
            refs = [r for r in rule.get("backendRefs") or () if r.get("name") in ours]
            if len({r["name"] for r in refs}) == 1 or any(r.get("filters") for r in refs):
                return True
        return False


def _route_match(condition: Mapping[str, Any]) -> dict[str, Any]:
    """One of Flagger's (Istio's) match conditions as an HTTPRouteMatch; perch.spec has refused
    what has no translation."""
    match: dict[str, Any] = {}
    uri = condition.get("uri")
    if uri:
        ((kind, value),) = uri.items()
        match["path"] = {"type": _PATH_MATCH_TYPES[kind], "value": value}
    method = condition.get("method")
    if method:
        match["method"] = method["exact"]
    for key in ("headers", "queryParams"):
        named = condition.get(key)
        if named:
            match[key] = [
                {"name": name, "type": _STRING_MATCH_TYPES[kind], "value": value}
                for name, string_match in named.items()
                for kind, value in string_match.items()
            ]
    return match


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
