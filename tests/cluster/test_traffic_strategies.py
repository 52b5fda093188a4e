"""A/B testing, blue/green with mirroring and session affinity on a real control plane.

For Istio and the Gateway API: the analyzer writes the route each strategy calls for while the
canary is analysed (the A/B match rule, the mirror, the sticky-session rules and cookies) and the
plain split before and after it, and the real API server, with the CRDs' schemas and CEL rules,
accepts every one of them. The route's history comes from a watch, so every version it had is
seen, however short-lived.

Metrics: the metrics source is Istio-shaped (istio_* series only), so the Gateway API releases are
judged by a custom query on istio_requests_total.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from kubernetes import client

from perch.routers import RouteTarget, router_for
from perch.spec import parse_spec
from tests.seed import IMAGE_NEW, IMAGE_STABLE
from tests.support.release import Perch, Release

Provider = str
PROVIDERS = ["istio", "gatewayapi"]

ANALYSIS = """\
  interval: 1s
  threshold: 2
"""
METRICS = {
    "istio": """\
  metrics:
  - name: request-success-rate
    thresholdRange: {min: 99}
    interval: 5s
""",
    "gatewayapi": """\
  metrics:
  - name: canary-success-rate
    thresholdRange: {min: 99}
    interval: 5s
    query: >-
      100 * sum(rate(istio_requests_total{destination_workload_namespace="{{ namespace }}",
      destination_workload="{{ target }}", response_code!~"5.."}[{{ interval }}]))
      / sum(rate(istio_requests_total{destination_workload_namespace="{{ namespace }}",
      destination_workload="{{ target }}"}[{{ interval }}]))
""",
}
MATCH = """\
  match:
  - headers:
      x-canary: {exact: insider}
  - headers:
      cookie: {regex: "^(.*?;)?(canary=always)(;.*)?$"}
"""


def spec_for(provider: Provider, analysis: str) -> str:
    return (
        f"provider: {provider}\nservice:\n  port: 9898\nanalysis:\n"
        + ANALYSIS
        + analysis
        + METRICS[provider]
    )


def released(app: Release, spec: str) -> None:
    """The app deployed with `spec`, a new version released, and the analyzer started."""
    app.flow("podinfo-canary")
    app.create(spec)
    assert app.phase() == "Initialized"
    app.watch_weights()
    app.release(IMAGE_NEW)
    app.start_analyzer()


def rules(route: dict[str, Any]) -> list[dict[str, Any]]:
    """The route's http routes (Istio) or rules (Gateway API)."""
    spec = route.get("spec") or {}
    return list(spec.get("http") or spec.get("rules") or [])


def named(route: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((r for r in rules(route) if r.get("name") == name), None)


def plain_split(app: Release, route: dict[str, Any] | None) -> bool:
    """The route is the weighted split alone at 100/0: nothing reads a match or a cookie, and
    nothing is mirrored."""
    assert route is not None
    text = json.dumps(route["spec"]).lower()
    return (
        len(rules(route)) == 1
        and app.weights(route) == (100, 0)
        and "mirror" not in text
        and "cookie" not in text
    )


def assert_promoted(app: Release) -> None:
    assert app.phase() == "Succeeded", app.events()
    assert app.image() == IMAGE_NEW
    app.wait_for(lambda: app.deployment("podinfo-canary")["spec"]["replicas"] == 0, "scale to 0")
    app.wait_for(lambda: plain_split(app, app.route()), "the plain split")


@pytest.mark.parametrize("provider", PROVIDERS)
def test_ab_testing_routes_the_match_to_the_canary_and_promotes_without_moving_weights(
    release: Release, provider: Provider
) -> None:
    app = release
    released(app, spec_for(provider, "  iterations: 3\n" + MATCH))
    app.wait_phase("Succeeded", "Failed")
    assert_promoted(app)
    target, canary = f"podinfo.{app.namespace}", f"podinfo-canary.{app.namespace}"
    events = app.wait_events(f"Promotion completed! Scaling down {canary}")
    assert f"Routing requests of {target} that match analysis.match to {canary}" in events
    assert f"Advance {target} canary iteration 3/3" in events
    # The weights never moved: the match did the routing.
    assert app.weights_seen == [(100, 0)]
    with_match = [r for r in app.routes_seen if named(r, "ab-testing")]
    assert with_match, app.routes_seen
    ab = named(with_match[0], "ab-testing")
    assert ab is not None
    if provider == "istio":
        assert [d["destination"]["host"] for d in ab["route"]] == ["podinfo-canary"]
        assert ab["match"] == [
            {"headers": {"x-canary": {"exact": "insider"}}},
            {"headers": {"cookie": {"regex": "^(.*?;)?(canary=always)(;.*)?$"}}},
        ]
        assert rules(with_match[0])[0] is ab  # Istio takes the first route that matches
    else:
        assert [b["name"] for b in ab["backendRefs"]] == ["podinfo-canary"]
        headers = [m["headers"][0] for m in ab["matches"]]
        assert headers == [
            {"name": "x-canary", "type": "Exact", "value": "insider"},
            {
                "name": "cookie",
                "type": "RegularExpression",
                "value": "^(.*?;)?(canary=always)(;.*)?$",
            },
        ]
    # Before the analysis and after the promotion: the plain split.
    assert plain_split(app, app.routes_seen[0])
    assert plain_split(app, app.routes_seen[-1])


@pytest.mark.parametrize("provider", PROVIDERS)
def test_blue_green_mirrors_during_the_iterations_then_switches_at_promotion(
    release: Release, provider: Provider
) -> None:
    app = release
    released(app, spec_for(provider, "  iterations: 3\n  mirror: true\n  mirrorWeight: 50\n"))
    app.wait_phase("Succeeded", "Failed")
    assert_promoted(app)
    target, canary = f"podinfo.{app.namespace}", f"podinfo-canary.{app.namespace}"
    events = app.wait_events(f"Promotion completed! Scaling down {canary}")
    assert f"Mirroring 50% of the requests of {target} to {canary}" in events
    assert f"Routing all traffic to canary {canary}" in events
    # Flagger's switch: all the traffic to the canary, then back to the promoted primary.
    assert app.weights_seen == [(100, 0), (0, 100), (100, 0)]

    def mirror_of(route: dict[str, Any]) -> Any:
        (rule,) = rules(route)
        if provider == "istio":
            return rule.get("mirror"), rule.get("mirrorPercentage")
        mirrors = [f["requestMirror"] for f in rule.get("filters") or () if "requestMirror" in f]
        return [(m["backendRef"]["name"], m.get("percent")) for m in mirrors]

    expected = (
        ({"host": "podinfo-canary", "port": {"number": 9898}}, {"value": 50})
        if provider == "istio"
        else [("podinfo-canary", 50)]
    )
    history = [(app.weights(r), mirror_of(r)) for r in app.routes_seen]
    nothing = (None, None) if provider == "istio" else []
    # Plain before, mirrored at 100/0 during the iterations, not mirrored once switched.
    assert history[0] == ((100, 0), nothing)
    assert ((100, 0), expected) in history
    switched = history.index(((0, 100), nothing))
    assert history.index(((100, 0), expected)) < switched
    assert all(h[1] == nothing for h in history[switched:])


def sticky_rules(route: dict[str, Any]) -> list[str]:
    return [str(r["name"]) for r in rules(route) if str(r.get("name", "")).startswith("sticky")]


def set_cookies(route: dict[str, Any]) -> list[str]:
    """name=value of the Set-Cookie headers the weighted split adds, primary's first."""
    weighted = rules(route)[-1]
    found = []
    for dest in weighted.get("route") or ():  # Istio
        found.append(dest.get("headers", {}).get("response", {}).get("add", {}).get("Set-Cookie"))
    for ref in weighted.get("backendRefs") or ():  # Gateway API
        for f in ref.get("filters") or ():
            found += [h["value"] for h in f["responseHeaderModifier"]["add"]]
    return [str(cookie).split(";")[0] for cookie in found if cookie]


AFFINITY = """\
  stepWeight: 20
  maxWeight: 40
  sessionAffinity:
    cookieName: canary-cookie
    primaryCookieName: primary-cookie
    maxAge: 600
"""


def test_session_affinity_routes_last_the_analysis_and_go_with_the_promotion(
    release: Release,
) -> None:
    app = release
    released(app, spec_for("istio", AFFINITY))
    app.wait_phase("Succeeded", "Failed")
    assert_promoted(app)
    assert app.weights_seen == [(100, 0), (80, 20), (60, 40), (100, 0)]
    sticky = [r for r in app.routes_seen if sticky_rules(r)]
    # One version per step, each with both sticky routes first and both cookies set.
    assert [app.weights(r) for r in sticky] == [(80, 20), (60, 40)]
    for route in sticky:
        assert sticky_rules(route) == ["sticky-canary", "sticky-primary"]
        assert rules(route)[0]["match"][0]["headers"]["cookie"]["regex"].startswith("^")
    (first_primary, first_canary), (second_primary, second_canary) = (
        set_cookies(r) for r in sticky
    )
    # The canary's cookie holds for the whole analysis; the primary's is new at each step.
    assert first_canary == second_canary and first_canary.startswith("canary-cookie=")
    assert first_primary != second_primary and first_primary.startswith("primary-cookie=")
    assert plain_split(app, app.routes_seen[-1])


def test_session_affinity_routes_go_with_a_rollback(release: Release) -> None:
    app = release
    released(app, spec_for("gatewayapi", AFFINITY.replace("maxWeight: 40", "maxWeight: 100")))
    app.wait_for(lambda: any(sticky_rules(r) for r in app.routes_seen), "the sticky rules")
    app.kubectl("annotate", "deployment", "podinfo", "perch.dev/action=abort")
    app.wait_phase("Failed")
    target = f"podinfo.{app.namespace}"
    app.wait_events(f"Rolling back {target} manual abort")
    assert app.image() == IMAGE_STABLE
    app.wait_for(lambda: plain_split(app, app.route()), "the plain split")
    sticky = next(r for r in app.routes_seen if sticky_rules(r))
    assert sticky_rules(sticky) == ["sticky-canary", "sticky-primary"]
    cookies = [cookie.split("=")[0] for cookie in set_cookies(sticky)]
    assert cookies == ["primary-cookie", "canary-cookie"]
    # The rollback took the rules and the cookies away with the canary's weight.
    assert plain_split(app, app.routes_seen[-1])


SHAPES = {
    "istio": [
        spec_for(
            "istio", "  iterations: 3\n" + MATCH + "  - sourceLabels: {app: tester}\n"
        ).replace("port: 9898\n", "port: 9898\n  timeout: 15s\n  match: [{uri: {prefix: /api}}]\n"),
        spec_for("istio", "  iterations: 3\n  mirror: true\n  mirrorWeight: 25\n"),
        spec_for("istio", "  iterations: 3\n  mirror: true\n"),
        spec_for(
            "istio",
            AFFINITY.replace("maxAge: 600", "maxAge: 600\n    sameSite: Lax\n    secure: true"),
        ),
    ],
    "gatewayapi": [
        spec_for(
            "gatewayapi",
            "  iterations: 3\n"
            + MATCH
            + "  - uri: {prefix: /beta}\n    method: {exact: GET}\n"
            + "    queryParams: {preview: {exact: 'on'}}\n",
        ).replace(
            "port: 9898\n",
            "port: 9898\n  timeout: 15s\n  headers: {request: {set: {x-via: perch}}}\n",
        ),
        spec_for("gatewayapi", "  iterations: 3\n  mirror: true\n  mirrorWeight: 25\n"),
        spec_for("gatewayapi", "  iterations: 3\n  mirror: true\n"),
        spec_for("gatewayapi", AFFINITY),
    ],
}


@pytest.mark.parametrize("provider", PROVIDERS)
def test_the_api_server_accepts_every_route_shape(
    perch: Perch, namespace: str, provider: Provider
) -> None:
    """Each shape at each weight of its analysis, and outside it, created for real: the API
    server checks the CRD's schema and its CEL rules (which the unit tests' jsonschema cannot)."""
    custom = client.CustomObjectsApi(perch.api)
    target = RouteTarget(name="podinfo", namespace=namespace)
    router = router_for(provider)
    created = 0
    for text in SHAPES[provider]:
        spec = parse_spec(text)
        for weight in (0, 20, 100):
            for revision in ("", "v1-0123456789abcdef"):
                for obj in router.build(target, spec, canary_weight=weight, revision=revision):
                    group, version = obj["apiVersion"].split("/")
                    plural = obj["kind"].lower() + "s"
                    obj["metadata"]["name"] = f"shape-{created}"
                    stored = custom.create_namespaced_custom_object(
                        group, version, namespace, plural, obj
                    )
                    created += 1
                    # Nothing Perch wrote was pruned as unknown (the API server drops those).
                    assert router.weights(stored, target, spec) == (100 - weight, weight)
                    assert router.analysing(stored, target, spec) == router.analysing(
                        obj, target, spec
                    )
                    assert len(rules(stored)) == len(rules(obj))
    assert created == len(SHAPES[provider]) * 6
