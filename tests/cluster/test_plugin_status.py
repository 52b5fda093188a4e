"""`kubectl perch status NAME` and `validate` on a real control plane, run as kubectl runs a plugin.

The release at a glance is rendered from real Canary objects in every phase (their status written
through the status subresource as the analyzer writes it, so the API server's schema keeps or
prunes each field as it would); `status -w` follows a real release to Succeeded and a failing one
to Failed, with the exit codes a script waits on; and `validate`'s verdict on a manifest is the one
the webhook gives when it is applied.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from perch.status import (
    PHASES,
    CanaryStatus,
    LastCheck,
    Phase,
    analysis_started,
    entered,
    initialized,
)
from tests.seed import IMAGE_NEW, SEED_SPEC_CURRENT, podinfo
from tests.support.release import Release, seed_spec

STABLE = "v1-3f9c2a0e11d4b7c8"
REV = "v1-1c0f3e8a9b7d2e44"
# The bound of one `status -w` run: a seed release with 1 s steps takes well under a minute.
FOLLOW_DEADLINE = 180.0


def plugin_command(app: Release, *args: str) -> tuple[list[str], dict[str, str]]:
    """`kubectl perch ARGS` through kubectl's plugin lookup, with the admin kubeconfig."""
    plane = app.perch.plane
    assert plane.kubectl_path is not None
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "KUBECONFIG": str(plane.kubeconfig),
    }
    env.pop("NO_COLOR", None)
    return [plane.kubectl_path, "perch", *args], env


def kubectl_perch(
    app: Release, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    command, env = plugin_command(app, *args)
    return subprocess.run(
        command, env=env, input=stdin, capture_output=True, text=True, timeout=60, check=False
    )


def write_status(app: Release, status: CanaryStatus) -> None:
    """As the analyzer writes it: a merge patch of the whole status on the subresource."""
    app.kubectl(
        "patch",
        "canary",
        app.name,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": status.to_wire()}),
    )


def fields_of(text: str) -> dict[str, str]:
    found = {}
    for line in text.splitlines():
        label, sep, value = line.partition(":")
        if sep and not line.startswith(" ") and value.strip():
            found[label] = " ".join(value.split())
    return found


def rows_under(text: str, label: str) -> list[str]:
    lines = text.splitlines()
    start = lines.index(f"{label}:") + 1
    rows = []
    for line in lines[start:]:
        if not line.startswith("  "):
            break
        rows.append(" ".join(line.split()))
    return rows


def in_phase(phase: Phase, now: datetime, **fields: object) -> CanaryStatus:
    base = analysis_started(initialized(revision=STABLE, at=now), revision=REV, at=now)
    return entered(replace(base, analysed_revision=REV, **fields), phase, at=now)


# What each phase's status holds, as the analyzer (or the webhook) leaves it.
CHECKS = (
    LastCheck("request-success-rate", "pass", value=99.87, min=99, message="success rate 99.87%"),
    LastCheck("request-duration", "fail", value=612.5, max=500, message="request duration"),
    LastCheck("load-test", "pass", kind="gate"),
)
PHASE_FIELDS: dict[str, dict[str, object]] = {
    "Initializing": {},
    "Waiting": {},
    "Progressing": {"canary_weight": 15, "failed_checks": 1, "last_checks": CHECKS},
    "WaitingPromotion": {"canary_weight": 50, "last_checks": CHECKS},
    "Promoting": {"canary_weight": 50, "handoff_revision": REV},
    "Finalising": {"canary_weight": 0},
    "Succeeded": {"last_applied_revision": REV, "last_checks": CHECKS[:1]},
    "Failed": {"failed_revision": REV, "failed_checks": 10, "last_checks": CHECKS},
    "Terminated": {},
}


def test_status_renders_a_real_canary_in_every_phase(release: Release) -> None:
    app = release
    app.create(SEED_SPEC_CURRENT)
    # As the webhook made it for the opted-in Deployment: no release yet.
    initial = kubectl_perch(app, "status", "podinfo", "-n", app.namespace)
    assert initial.returncode == 0, initial.stderr
    shown = fields_of(initial.stdout)
    assert shown["Phase"].startswith("Initialized for ")
    assert shown["Steps"] == "5 10 ... 50"
    assert "\x1b[" not in initial.stdout  # a pipe is not a terminal: no colour

    for phase in PHASES:
        if phase == "Initialized":
            continue
        now = datetime.now(UTC) - timedelta(seconds=75)
        write_status(app, in_phase(phase, now, **PHASE_FIELDS[phase]))
        done = kubectl_perch(app, "status", "podinfo", "-n", app.namespace)
        assert done.returncode == 0, done.stderr
        text = done.stdout
        shown = fields_of(text)
        assert re.fullmatch(rf"{phase} for 1m[1-3]\ds", shown["Phase"]), text
        assert shown["Namespace"] == app.namespace
        primary = REV if phase == "Succeeded" else STABLE
        assert shown["Primary"] == f"{primary} (last good)"
        if phase == "Progressing":
            assert shown["Canary"] == REV
            assert shown["Steps"] == "5 10 [15] 20 ... 50"
            assert shown["Failed checks"] == "1/10"
            # lastChecks went through the API server's schema and came back.
            assert rows_under(text, "Metrics") == [
                "request-success-rate 99.87% >= 99% pass",
                "request-duration 612.5ms <= 500ms fail",
            ]
            assert rows_under(text, "Gates") == ["rollout load-test each step; last: pass"]
        if phase == "WaitingPromotion":
            assert shown["Steps"] == "5 10 ... 45 [50]"
        if phase == "Succeeded":
            assert shown["Canary"] == f"{REV} (promoted)"
            assert shown["Traffic"] == "canary 0%, primary 100%"
        if phase == "Failed":
            assert shown["Canary"] == f"{REV} (failed)"
            assert shown["Failed checks"] == "10/10"
            assert "request-duration 612.5ms <= 500ms fail" in rows_under(text, "Metrics")

    as_json = kubectl_perch(app, "status", "podinfo", "-n", app.namespace, "-o", "json")
    canary = json.loads(as_json.stdout)
    assert canary["status"]["phase"] == "Terminated"
    assert canary["status"]["lastChecks"] == []
    # Without a name, the table as before.
    table = kubectl_perch(app, "status", "-n", app.namespace).stdout.splitlines()
    assert table[0].split()[:3] == ["NAMESPACE", "NAME", "STATUS"]
    assert table[1].split()[:3] == [app.namespace, "podinfo", "Terminated"]


def _views(out: str) -> list[dict[str, str]]:
    return [fields_of(view) for view in out.split("\n\n") if view.strip()]


def test_watch_follows_a_real_release_to_succeeded(release: Release) -> None:
    app = release
    app.flow("podinfo-canary")
    app.create(seed_spec(loadtester=app.loadtester.url))
    command, env = plugin_command(app, "status", "podinfo", "-n", app.namespace, "-w")
    # Started before the release, as someone would watch a deploy they are about to make.
    with subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as follower:
        lines: list[str] = []
        assert follower.stdout is not None
        reader = threading.Thread(target=lambda: lines.extend(follower.stdout or ()), daemon=True)
        reader.start()
        try:
            # Each view is written whole: once its Phase line is here, the first view is shown.
            app.wait_for(lambda: any(line.startswith("Phase:") for line in lines), "the view")
            app.release(IMAGE_NEW)
            app.start_analyzer()
            follower.wait(timeout=FOLLOW_DEADLINE)
            reader.join(timeout=10)
        finally:
            if follower.poll() is None:
                follower.kill()
        err = follower.stderr.read() if follower.stderr else ""
    assert follower.returncode == 0, err
    out = "".join(lines)
    views = _views(out)
    assert views[0]["Phase"].startswith("Initialized")
    assert views[-1]["Phase"].startswith("Succeeded")
    # Each step was shown, in order, none skipped: the watch sees every status the analyzer wrote.
    marked = []
    for view in views:
        step = re.search(r"\[(\d+)\]", view.get("Steps", ""))
        if step and (not marked or marked[-1] != int(step.group(1))):
            marked.append(int(step.group(1)))
    assert marked == [0, *range(5, 55, 5)], marked
    # The metrics the analyzer measured, against their thresholds, while it progressed.
    progressing = [v for v in views if v["Phase"].startswith("Progressing")]
    assert any(v.get("Failed checks") == "0/10" for v in progressing)
    last = app.status()["lastChecks"]
    assert [(c["name"], c["outcome"]) for c in last] == [
        ("request-success-rate", "pass"),
        ("request-duration", "pass"),
        ("load-test", "pass"),
    ]
    assert last[0]["min"] == 99 and last[0]["value"] >= 99
    assert re.search(r"request-success-rate\s+[\d.]+%\s+>= 99%\s+pass", out)


def test_watch_exits_1_when_the_release_fails(release: Release) -> None:
    app = release
    app.flow("podinfo-canary", error_ratio=0.5)
    app.create(seed_spec(loadtester=app.loadtester.url, threshold=2))
    app.release(IMAGE_NEW)
    app.start_analyzer()
    command, env = plugin_command(app, "status", "podinfo", "-n", app.namespace, "-w")
    done = subprocess.run(
        command,
        env=env,
        capture_output=True,
        text=True,
        timeout=FOLLOW_DEADLINE,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    final = _views(done.stdout)[-1]
    assert final["Phase"].startswith("Failed")
    assert final["Failed checks"] == "2/2"
    assert re.search(r"request-success-rate\s+[\d.]+%\s+>= 99%\s+fail", done.stdout)


@pytest.mark.parametrize(
    "spec",
    [
        SEED_SPEC_CURRENT.replace("stepWeight: 5", "stepWeight: 80"),
        "service: {port: 9898}\ntargetRef: {name: someone-else}",
        "analysis: [1",
    ],
)
def test_validate_says_what_the_webhook_says(release: Release, spec: str) -> None:
    app = release
    dep = podinfo(namespace=app.namespace, uid=None, defaulted=False, spec=spec)
    manifest = yaml.safe_dump(dep)
    checked = kubectl_perch(app, "validate", "-f", "-", "-o", "json", stdin=manifest)
    assert checked.returncode == 1, checked.stdout + checked.stderr
    (finding,) = json.loads(checked.stdout)
    applied = app.perch.plane.kubectl(
        "-n", app.namespace, "apply", "-f", "-", input=manifest, check=False
    )
    assert applied.returncode != 0
    assert f"denied the request: {finding['message']}" in applied.stderr
    assert app.deployment() is None
