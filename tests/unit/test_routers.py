"""Route objects for each provider: schema-valid, weighted as asked, read back the same."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from perch.routers import RouteTarget, router_for
from perch.spec import parse_spec
from tests.validation import validate

FULL_ISTIO = """\
service:
  port: 9898
  targetPort: http
  gateways: [public-gateway.istio-system.svc.cluster.local]
  hosts: [app.example.com]
  timeout: 15s
  retries: {attempts: 3, perTryTimeout: 5s, retryOn: "gateway-error,connect-failure"}
  headers:
    request:
      add: {x-canary: "maybe"}
    response:
      remove: [x-internal]
  trafficPolicy:
    tls: {mode: ISTIO_MUTUAL}
  corsPolicy:
    allowOrigins:
    - exact: https://example.com
analysis:
  metrics:
  - name: request-success-rate
    thresholdRange: {min: 99}
"""

FULL_GATEWAY = """\
provider: gatewayapi
service:
  port: 9898
  hosts: [app.example.com]
  timeout: 15s
  gatewayRefs:
  - {name: public, namespace: istio-system, sectionName: https}
  headers:
    request:
      set: {x-canary: "maybe"}
analysis:
  metrics:
  - name: request-success-rate
    thresholdRange: {min: 99}
"""

TARGET = RouteTarget(
    name="podinfo",
    namespace="test",
    owner_references=(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": "podinfo",
            "uid": "u-1",
            "controller": True,
        },
    ),
)


@pytest.mark.parametrize("weight", [0, 5, 50, 100])
def test_istio_virtual_service_and_destination_rules(weight: int) -> None:
    spec = parse_spec(FULL_ISTIO)
    router = router_for("istio")
    objects = router.build(TARGET, spec, canary_weight=weight)
    for obj in objects:
        validate(obj)
        assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "perch"
        assert obj["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    vs, primary_dr, canary_dr = objects
    assert [(r.kind, r.name) for r in router.refs(TARGET, spec)] == [
        ("VirtualService", "podinfo"),
        ("DestinationRule", "podinfo-primary"),
        ("DestinationRule", "podinfo-canary"),
    ]
    http = vs["spec"]["http"][0]
    assert [(d["destination"]["host"], d["weight"]) for d in http["route"]] == [
        ("podinfo", 100 - weight),
        ("podinfo-canary", weight),
    ]
    assert http["timeout"] == "15s"
    assert http["retries"] == {
        "attempts": 3,
        "perTryTimeout": "5s",
        "retryOn": "gateway-error,connect-failure",
    }
    assert http["headers"] == {
        "request": {"add": {"x-canary": "maybe"}},
        "response": {"remove": ["x-internal"]},
    }
    assert vs["spec"]["gateways"] == ["public-gateway.istio-system.svc.cluster.local", "mesh"]
    assert (primary_dr["spec"]["host"], canary_dr["spec"]["host"]) == ("podinfo", "podinfo-canary")
    assert primary_dr["spec"]["trafficPolicy"] == {"tls": {"mode": "ISTIO_MUTUAL"}}
    assert router.weights(vs, TARGET, spec) == (100 - weight, weight)


def test_istio_without_traffic_policy_makes_no_destination_rules() -> None:
    spec = parse_spec("service: {port: 9898}")
    router = router_for("istio")
    assert [o["kind"] for o in router.build(TARGET, spec, canary_weight=0)] == ["VirtualService"]
    vs = router.build(TARGET, spec, canary_weight=0)[0]
    assert "gateways" not in vs["spec"]  # mesh only, Istio's default
    assert vs["spec"]["hosts"] == ["podinfo"]


@pytest.mark.parametrize("weight", [0, 25, 50])
def test_gateway_api_http_route(weight: int) -> None:
    spec = parse_spec(FULL_GATEWAY)
    router = router_for("gatewayapi")
    (route,) = router.build(TARGET, spec, canary_weight=weight)
    validate(route)
    rule = route["spec"]["rules"][0]
    assert [(b["name"], b["weight"]) for b in rule["backendRefs"]] == [
        ("podinfo", 100 - weight),
        ("podinfo-canary", weight),
    ]
    assert route["spec"]["parentRefs"] == [
        {"name": "public", "namespace": "istio-system", "sectionName": "https"}
    ]
    assert rule["timeouts"] == {"request": "15s"}
    assert rule["filters"] == [
        {
            "type": "RequestHeaderModifier",
            "requestHeaderModifier": {"set": [{"name": "x-canary", "value": "maybe"}]},
        }
    ]
    assert router.weights(route, TARGET, spec) == (100 - weight, weight)


def test_gateway_api_without_gateways_attaches_to_the_service() -> None:
    spec = parse_spec("provider: gatewayapi\nservice: {port: 9898}")
    (route,) = router_for("gatewayapi").build(TARGET, spec, canary_weight=0)
    validate(route)
    assert route["spec"]["parentRefs"] == [
        {"group": "", "kind": "Service", "name": "podinfo", "port": 9898}
    ]


def test_weights_of_a_foreign_route_are_none() -> None:
    spec = parse_spec("service: {port: 9898}")
    foreign = {
        "kind": "VirtualService",
        "spec": {"http": [{"route": [{"destination": {"host": "other"}}]}]},
    }
    assert router_for("istio").weights(foreign, TARGET, spec) is None


# --------------------------------------------------------------------------------------------
# What an analysis adds to the route: A/B match, mirror, session affinity
# --------------------------------------------------------------------------------------------

REVISION = "v1-3f9c2a0000000000"
AB_ISTIO = """\
service:
  port: 9898
  timeout: 15s
  match:
  - uri: {prefix: /api}
analysis:
  iterations: 3
  match:
  - headers: {x-canary: {exact: insider}}
  - headers: {cookie: {regex: "^(.*?;)?(canary=always)(;.*)?$"}}
  - sourceLabels: {app: tester}
"""
AB_GATEWAY = """\
provider: gatewayapi
service:
  port: 9898
  timeout: 15s
  gatewayRefs: [{name: public, namespace: istio-system}]
  headers: {request: {set: {x-via: perch}}}
analysis:
  iterations: 3
  match:
  - headers: {x-canary: {exact: insider}, cookie: {regex: "^(.*?;)?(canary=always)(;.*)?$"}}
  - uri: {prefix: /beta}
    method: {exact: GET}
    queryParams: {preview: {regex: "on|yes"}}
"""
MIRROR = "service: {port: 9898}\nanalysis: {iterations: 3, mirror: true, mirrorWeight: 40}\n"
AFFINITY = """\
service: {port: 9898}
analysis:
  stepWeight: 10
  interval: 90s
  sessionAffinity:
    cookieName: flagger-cookie
    maxAge: 21600
    primaryCookieName: primary-flagger-cookie
    secure: true
"""


def build(text: str, *, weight: int, revision: str = REVISION) -> tuple[dict[str, Any], Any]:
    spec = parse_spec(text)
    route = router_for(spec.provider).build(TARGET, spec, canary_weight=weight, revision=revision)
    for obj in route:
        validate(obj)
    return route[0], spec


def destinations(http: dict[str, Any]) -> list[tuple[str, int]]:
    return [(d["destination"]["host"], d["weight"]) for d in http["route"]]


def backends(rule: dict[str, Any]) -> list[tuple[str, int | None]]:
    return [(b["name"], b.get("weight")) for b in rule["backendRefs"]]


def test_istio_ab_testing_sends_the_match_to_the_canary_first_and_the_rest_to_the_primary() -> None:
    vs, spec = build(AB_ISTIO, weight=0)
    router = router_for("istio")
    ab, rest = vs["spec"]["http"]
    assert ab["name"] == "ab-testing"
    assert destinations(ab) == [("podinfo-canary", 100)]
    # Each condition ANDed with service.match; sourceLabels is Istio's own.
    assert ab["match"] == [
        {"uri": {"prefix": "/api"}, "headers": {"x-canary": {"exact": "insider"}}},
        {
            "uri": {"prefix": "/api"},
            "headers": {"cookie": {"regex": "^(.*?;)?(canary=always)(;.*)?$"}},
        },
        {"uri": {"prefix": "/api"}, "sourceLabels": {"app": "tester"}},
    ]
    assert ab["timeout"] == rest["timeout"] == "15s"
    assert destinations(rest) == [("podinfo", 100), ("podinfo-canary", 0)]
    assert rest["match"] == [{"uri": {"prefix": "/api"}}]
    # The weights never move: the route still reads 100/0, and says it carries the A/B rule.
    assert router.weights(vs, TARGET, spec) == (100, 0)
    assert router.analysing(vs, TARGET, spec)
    # Before and after the analysis: the plain split only.
    idle, _ = build(AB_ISTIO, weight=0, revision="")
    assert [destinations(h) for h in idle["spec"]["http"]] == [
        [("podinfo", 100), ("podinfo-canary", 0)]
    ]
    assert not router.analysing(idle, TARGET, spec)


def test_gateway_api_ab_testing_translates_flaggers_match_into_header_and_path_matches() -> None:
    route, spec = build(AB_GATEWAY, weight=0)
    router = router_for("gatewayapi")
    ab, rest = route["spec"]["rules"]
    assert ab["name"] == "ab-testing"
    assert backends(ab) == [("podinfo-canary", None)]
    assert ab["matches"] == [
        {
            "headers": [
                {"name": "x-canary", "type": "Exact", "value": "insider"},
                {
                    "name": "cookie",
                    "type": "RegularExpression",
                    "value": "^(.*?;)?(canary=always)(;.*)?$",
                },
            ]
        },
        {
            "path": {"type": "PathPrefix", "value": "/beta"},
            "method": "GET",
            "queryParams": [{"name": "preview", "type": "RegularExpression", "value": "on|yes"}],
        },
    ]
    # The A/B rule keeps the route's filters and timeouts, as the weighted rule does.
    assert ab["filters"] == rest["filters"] and ab["timeouts"] == {"request": "15s"}
    assert backends(rest) == [("podinfo", 100), ("podinfo-canary", 0)]
    assert router.weights(route, TARGET, spec) == (100, 0)
    assert router.analysing(route, TARGET, spec)
    idle, _ = build(AB_GATEWAY, weight=0, revision="")
    assert [backends(r) for r in idle["spec"]["rules"]] == [
        [("podinfo", 100), ("podinfo-canary", 0)]
    ]
    assert not router.analysing(idle, TARGET, spec)


def test_gateway_api_ab_match_is_anded_with_the_services_matches() -> None:
    text = AB_GATEWAY.replace(
        "  headers: {request: {set: {x-via: perch}}}\n",
        "  match:\n  - path: {type: PathPrefix, value: /app}\n"
        "    headers: [{name: x-tenant, value: blue}]\n",
    )
    route, _ = build(text, weight=0)
    first = route["spec"]["rules"][0]["matches"][0]
    assert first == {
        "path": {"type": "PathPrefix", "value": "/app"},
        "headers": [
            {"name": "x-tenant", "value": "blue"},
            {"name": "x-canary", "type": "Exact", "value": "insider"},
            {
                "name": "cookie",
                "type": "RegularExpression",
                "value": "^(.*?;)?(canary=always)(;.*)?$",
            },
        ],
    }


@pytest.mark.parametrize("provider", ["istio", "gatewayapi"])
def test_blue_green_mirrors_at_weight_0_only_while_analysed(provider: str) -> None:
    text = ("provider: gatewayapi\n" if provider == "gatewayapi" else "") + MIRROR
    router = router_for(provider)
    mirrored, spec = build(text, weight=0)
    if provider == "istio":
        (http,) = mirrored["spec"]["http"]
        assert http["mirror"] == {"host": "podinfo-canary", "port": {"number": 9898}}
        assert http["mirrorPercentage"] == {"value": 40.0}
        assert destinations(http) == [("podinfo", 100), ("podinfo-canary", 0)]
    else:
        (rule,) = mirrored["spec"]["rules"]
        assert rule["filters"] == [
            {
                "type": "RequestMirror",
                "requestMirror": {
                    "backendRef": {
                        "group": "",
                        "kind": "Service",
                        "name": "podinfo-canary",
                        "port": 9898,
                    },
                    "percent": 40,
                },
            }
        ]
    assert router.analysing(mirrored, TARGET, spec)
    assert router.weights(mirrored, TARGET, spec) == (100, 0)
    # All traffic switched to the canary (the last iteration), and outside the analysis: no mirror.
    for weight, revision in ((100, REVISION), (0, "")):
        plain_route, _ = build(text, weight=weight, revision=revision)
        assert not router.analysing(plain_route, TARGET, spec)
        assert "mirror" not in json.dumps(plain_route).lower()


def test_mirror_without_mirror_weight_mirrors_every_request() -> None:
    text = "analysis: {iterations: 2, mirror: true}\n"
    vs, _ = build("service: {port: 9898}\n" + text, weight=0)
    assert "mirrorPercentage" not in vs["spec"]["http"][0]
    route, _ = build("provider: gatewayapi\nservice: {port: 9898}\n" + text, weight=0)
    assert "percent" not in route["spec"]["rules"][0]["filters"][0]["requestMirror"]


def cookie_of(set_cookie: str) -> tuple[str, str]:
    name, _, value = set_cookie.split(";", maxsplit=1)[0].partition("=")
    return name, value


@pytest.mark.parametrize("provider", ["istio", "gatewayapi"])
def test_session_affinity_sets_cookies_and_routes_them_first(provider: str) -> None:
    text = ("provider: gatewayapi\n" if provider == "gatewayapi" else "") + AFFINITY
    router = router_for(provider)
    route, spec = build(text, weight=30)
    if provider == "istio":
        sticky_canary, sticky_primary, weighted = route["spec"]["http"]
        assert destinations(sticky_canary) == [("podinfo-canary", 100)]
        assert destinations(sticky_primary) == [("podinfo", 100)]
        primary_dest, canary_dest = weighted["route"]
        set_primary = primary_dest["headers"]["response"]["add"]["Set-Cookie"]
        set_canary = canary_dest["headers"]["response"]["add"]["Set-Cookie"]
        patterns = [
            r["match"][0]["headers"]["cookie"]["regex"] for r in (sticky_canary, sticky_primary)
        ]
    else:
        sticky_canary, sticky_primary, weighted = route["spec"]["rules"]
        assert backends(sticky_canary) == [("podinfo-canary", None)]
        assert backends(sticky_primary) == [("podinfo", None)]

        def added(ref: dict[str, Any]) -> str:
            (f,) = ref["filters"]
            assert f["type"] == "ResponseHeaderModifier"
            (header,) = f["responseHeaderModifier"]["add"]
            assert header["name"] == "Set-Cookie"
            return str(header["value"])

        set_primary, set_canary = (added(ref) for ref in weighted["backendRefs"])
        patterns = []
        for rule in (sticky_canary, sticky_primary):
            (header,) = rule["matches"][0]["headers"]
            assert (header["name"], header["type"]) == ("Cookie", "RegularExpression")
            patterns.append(header["value"])
    assert (sticky_canary["name"], sticky_primary["name"]) == ("sticky-canary", "sticky-primary")
    assert router.weights(route, TARGET, spec) == (70, 30)
    assert router.analysing(route, TARGET, spec)
    # The canary's cookie lasts maxAge, the primary's one interval (90s).
    assert set_canary.endswith("; Max-Age=21600; Path=/; Secure")
    assert set_primary.endswith("; Max-Age=90; Path=/; Secure")
    canary_cookie, primary_cookie = cookie_of(set_canary), cookie_of(set_primary)
    assert (canary_cookie[0], primary_cookie[0]) == ("flagger-cookie", "primary-flagger-cookie")
    # A browser sends the cookie back among others: the sticky rule matches it (RE2 here is
    # Python's re with the same syntax), and no other value.
    header = f"session=abc; {canary_cookie[0]}={canary_cookie[1]}; theme=dark"
    assert re.fullmatch(patterns[0], header)
    assert not re.fullmatch(patterns[0], f"{canary_cookie[0]}=other")
    assert re.fullmatch(patterns[1], f"{primary_cookie[0]}={primary_cookie[1]}")
    # The canary's cookie is the release's: the same at the next step; the primary's is the step's.
    later, _ = build(text, weight=40)
    assert json.dumps(later).count(canary_cookie[1]) == json.dumps(route).count(canary_cookie[1])
    assert primary_cookie[1] not in json.dumps(later)
    other_release, _ = build(text, weight=30, revision="v1-0000000000000000")
    assert canary_cookie[1] not in json.dumps(other_release)
    # Outside the analysis the cookies stop mattering: no rule reads them, no response sets them.
    idle, _ = build(text, weight=0, revision="")
    assert "cookie" not in json.dumps(idle).lower()
    assert not router.analysing(idle, TARGET, spec)


def test_session_affinity_without_a_primary_cookie_only_sticks_to_the_canary() -> None:
    text = AFFINITY.replace("    primaryCookieName: primary-flagger-cookie\n", "")
    vs, _ = build(text, weight=10)
    sticky, weighted = vs["spec"]["http"]
    assert sticky["name"] == "sticky-canary"
    assert "headers" not in weighted["route"][0]
    assert "Set-Cookie" in weighted["route"][1]["headers"]["response"]["add"]


def test_analysing_of_a_foreign_route_is_false() -> None:
    spec = parse_spec("service: {port: 9898}")
    foreign = {"kind": "HTTPRoute", "spec": {"rules": [{"backendRefs": [{"name": "other"}]}]}}
    assert not router_for("istio").analysing(foreign, TARGET, spec)
    assert not router_for("gatewayapi").analysing({"kind": "VirtualService"}, TARGET, spec)
