"""The whole release loop on a real control plane, as users release: each way a tool sends a new
version becomes a canary at admission, advances 5 % → 50 % on live metrics from a real Prometheus,
and is promoted; a failing one rolls back and the primary never changes.

The webhook and the analyzer are real processes with the chart's ServiceAccounts; the API server
calls the webhook for every write, the analyzer's promotion included.
"""

from __future__ import annotations

import re

import pytest

from perch.revision import template_revision
from tests.seed import IMAGE_NEW, IMAGE_STABLE
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
    events = app.events()
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
