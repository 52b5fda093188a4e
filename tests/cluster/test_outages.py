"""What users' releases go through when what Perch depends on fails, on a real control plane.

- Prometheus dies for several intervals mid-analysis: every tick halts ("Prometheus query
  failed"), nothing is promoted, and when it is back the release resumes and completes.
- The analyzer is SIGKILLed a hundred times at random moments over two long releases (one healthy,
  one failing): each ends as its metrics say, Succeeded or Failed, and the route took each weight
  once, in order. The counts are printed (``kills: …``).
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client

from tests.seed import IMAGE_NEW
from tests.support import figures
from tests.support.prometheus import PrometheusServer
from tests.support.release import Perch, Release

SPEC = """\
service:
  port: 9898
analysis:
  interval: 1s
  threshold: {threshold}
  maxWeight: 50
  stepWeight: {step}
  metrics:
  - name: request-success-rate
    thresholdRange:
      min: 99
    interval: 5s
"""


@pytest.fixture
def own_prometheus(perch: Perch, tmp_path: Path) -> Iterator[PrometheusServer]:
    server = PrometheusServer(tmp_path / "prometheus", scrape_interval="1s")
    server.scrape(f"127.0.0.1:{perch.exporter.port}").start()
    yield server
    server.stop()


def test_prometheus_down_for_several_intervals_halts_never_promotes_then_resumes(
    release: Release, own_prometheus: PrometheusServer
) -> None:
    app = release
    app.flow("podinfo-canary")
    app.create(SPEC.format(threshold=30, step=10))
    app.watch_weights()
    app.release(IMAGE_NEW)
    app.start_analyzer(prometheus=own_prometheus.url)
    app.wait_for(lambda: app.status().get("canaryWeight", 0) >= 20, "weight 20")
    own_prometheus.kill()
    held = app.status()["canaryWeight"]
    target = f"podinfo.{app.namespace}"
    halted = f"Halt {target} advancement Prometheus query failed"
    app.wait_for(
        lambda: sum(e.startswith(halted) for e in app.events()) >= 4, "four halts on Prometheus"
    )
    # Down: no weight given, nothing promoted, not rolled back either (threshold 30).
    status = app.status()
    assert (status["phase"], status["canaryWeight"]) == ("Progressing", held)
    assert status["failedChecks"] >= 4
    own_prometheus.start()
    app.wait_phase("Succeeded", "Failed")
    assert app.phase() == "Succeeded", app.events()
    steps = [(100 - w, w) for w in range(10, 60, 10)]
    assert app.weights_seen == [(100, 0), *steps, (100, 0)]


KILLS = 100


def test_a_hundred_kills_over_two_long_releases(perch: Perch, tmp_path: Path) -> None:
    """Two releases (one healthy, one failing) under one analyzer killed 100 times."""
    core = client.CoreV1Api(perch.api)
    apps: list[Release] = []
    for tag in ("healthy", "failing"):
        ns = f"kill-{tag}-{uuid.uuid4().hex[:4]}"
        core.create_namespace({"metadata": {"name": ns}})
        (tmp_path / tag).mkdir()
        apps.append(Release(perch=perch, namespace=ns, tmp=tmp_path / tag))
    healthy, failing = apps
    try:
        healthy.flow("podinfo-canary")
        failing.flow("podinfo-canary", error_ratio=0.4)
        healthy.create(SPEC.format(threshold=5, step=2))
        failing.create(SPEC.format(threshold=12, step=2))
        for app in apps:
            app.watch_weights()
            app.watch_primary()
            app.release(IMAGE_NEW)
        rng = random.Random()
        lives: list[float] = []
        analyzer = healthy.start_analyzer(namespaces=(failing.namespace,))
        for _ in range(KILLS):
            # Somewhere in a life: before its first tick, inside one, between two.
            life = rng.uniform(0.2, 1.6)
            time.sleep(life)
            lives.append(life)
            analyzer.kill()
            analyzer = healthy.start_analyzer(namespaces=(failing.namespace,))
        for app in apps:
            app.wait_phase("Succeeded", "Failed", deadline=240)
        report = {
            "kills": KILLS,
            "mean_life_s": round(sum(lives) / len(lives), 2),
            **{
                app.namespace.split("-")[1]: {
                    "phase": app.phase(),
                    "weights": len(app.weights_seen),
                    "failedChecks": app.status().get("failedChecks"),
                }
                for app in apps
            },
        }
        figures.report("analyzer SIGKILLs over two releases", json.dumps(report))
        assert healthy.phase() == "Succeeded", healthy.events()
        assert failing.phase() == "Failed", failing.events()
        steps = [(100 - w, w) for w in range(2, 52, 2)]
        assert healthy.weights_seen == [(100, 0), *steps, (100, 0)]
        assert failing.weights_seen == [(100, 0), (98, 2), (100, 0)]
        assert len(healthy.primary_revisions_seen) == 2
        assert len(failing.primary_revisions_seen) == 1  # the failing one never reached it
        # Events are at most once (a kill between a status write and its events loses them):
        # the status is the record.
        assert failing.status()["failedChecks"] >= 12
        assert failing.status()["failedRevision"] == failing.status()["canaryRevision"]
    finally:
        for app in apps:
            app.close()
            core.delete_namespace(app.namespace)
