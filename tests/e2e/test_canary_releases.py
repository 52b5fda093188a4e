"""The README's promise on a real cluster: a release is held back at admission, analysed with
Istio's metrics from Prometheus under the load tester's traffic, and promoted when healthy or
rolled back when it returns 500s; a server-side dry run changes nothing.

Each test starts from a freshly created podinfo at the stable version (the `podinfo` fixture runs
deploy_podinfo of scripts/e2e-lib.sh), and acts as a user does, with kubectl.
"""

from __future__ import annotations

import time

import pytest
import yaml

from tests.e2e.conftest import (
    APP,
    NAMESPACE,
    Kubectl,
    bad_version_patch,
    podinfo_deployment,
    podinfo_spec,
    versions,
    wait_final_phase,
)

pytestmark = pytest.mark.e2e

CANARY_STARTED = "perch: canary started for revision"


def _container(deployment: dict[str, object]) -> dict[str, object]:
    spec = deployment["spec"]
    assert isinstance(spec, dict)
    (container,) = spec["template"]["spec"]["containers"]
    assert isinstance(container, dict)
    return container


def _messages(kubectl: Kubectl) -> list[str]:
    return [str(e.get("message", "")) for e in kubectl.canary_events()]


def test_server_side_dry_run_of_a_new_image_creates_nothing(podinfo: Kubectl) -> None:
    before = podinfo.canary()
    dep = podinfo_deployment()
    _container(dep)["image"] = versions()["PODINFO_IMAGE_GOOD"]

    done = podinfo.run(
        "apply", "--dry-run=server", "-o", "json", "-f", "-", input=yaml.safe_dump(dep)
    )

    # The dry run gets the answer a real apply would (so GitOps diffs see no drift): the new
    # template held back, the primary's kept, and the warning.
    assert CANARY_STARTED in done.stderr, done.stderr
    answered = yaml.safe_load(done.stdout)
    assert _container(answered)["image"] == versions()["PODINFO_IMAGE_STABLE"]
    # ...and nothing happened: give the analyzer two intervals to show otherwise.
    time.sleep(2 * podinfo_spec().analysis.interval_seconds)
    assert podinfo.get("-n", NAMESPACE, f"deploy/{APP}-canary") is None
    assert podinfo.get("-n", NAMESPACE, f"svc/{APP}-canary") is None
    assert podinfo.held_back_revision() == ""
    stored = podinfo.get("-n", NAMESPACE, f"deploy/{APP}")
    assert stored is not None
    assert _container(stored)["image"] == versions()["PODINFO_IMAGE_STABLE"]
    assert podinfo.canary().get("status") == before.get("status")


def test_a_good_version_is_promoted(podinfo: Kubectl) -> None:
    good = versions()["PODINFO_IMAGE_GOOD"]

    done = podinfo.run("-n", NAMESPACE, "set", "image", f"deployment/{APP}", f"podinfod={good}")

    assert CANARY_STARTED in done.stderr, done.stderr
    revision = podinfo.held_back_revision()
    assert revision
    canary = wait_final_phase(podinfo, revision)
    messages = _messages(podinfo)
    assert canary["status"]["phase"] == "Succeeded", "\n".join(messages)
    analysis = podinfo_spec().analysis
    assert f"Advance {APP}.{NAMESPACE} canary weight {analysis.max_weight}" in messages
    assert f"Promotion completed! Scaling down {APP}-canary.{NAMESPACE}" in messages
    # The primary now runs the new version; the canary is scaled down and has no traffic.
    podinfo.run("-n", NAMESPACE, "rollout", "status", f"deploy/{APP}", "--timeout=300s")
    primary = podinfo.get("-n", NAMESPACE, f"deploy/{APP}")
    assert primary is not None
    assert _container(primary)["image"] == good
    assert canary["status"]["canaryWeight"] == 0
    scaled = podinfo.get("-n", NAMESPACE, f"deploy/{APP}-canary")
    assert scaled is None or scaled["spec"]["replicas"] == 0


def test_a_version_that_returns_500s_is_rolled_back(podinfo: Kubectl) -> None:
    stable = versions()["PODINFO_IMAGE_STABLE"]

    done = podinfo.run(
        "-n", NAMESPACE, "patch", f"deployment/{APP}", "--type=strategic", "-p", bad_version_patch()
    )

    assert CANARY_STARTED in done.stderr, done.stderr
    revision = podinfo.held_back_revision()
    assert revision
    canary = wait_final_phase(podinfo, revision)
    messages = _messages(podinfo)
    assert canary["status"]["phase"] == "Failed", "\n".join(messages)
    threshold = podinfo_spec().analysis.threshold
    assert (
        f"Rolling back {APP}.{NAMESPACE} failed checks threshold reached {threshold}" in messages
    ), "\n".join(messages)
    # The primary never ran the bad version, and the canary is scaled down with no traffic.
    primary = podinfo.get("-n", NAMESPACE, f"deploy/{APP}")
    assert primary is not None
    container = _container(primary)
    assert container["image"] == stable
    command = container.get("command") or []
    assert isinstance(command, list)
    assert versions()["PODINFO_BAD_FLAG"] not in command
    assert canary["status"]["canaryWeight"] == 0
    scaled = podinfo.get("-n", NAMESPACE, f"deploy/{APP}-canary")
    assert scaled is None or scaled["spec"]["replicas"] == 0
