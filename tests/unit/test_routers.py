"""Route objects for each provider: schema-valid, weighted as asked, read back the same."""

from __future__ import annotations

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
