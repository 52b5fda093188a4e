"""Controlling a release without editing the spec git owns, on a real control plane.

`kubectl perch` is run as kubectl runs a plugin (``kubectl perch …`` finds ``kubectl-perch`` on
PATH); the analyzer acts on the annotation it sets. Also: opting out mid-analysis hands the
Deployment back, a GitOps tool's server-side dry-run during the analysis predicts the live object
(no drift), an update refused by a later admission plugin leaves a canary the analyzer removes,
and a second analyzer takes over when the leader is killed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.seed import IMAGE_NEW, IMAGE_STABLE
from tests.support.admission import denying_policy
from tests.support.release import Release, seed_spec

LEASE_NAMESPACE, LEASE_NAME = "perch", "perch-analyzer"


def kubectl_perch(app: Release, *args: str) -> subprocess.CompletedProcess[str]:
    """`kubectl perch ARGS` through kubectl's plugin lookup, with the admin kubeconfig (kubectl
    takes no flags before a plugin's name, so it comes from KUBECONFIG)."""
    plane = app.perch.plane
    assert plane.kubectl_path is not None
    bin_dir = str(Path(sys.executable).parent)
    return subprocess.run(
        [plane.kubectl_path, "perch", *args],
        env={
            **os.environ,
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "KUBECONFIG": str(plane.kubeconfig),
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def started(app: Release, *, weight: int = 10, **flow: float) -> None:
    """The seed released and analysed up to `weight`."""
    app.flow("podinfo-canary", **flow)
    app.create(seed_spec(loadtester=app.loadtester.url))
    app.watch_weights()
    app.release(IMAGE_NEW)
    app.start_analyzer()
    app.wait_for(lambda: app.status().get("canaryWeight", 0) >= weight, f"weight {weight}")


def test_pause_holds_the_weight_and_resume_goes_on(release: Release) -> None:
    app = release
    started(app)
    done = kubectl_perch(app, "pause", "podinfo", "-n", app.namespace)
    assert done.returncode == 0, done.stderr
    app.wait_for(lambda: app.status().get("paused") is True, "the pause")
    held = app.status()["canaryWeight"]
    # Nothing should happen while paused: give the analyzer three of its 1 s intervals to prove it.
    time.sleep(3)
    assert app.status()["canaryWeight"] == held
    assert "(paused)" in kubectl_perch(app, "status", "-n", app.namespace, "podinfo").stdout
    assert kubectl_perch(app, "resume", "podinfo", "-n", app.namespace).returncode == 0
    app.wait_phase("Succeeded", "Failed")
    assert app.phase() == "Succeeded"
    target = f"podinfo.{app.namespace}"
    events = app.events()
    assert any(e.startswith(f"Paused {target} on request") for e in events), events
    assert f"Resumed {target} on request (perch.dev/action=resume)" in events
    # Each weight once: the pause neither skipped nor repeated a step.
    weights = [(100 - w, w) for w in range(5, 55, 5)]
    assert app.weights_seen == [(100, 0), *weights, (100, 0)]
    annotations = app.primary()["metadata"]["annotations"]
    assert "perch.dev/action" not in annotations


def test_promote_skips_the_rest_of_the_analysis(release: Release) -> None:
    app = release
    started(app)
    assert kubectl_perch(app, "promote", "podinfo", "-n", app.namespace).returncode == 0
    app.wait_phase("Succeeded", "Failed")
    assert app.phase() == "Succeeded"
    assert app.image() == IMAGE_NEW
    target = f"podinfo.{app.namespace}"
    assert any(e.startswith(f"Promoting {target} on request") for e in app.events())
    assert app.status()["canaryWeight"] == 0
    assert app.weights() == (100, 0)


def test_abort_rolls_back_and_retry_analyses_the_revision_again(release: Release) -> None:
    app = release
    started(app)
    assert kubectl_perch(app, "abort", "podinfo", "-n", app.namespace).returncode == 0
    app.wait_phase("Failed")
    target = f"podinfo.{app.namespace}"
    app.wait_events(f"Rolling back {target} manual abort")
    assert app.image() == IMAGE_STABLE
    assert app.weights() == (100, 0)
    app.wait_for(lambda: app.deployment("podinfo-canary")["spec"]["replicas"] == 0, "scale to 0")

    assert kubectl_perch(app, "retry", "podinfo", "-n", app.namespace).returncode == 0
    app.wait_phase("Succeeded", deadline=120)
    assert any(e.startswith(f"Retrying {target} revision") for e in app.events())
    assert app.image() == IMAGE_NEW


def test_a_control_on_a_deployment_not_opted_in_is_refused(release: Release) -> None:
    app = release
    app.create("service: {port: 9898}")
    app.kubectl("annotate", "deployment", "podinfo", "perch.dev/enabled-")
    done = kubectl_perch(app, "abort", "podinfo", "-n", app.namespace)
    assert done.returncode == 1
    assert "is not opted in to Perch" in done.stderr


def test_opting_out_mid_analysis_hands_the_deployment_back(release: Release) -> None:
    app = release
    started(app)
    done = app.kubectl("annotate", "deployment", "podinfo", "perch.dev/enabled-")
    del done
    app.wait_for(lambda: app.deployment("podinfo-canary") is None, "the canary to be removed")
    assert app.phase() == "Terminated"
    assert app.weights() == (100, 0)
    # The analyzer has nothing more to do with it: the weight stays 100/0 for a few of its ticks.
    seen = list(app.weights_seen)
    time.sleep(3)
    assert app.weights_seen == seen
    # The next release is a plain rolling update.
    app.release("ghcr.io/stefanprodan/podinfo:6.7.2")
    assert app.image() == "ghcr.io/stefanprodan/podinfo:6.7.2"
    assert app.deployment("podinfo-canary") is None


def test_a_gitops_dry_run_during_the_analysis_shows_no_drift(release: Release) -> None:
    app = release
    spec = seed_spec(loadtester=app.loadtester.url)
    app.flow("podinfo-canary")
    app.create(spec, method="server-side")
    git = app.manifest(image=IMAGE_NEW, spec=spec)
    # Before the release git and the cluster differ: the dry-run says the Deployment would change
    # (Perch holds the template back, but records the held-back revision), so a GitOps tool that
    # applies only what drifted does apply the release.
    before = app.perch.plane.kubectl(
        "-n",
        app.namespace,
        "diff",
        "--server-side",
        "--field-manager=helm",
        "-f",
        "-",
        input=git,
        check=False,
    )
    assert before.returncode == 1, before.stdout + before.stderr
    assert "perch.dev/canary-revision" in before.stdout
    app.kubectl("apply", "--server-side", "--field-manager=helm", "-f", "-", input=git)
    app.start_analyzer()
    app.wait_for(lambda: app.status().get("canaryWeight", 0) >= 10, "weight 10")
    # During the analysis the primary runs the stable image while git says the new one; a
    # server-side dry-run (Flux; Argo CD with ServerSideDiff) goes through Perch and predicts the
    # live object: no drift.
    for args in (("diff", "--server-side", "--field-manager=helm"), ("diff",)):
        done = app.perch.plane.kubectl(
            "-n", app.namespace, *args, "-f", "-", input=git, check=False
        )
        assert done.returncode == 0, f"kubectl {' '.join(args)} saw drift:\n{done.stdout}"
    app.wait_phase("Succeeded", "Failed")
    assert app.phase() == "Succeeded"
    done = app.perch.plane.kubectl(
        "-n",
        app.namespace,
        "diff",
        "--server-side",
        "--field-manager=helm",
        "-f",
        "-",
        input=git,
        check=False,
    )
    assert done.returncode == 0, done.stdout


def test_an_update_refused_after_perch_admitted_it_leaves_no_canary(release: Release) -> None:
    app = release
    app.flow("podinfo-canary")
    app.create(seed_spec(loadtester=app.loadtester.url))
    app.start_analyzer("--no-leader-elect", "--orphan-grace-seconds", "2")
    label = "policy.example.com/frozen"
    message = "this namespace is frozen"
    app.kubectl("label", "deployment", "podinfo", f"{label}=true")
    with denying_policy(
        app.api,
        name=f"frozen-{uuid.uuid4().hex[:6]}",
        namespace=app.namespace,
        label=label,
        message=message,
    ):
        done = app.perch.plane.kubectl(
            "-n",
            app.namespace,
            "set",
            "image",
            "deployment/podinfo",
            f"podinfod={IMAGE_NEW}",
            check=False,
        )
        assert done.returncode != 0 and message in done.stderr
    # Perch set up a canary when it admitted the update; the update never landed, so the analyzer
    # removes it and the Canary goes back to having nothing to analyse.
    app.wait_for(lambda: app.phase() == "Initialized", "the orphaned canary to be dropped")
    app.wait_for(lambda: app.deployment("podinfo-canary") is None, "the canary Deployment to go")
    assert app.image() == IMAGE_STABLE
    assert app.weights() == (100, 0)
    assert any("was never applied" in e for e in app.events())


@pytest.fixture
def lease(api: client.ApiClient) -> Iterator[None]:
    """The chart's one Lease, absent before and after (other tests elect on it too)."""
    coordination = client.CoordinationV1Api(api)

    def delete() -> None:
        try:
            coordination.delete_namespaced_lease(LEASE_NAME, LEASE_NAMESPACE)
        except ApiException as exc:
            if exc.status != 404:
                raise

    delete()
    yield
    delete()


def test_a_killed_leader_is_replaced_and_the_release_finishes(
    release: Release, lease: None
) -> None:
    app = release
    app.flow("podinfo-canary")
    app.create(seed_spec(loadtester=app.loadtester.url))
    app.watch_weights()
    app.release(IMAGE_NEW)
    elect = ("--leader-elect", "--lease-namespace", LEASE_NAMESPACE, "--lease-name", LEASE_NAME)
    first = app.start_analyzer(*elect, "--identity", "first")
    app.wait_for(lambda: app.status().get("canaryWeight", 0) >= 10, "the first leader's steps")
    second = app.start_analyzer(*elect, "--identity", "second")
    first.kill()
    killed_at = time.monotonic()
    # The standby takes over once the dead leader's Lease expires (15 s by default).
    app.wait_for(
        lambda: "became the active analyzer" in second.log.read_text(), "the takeover", deadline=30
    )
    assert time.monotonic() - killed_at < 15 + 5
    app.wait_phase("Succeeded", "Failed")
    assert app.phase() == "Succeeded"
    weights = [(100 - w, w) for w in range(5, 55, 5)]
    assert app.weights_seen == [(100, 0), *weights, (100, 0)]
    holder = client.CoordinationV1Api(app.api).read_namespaced_lease(LEASE_NAME, LEASE_NAMESPACE)
    assert holder.spec.holder_identity == "second"
    second.stop()
