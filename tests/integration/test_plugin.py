"""kubectl perch against the API stand-in: actions land as the annotation, status reads the table."""

from __future__ import annotations

from pathlib import Path

import pytest
from kubernetes import client

from perch.plugin import main
from tests.seed import podinfo
from tests.standin import StandIn


@pytest.fixture
def kubeconfig(standin: StandIn, tmp_path: Path) -> str:
    return str(standin.kubeconfig(tmp_path / "kubeconfig"))


def _deploy(standin: StandIn, *, enabled: bool = True) -> None:
    dep = podinfo(uid=None, enabled=enabled)
    for key in ("resourceVersion", "generation"):
        dep["metadata"].pop(key, None)
    client.AppsV1Api(standin.api_client()).create_namespaced_deployment("test", dep)


@pytest.mark.parametrize("action", ["promote", "abort", "retry", "pause", "resume"])
def test_action_sets_the_annotation(standin: StandIn, kubeconfig: str, action: str, capsys) -> None:
    _deploy(standin)
    assert main(["--kubeconfig", kubeconfig, "-n", "test", action, "podinfo"]) == 0
    stored = standin.objects("deployments")[("deployments", "test", "podinfo")]
    assert stored["metadata"]["annotations"]["perch.dev/action"] == action
    assert f"perch.dev/action={action}" in capsys.readouterr().out


def test_action_on_a_deployment_not_opted_in_is_refused(
    standin: StandIn, kubeconfig: str, capsys
) -> None:
    _deploy(standin, enabled=False)
    assert main(["--kubeconfig", kubeconfig, "-n", "test", "abort", "podinfo"]) == 1
    assert "not opted in" in capsys.readouterr().err
    stored = standin.objects("deployments")[("deployments", "test", "podinfo")]
    assert "perch.dev/action" not in stored["metadata"]["annotations"]


def test_missing_deployment_is_a_clear_error(standin: StandIn, kubeconfig: str, capsys) -> None:
    assert main(["--kubeconfig", kubeconfig, "-n", "test", "promote", "nope"]) == 1
    assert "deployment test/nope not found" in capsys.readouterr().err


def test_status_prints_the_canaries(standin: StandIn, kubeconfig: str, capsys) -> None:
    custom = client.CustomObjectsApi(standin.api_client())
    custom.create_namespaced_custom_object(
        "perch.dev",
        "v1alpha1",
        "test",
        "canaries",
        {
            "apiVersion": "perch.dev/v1alpha1",
            "kind": "Canary",
            "metadata": {"name": "podinfo"},
            "spec": {"targetRef": {"name": "podinfo"}},
        },
    )
    custom.patch_namespaced_custom_object_status(
        "perch.dev",
        "v1alpha1",
        "test",
        "canaries",
        "podinfo",
        {
            "status": {
                "phase": "Progressing",
                "canaryWeight": 15,
                "failedChecks": 1,
                "canaryRevision": "v1-abc",
            }
        },
    )
    assert main(["--kubeconfig", kubeconfig, "-A", "status"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "NAMESPACE",
        "NAME",
        "STATUS",
        "WEIGHT",
        "FAILEDCHECKS",
        "REVISION",
        "LASTTRANSITIONTIME",
    ]
    assert lines[1].split()[:6] == ["test", "podinfo", "Progressing", "15", "1", "v1-abc"]
