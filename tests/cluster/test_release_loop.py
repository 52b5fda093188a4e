"""The whole release loop on a real control plane, as users release: each way a tool sends a new
version becomes a canary at admission, advances 5 % → 50 % on live metrics from a real Prometheus,
and is promoted; a failing one rolls back and the primary never changes.

The webhook and the analyzer are real processes with the chart's ServiceAccounts; the API server
calls the webhook for every write, the analyzer's promotion included.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from kubernetes import client

from perch.revision import template_revision
from tests.seed import IMAGE_NEW, IMAGE_STABLE
from tests.support.mesh import Recorder
from tests.support.release import Method, Release, seed_spec

SEED_WEIGHTS = [5, 10, 15, 20, 25, 30, 35, 40, 45, 50]


def advanced(events: list[str], target: str) -> list[int]:
    return [
        int(m.group(1))
        for e in events
        if (m := re.fullmatch(rf"Advance {re.escape(target)} canary weight (\d+)", e))
    ]


def assert_promoted(app: Release) -> None:
    """What a user sees after a promotion: the new version is the primary, nothing else serves."""
    target, canary = f"podinfo.{app.namespace}", f"podinfo-canary.{app.namespace}"
    status = app.status()
    assert status["phase"] == "Succeeded", status
    events = app.wait_events(f"Promotion completed! Scaling down {canary}")
    assert advanced(events, target) == SEED_WEIGHTS, events
    assert f"Copying {canary} template spec to {target}" in events
    assert f"Promotion completed! Scaling down {canary}" in events
    assert app.image() == IMAGE_NEW
    primary = app.primary()
    revision = template_revision(primary["spec"]["template"])
    assert status["lastAppliedRevision"] == revision == status["canaryRevision"]
    annotations = primary["metadata"]["annotations"]
    assert annotations["perch.dev/revision"] == revision
    assert "perch.dev/canary-revision" not in annotations
    app.wait_for(lambda: app.deployment("podinfo-canary")["spec"]["replicas"] == 0, "scale to 0")
    assert app.weights() == (100, 0)
    # Every weight the route ever had, in order: each step once, none skipped.
    assert app.weights_seen == [(100, 0)] + [(100 - w, w) for w in SEED_WEIGHTS] + [(100, 0)]


@pytest.mark.parametrize(
    ("create", "method"),
    [
        ("apply", "set-image"),  # strategic-merge PATCH
        ("apply", "replace"),  # PUT
        ("apply", "apply"),  # three-way merge PATCH (kubectl apply, helm 3 upgrade)
        ("server-side", "server-side"),  # server-side apply, own field manager (Helm 4, Argo, Flux)
    ],
)
def test_a_release_is_promoted_however_it_is_sent(
    release: Release, create: Method, method: Method
) -> None:
    app = release
    app.flow("podinfo-canary")
    app.create(seed_spec(loadtester=app.loadtester.url), method=create)
    assert app.phase() == "Initialized"
    app.watch_weights()
    printed = app.release(IMAGE_NEW, method=method)
    del printed
    assert app.phase() == "Progressing"
    assert app.image() == IMAGE_STABLE
    assert app.image("podinfo-canary") == IMAGE_NEW
    app.start_analyzer()
    app.wait_phase("Succeeded", "Failed")
    assert_promoted(app)


SHORT_ANALYSIS = """\
  interval: 1s
  threshold: 2
  maxWeight: 50
  stepWeight: 25
"""


def test_a_gateway_api_release_is_promoted_and_a_deleted_route_comes_back(
    release: Release,
) -> None:
    app = release
    spec = "provider: gatewayapi\nservice:\n  port: 9898\nanalysis:\n" + SHORT_ANALYSIS
    app.create(spec)
    app.watch_weights()
    app.release(IMAGE_NEW)
    app.start_analyzer()
    app.wait_for(lambda: app.status().get("canaryWeight") == 25, "weight 25")
    # Someone deletes the HTTPRoute mid-analysis: the analyzer makes it again at the recorded
    # weight before it goes on (it never restarts from 0 nor skips a step).
    group, version, plural = app.route_resource()
    client.CustomObjectsApi(app.api).delete_namespaced_custom_object(
        group, version, app.namespace, plural, "podinfo"
    )
    app.wait_phase("Succeeded", "Failed")
    assert app.phase() == "Succeeded", app.events()
    assert app.image() == IMAGE_NEW
    target = f"podinfo.{app.namespace}"
    assert any(e.startswith(f"Route of {target} not found; re-creating it") for e in app.events())
    assert app.weights() == (100, 0)
    seen = list(app.weights_seen)
    assert seen[0] == (100, 0) and seen[-1] == (100, 0)
    assert [w for w in seen if w[1]] in ([(75, 25), (50, 50)], [(75, 25), (75, 25), (50, 50)])


def test_destination_rules_are_kept_as_the_spec_says(release: Release) -> None:
    app = release
    spec = (
        "service:\n  port: 9898\n  trafficPolicy:\n    tls:\n      mode: ISTIO_MUTUAL\n"
        "analysis:\n" + SHORT_ANALYSIS
    )
    app.create(spec)
    custom = client.CustomObjectsApi(app.api)
    rules = ("podinfo-primary", "podinfo-canary")

    def rule(name: str) -> dict[str, Any]:
        return custom.get_namespaced_custom_object(  # type: ignore[no-any-return]
            "networking.istio.io", "v1", app.namespace, "destinationrules", name
        )

    for name in rules:
        assert rule(name)["spec"]["trafficPolicy"] == {"tls": {"mode": "ISTIO_MUTUAL"}}
        # Adopted once the Deployment exists (it has no uid while its CREATE is admitted).
        app.wait_for(
            lambda name=name: rule(name)["metadata"].get("ownerReferences"), f"{name}'s owner"
        )
    app.release(IMAGE_NEW)
    app.start_analyzer()
    app.wait_for(lambda: app.status().get("canaryWeight") == 25, "weight 25")
    # One rule deleted, the other edited by hand: the analyzer's next step puts both back.
    custom.delete_namespaced_custom_object(
        "networking.istio.io", "v1", app.namespace, "destinationrules", rules[0]
    )
    edited = rule(rules[1])
    edited["spec"]["trafficPolicy"] = {"tls": {"mode": "DISABLE"}}
    custom.replace_namespaced_custom_object(
        "networking.istio.io", "v1", app.namespace, "destinationrules", rules[1], edited
    )
    app.wait_phase("Succeeded", "Failed")
    assert app.phase() == "Succeeded"
    for name in rules:
        assert rule(name)["spec"]["trafficPolicy"] == {"tls": {"mode": "ISTIO_MUTUAL"}}


def test_the_next_release_carries_the_spec_and_autoscaler_changes_along(release: Release) -> None:
    """Between releases the user changes the trafficPolicy and the HPA: the next release's
    canary objects follow (DestinationRules rewritten, the canary's HPA copied again)."""
    app = release
    spec = (
        "autoscalerRef:\n  apiVersion: autoscaling/v2\n  kind: HorizontalPodAutoscaler\n"
        "  name: podinfo\nservice:\n  port: 9898\n  trafficPolicy:\n    tls:\n"
        "      mode: ISTIO_MUTUAL\nanalysis:\n" + SHORT_ANALYSIS
    )
    app.create(spec)
    app.release(IMAGE_NEW)
    autoscaling = client.AutoscalingV2Api(app.api)
    assert (
        autoscaling.read_namespaced_horizontal_pod_autoscaler(
            "podinfo-canary", app.namespace
        ).spec.max_replicas
        == 4
    )
    newer = "ghcr.io/stefanprodan/podinfo:6.7.2"
    changed = spec.replace("ISTIO_MUTUAL", "SIMPLE")
    git = app.manifest(image=newer, spec=changed).replace("maxReplicas: 4", "maxReplicas: 6")
    app.kubectl("apply", "-f", "-", input=git)
    assert app.image("podinfo-canary") == newer
    assert (
        autoscaling.read_namespaced_horizontal_pod_autoscaler(
            "podinfo-canary", app.namespace
        ).spec.max_replicas
        == 6
    )
    for name in ("podinfo-primary", "podinfo-canary"):
        rule = client.CustomObjectsApi(app.api).get_namespaced_custom_object(
            "networking.istio.io", "v1", app.namespace, "destinationrules", name
        )
        assert rule["spec"]["trafficPolicy"] == {"tls": {"mode": "SIMPLE"}}


def test_server_side_apply_releases_one_after_another(release: Release) -> None:
    """Helm 4, Argo CD and Flux apply server-side with their own field manager, without forcing
    conflicts. After Perch promoted one release, the next apply must not conflict with the
    fields Perch wrote into the primary."""
    app = release
    spec = "service:\n  port: 9898\nanalysis:\n" + SHORT_ANALYSIS
    app.create(spec, method="server-side")
    app.start_analyzer()
    for image in (IMAGE_NEW, "ghcr.io/stefanprodan/podinfo:6.7.2"):
        app.release(image, method="server-side")
        app.wait_for(
            lambda image=image: app.phase() == "Succeeded" and app.image() == image,
            f"{image} promoted",
        )


def analyzer_calls(app: Release, since: int) -> list[str]:
    """'verb resource' of every request the analyzer made after `since` (audit_size()), watches
    aside (a watch is opened once and ends when the server closes it)."""
    username = app.perch.installed.analyzer.username
    calls = []
    for event in app.perch.plane.audit_events(since=since):
        ref = event.get("objectRef") or {}
        if (event.get("user") or {}).get("username") != username or event["verb"] == "watch":
            continue
        resource = ref.get("resource", "?") + (
            f"/{ref['subresource']}" if ref.get("subresource") else ""
        )
        calls.append(f"{event['verb']} {resource}")
    return calls


def test_a_waiting_canary_costs_no_api_call_and_a_repeated_halt_is_one_event(
    release: Release,
) -> None:
    """What a canary costs the API server while it waits, and while it steps: a halt repeated
    each interval is one Event whose count grows, as Kubernetes' own recorder does; a canary
    waiting for approval makes no call at all; a step writes the status, the route and an
    Event, and reads nothing (its reads come from watches)."""
    app = release
    if app.perch.kubelet is None or app.perch.plane.audit_log is None:
        pytest.skip("needs the kubelet stand-in (to hold pods back) and the audit log")
    gate = Recorder(status=403).start()
    spec = (
        "service:\n  port: 9898\nanalysis:\n  interval: 1s\n  threshold: 5\n  maxWeight: 50\n"
        "  stepWeight: 10\n  webhooks:\n  - name: more\n    type: confirm-traffic-increase\n"
        f"    url: {gate.url}\n"
    )
    canary, target = f"podinfo-canary.{app.namespace}", f"podinfo.{app.namespace}"
    try:
        app.create(spec)
        app.perch.kubelet.withhold(app.namespace, "podinfo-canary-")
        app.release(IMAGE_NEW)
        app.start_analyzer()
        # "...: 0 of 2 updated replicas are available", the same words at every interval.
        held = re.compile(
            rf"Halt advancement {re.escape(canary)} waiting for rollout to finish: "
            r"0 of \d+ updated replicas are available"
        )

        def halts() -> list[dict[str, Any]]:
            return [e for e in app.event_objects() if held.fullmatch(e["message"])]

        app.wait_for(lambda: sum(int(e["count"]) for e in halts()) >= 3, "three halts")
        (event,) = halts()  # one Event, however often it happened
        assert int(event["count"]) >= 3
        assert event["lastTimestamp"] >= event["firstTimestamp"]
        assert app.events().count(event["message"]) == int(event["count"])

        # Ready: the first step asks the gate, which does not approve. Said once, then silence.
        app.perch.kubelet.release(app.namespace, "podinfo-canary-")
        waiting = f"Halt {target} advancement waiting for traffic increase approval more"
        app.wait_events(waiting)
        asked = len(gate.received)
        since = app.perch.plane.audit_size()
        app.wait_for(lambda: len(gate.received) >= asked + 4, "four more intervals of waiting")
        assert analyzer_calls(app, since) == []
        assert app.events().count(waiting) == 1
        assert app.status()["canaryWeight"] == 0

        # Approved: each step writes the status, the route and an Event, and GETs nothing.
        gate.status = 200
        app.wait_for(lambda: app.status().get("canaryWeight") == 10, "weight 10")
        since = app.perch.plane.audit_size()
        app.wait_for(lambda: app.status().get("canaryWeight") == 40, "weight 40")
        calls = analyzer_calls(app, since)
        assert not [c for c in calls if c.startswith("get ")], calls
        assert set(calls) <= {"patch canaries/status", "update virtualservices", "create events"}
    finally:
        gate.stop()
