"""Releases that fail, and analyzers that die, on a real control plane.

A failing release rolls back and the primary never changes. An analyzer killed at a random moment,
or at each point between the writes of a promotion (``PERCH_CRASH_AFTER``, analyzer/faults.py),
is restarted and the release completes or restores: never stalls, never repeats or skips a step.
The route's weights and the primary's template revisions are recorded through watches, so every
value they ever had is seen.
"""

from __future__ import annotations

import random
import re
import time

import pytest
from kubernetes import client

from perch.revision import template_revision
from tests.seed import IMAGE_NEW
from tests.support.release import Release, seed_spec

QUICK_SPEC = """\
service:
  port: 9898
analysis:
  interval: 1s
  threshold: 2
  maxWeight: 50
  stepWeight: 25
  metrics:
  - name: request-success-rate
    thresholdRange:
      min: 99
    interval: 5s
"""


def advanced(events: list[str], target: str) -> list[int]:
    return [
        int(m.group(1))
        for e in events
        if (m := re.fullmatch(rf"Advance {re.escape(target)} canary weight (\d+)", e))
    ]


def start_release(app: Release, spec: str, **flow: float) -> str:
    """The stable version deployed, then a new image released; returns the stable revision."""
    app.flow("podinfo-canary", **flow)
    app.create(spec)
    stable = template_revision(app.primary()["spec"]["template"])
    app.watch_weights()
    app.watch_primary()
    app.release(IMAGE_NEW)
    return stable


def test_a_failing_release_rolls_back_and_the_primary_never_changes(release: Release) -> None:
    app = release
    stable = start_release(
        app, seed_spec(loadtester=app.loadtester.url, threshold=3), error_ratio=0.3861
    )
    app.start_analyzer()
    app.wait_phase("Failed", "Succeeded")
    target = f"podinfo.{app.namespace}"
    status = app.status()
    assert status["phase"] == "Failed", app.events()
    events = app.wait_events(f"Canary failed! Scaling down podinfo-canary.{app.namespace}")
    halts = [
        e
        for e in events
        if re.fullmatch(
            rf"Halt {re.escape(target)} advancement success rate "
            r"\d+\.\d\d% < 99%",
            e,
        )
    ]
    assert len(halts) == 3, events
    assert f"Rolling back {target} failed checks threshold reached 3" in events
    assert f"Canary failed! Scaling down podinfo-canary.{app.namespace}" in events
    # The primary kept the stable template the whole time; traffic went 5 % and came back.
    assert app.primary_revisions_seen == [stable]
    assert app.weights_seen == [(100, 0), (95, 5), (100, 0)]
    assert status["failedRevision"] == status["canaryRevision"]
    app.wait_for(lambda: app.deployment("podinfo-canary")["spec"]["replicas"] == 0, "scale to 0")


def test_an_analyzer_killed_at_random_moments_finishes_without_repeating_a_step(
    release: Release,
) -> None:
    app = release
    stable = start_release(app, seed_spec(loadtester=app.loadtester.url))
    rng = random.Random()
    kills = 0
    analyzer = app.start_analyzer()
    while app.phase() not in ("Succeeded", "Failed") and kills < 4:
        log = analyzer.log
        app.wait_for(lambda log=log: log.read_text().count("Advance ") >= 1, "a first step")
        # Somewhere inside a tick or between two: ticks are 1 s apart and take milliseconds, so
        # most kills land between ticks; the crash points of the next tests hit the rest.
        time.sleep(rng.uniform(0.2, 2.5))
        analyzer.kill()
        kills += 1
        analyzer = app.start_analyzer()
    app.wait_phase("Succeeded", "Failed")
    assert kills >= 2
    assert app.phase() == "Succeeded", app.events()
    target = f"podinfo.{app.namespace}"
    # The route took each weight once, in order: no step repeated, none skipped, none undone.
    weights = [5, 10, 15, 20, 25, 30, 35, 40, 45, 50]
    assert app.weights_seen == [(100, 0)] + [(100 - w, w) for w in weights] + [(100, 0)]
    # Events are at most once (a kill between the status write and the event loses it).
    steps = advanced(app.events(), target)
    assert steps == sorted(set(steps)) and set(steps) <= set(weights)
    new = app.status()["canaryRevision"]
    assert app.primary_revisions_seen == [stable, new]


PROMOTION_POINTS = [
    "SaveStableTemplate",  # the last good template saved, Promoting not committed
    "CommitStatus@Promoting",  # Promoting committed, the template not copied
    "PromoteTemplate",  # the template copied
    "CommitStatus@Finalising",  # Finalising committed, the route not changed
    "SetWeights@Finalising",  # the route back at 100 % primary
    "CommitStatus@Succeeded",  # Succeeded committed, the canary not scaled down
]


@pytest.mark.parametrize("point", PROMOTION_POINTS)
def test_a_promotion_interrupted_at_each_point_completes(release: Release, point: str) -> None:
    app = release
    stable = start_release(app, QUICK_SPEC)
    crashed = app.start_analyzer(env={"PERCH_CRASH_AFTER": point})
    app.wait_for(lambda: crashed.process.poll() is not None, f"the crash after {point}")
    assert crashed.process.returncode == 137, app.logs()[-3000:]
    app.start_analyzer()
    app.wait_phase("Succeeded", "Failed")
    assert app.phase() == "Succeeded", app.events()
    new = app.status()["canaryRevision"]
    assert app.primary_revisions_seen == [stable, new]
    assert app.weights_seen == [(100, 0), (75, 25), (50, 50), (100, 0)]
    app.wait_for(lambda: app.deployment("podinfo-canary")["spec"]["replicas"] == 0, "scale to 0")
    assert app.image() == IMAGE_NEW


RESTORE_POINTS = ["CommitStatus@Failed", "RestorePrimary"]
PRIMARY_PODS = r"podinfo-[a-z0-9]+-[a-z0-9]+$"


@pytest.mark.parametrize("point", [None, *RESTORE_POINTS])
def test_a_promotion_that_never_rolls_out_restores_the_last_good_template(
    release: Release, point: str | None
) -> None:
    app = release
    spec = QUICK_SPEC.replace("service:", "progressDeadlineSeconds: 4\nservice:")
    stable = start_release(app, spec)
    # The new version's pods never become ready in the primary (they do in the canary).
    assert app.perch.kubelet is not None, "needs the kubelet stand-in to withhold readiness"
    app.perch.kubelet.withhold(app.namespace, PRIMARY_PODS, image=IMAGE_NEW)
    if point is not None:
        crashed = app.start_analyzer(env={"PERCH_CRASH_AFTER": point})
        app.wait_for(lambda: crashed.process.poll() is not None, f"the crash after {point}")
    app.start_analyzer()
    app.wait_for(
        lambda: app.phase() == "Failed" and app.primary_revisions_seen[-1] == stable,
        "the last good template to be restored",
    )
    target = f"podinfo.{app.namespace}"
    rolled_back = f"Rolling back {target} promotion failed: {target} not rolled out after 4s"
    if point is None:
        app.wait_for(
            lambda: any(e.startswith(rolled_back) for e in app.events()), "the rollback's event"
        )
    else:
        # The crash came after the status write and before the events (which are at most once):
        # the Canary's condition says what happened, and the restart says it finished the restore.
        condition = app.status()["conditions"][0]
        assert (condition["reason"], condition["status"]) == ("Failed", "False")
        assert condition["message"].startswith("Promotion failed"), condition
    if point == "CommitStatus@Failed":
        again = f"Restoring {target} to revision {stable} again"
        app.wait_for(lambda: any(e.startswith(again) for e in app.events()), "the restore's event")
    new = app.status()["canaryRevision"]
    assert app.primary_revisions_seen == [stable, new, stable]
    # Traffic was never all sent to the broken primary: the canary kept its 50 % until the
    # primary was ready on the last good template again, then traffic went back.
    app.wait_for(lambda: app.weights() == (100, 0), "traffic back on the restored primary")
    assert app.weights_seen == [(100, 0), (75, 25), (50, 50), (100, 0)]
    assert app.status()["failedRevision"] == new


def test_the_canary_and_its_route_deleted_mid_analysis_come_back(release: Release) -> None:
    """Someone deletes the canary Deployment and the VirtualService while the analysis runs: the
    analyzer makes them again from the Canary object (the template) and the status (the weight),
    and the release goes on from where it was."""
    app = release
    start_release(app, QUICK_SPEC)
    app.start_analyzer()
    app.wait_for(lambda: app.status().get("canaryWeight") == 25, "weight 25")
    apps, custom = client.AppsV1Api(app.api), client.CustomObjectsApi(app.api)
    apps.delete_namespaced_deployment("podinfo-canary", app.namespace)
    custom.delete_namespaced_custom_object(
        "networking.istio.io", "v1", app.namespace, "virtualservices", "podinfo"
    )
    app.wait_phase("Succeeded", "Failed")
    assert app.phase() == "Succeeded", app.events()
    assert app.image() == IMAGE_NEW
    target = f"podinfo.{app.namespace}"
    assert any(e.startswith(f"Route of {target} not found; re-creating it") for e in app.events())
    assert "recreated missing canary Deployment" in app.logs()
    # Never back to an earlier weight, never a step skipped.
    assert [w for w in app.weights_seen if w != (100, 0)] in (
        [(75, 25), (50, 50)],
        [(75, 25), (75, 25), (50, 50)],
    )
