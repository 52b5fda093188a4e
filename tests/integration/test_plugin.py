"""kubectl perch against the API stand-in: actions land as the annotation, status reads the table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
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


def _create_canary(standin: StandIn, namespace: str, phase: str) -> None:
    custom = client.CustomObjectsApi(standin.api_client())
    custom.create_namespaced_custom_object(
        "perch.dev",
        "v1alpha1",
        namespace,
        "canaries",
        {
            "apiVersion": "perch.dev/v1alpha1",
            "kind": "Canary",
            "metadata": {"name": "podinfo"},
            "spec": {"targetRef": {"name": "podinfo"}},
        },
    )
    custom.patch_namespaced_custom_object_status(
        "perch.dev", "v1alpha1", namespace, "canaries", "podinfo", {"status": {"phase": phase}}
    )


def _rows(out: str) -> list[list[str]]:
    return [line.split()[:3] for line in out.splitlines()[1:]]


def test_status_all_namespaces_after_the_subcommand(
    standin: StandIn, kubeconfig: str, capsys
) -> None:
    _create_canary(standin, "test", "Progressing")
    _create_canary(standin, "default", "Succeeded")
    assert main(["--kubeconfig", kubeconfig, "status", "-A"]) == 0
    assert _rows(capsys.readouterr().out) == [
        ["default", "podinfo", "Succeeded"],
        ["test", "podinfo", "Progressing"],
    ]


@pytest.mark.parametrize(
    "argv",
    [
        ["status", "-n", "test", "podinfo"],
        ["-n", "test", "status", "podinfo"],
        ["status", "podinfo", "-n", "test"],
        # The flag after the subcommand wins, as kubectl's last flag does.
        ["-n", "default", "status", "-n", "test", "podinfo"],
    ],
)
def test_status_namespace_before_or_after_the_subcommand(
    standin: StandIn, kubeconfig: str, argv: list[str], capsys
) -> None:
    _create_canary(standin, "test", "Progressing")
    _create_canary(standin, "default", "Succeeded")
    assert main(["--kubeconfig", kubeconfig, *argv]) == 0
    # With a name: that release at a glance.
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["Namespace:", "test"]
    assert lines[2].split()[:2] == ["Phase:", "Progressing"]


@pytest.mark.parametrize(
    "argv",
    [
        ["promote", "podinfo", "-n", "test"],
        ["promote", "-n", "test", "podinfo"],
        ["-n", "test", "promote", "podinfo"],
    ],
)
def test_action_namespace_anywhere(standin: StandIn, kubeconfig: str, argv: list[str]) -> None:
    _deploy(standin)
    assert main(["--kubeconfig", kubeconfig, *argv]) == 0
    stored = standin.objects("deployments")[("deployments", "test", "podinfo")]
    assert stored["metadata"]["annotations"]["perch.dev/action"] == "promote"


@pytest.mark.parametrize(
    "argv",
    [
        ["status", "--kubeconfig", "{kubeconfig}", "-n", "test"],
        ["abort", "podinfo", "--kubeconfig", "{kubeconfig}", "-n", "test"],
        # After the subcommand wins: the top-level path does not exist.
        [
            "--kubeconfig",
            "{missing}",
            "abort",
            "--kubeconfig",
            "{kubeconfig}",
            "-n",
            "test",
            "podinfo",
        ],
    ],
)
def test_kubeconfig_after_the_subcommand(
    standin: StandIn, kubeconfig: str, tmp_path: Path, argv: list[str]
) -> None:
    _deploy(standin)
    _create_canary(standin, "test", "Progressing")
    paths = {"kubeconfig": kubeconfig, "missing": str(tmp_path / "missing")}
    assert main([a.format(**paths) for a in argv]) == 0


def test_namespace_defaults_to_the_kubeconfig_contexts(
    standin: StandIn, kubeconfig: str, capsys
) -> None:
    config = yaml.safe_load(Path(kubeconfig).read_text())
    config["contexts"][0]["context"]["namespace"] = "test"
    Path(kubeconfig).write_text(yaml.safe_dump(config))
    _deploy(standin)
    assert main(["--kubeconfig", kubeconfig, "promote", "podinfo"]) == 0
    stored = standin.objects("deployments")[("deployments", "test", "podinfo")]
    assert stored["metadata"]["annotations"]["perch.dev/action"] == "promote"


def test_namespace_defaults_to_default_without_one_in_the_context(
    standin: StandIn, kubeconfig: str, capsys
) -> None:
    assert main(["--kubeconfig", kubeconfig, "promote", "podinfo"]) == 1
    assert "deployment default/podinfo not found" in capsys.readouterr().err


def test_missing_kubeconfig_is_a_clear_error(tmp_path: Path, capsys) -> None:
    assert main(["promote", "podinfo", "--kubeconfig", str(tmp_path / "nope")]) == 1
    assert f"kubeconfig {tmp_path / 'nope'}: no such file" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv", [["-A", "promote", "podinfo"], ["abort", "podinfo", "-A"], ["status", "-A", "podinfo"]]
)
def test_all_namespaces_is_refused_where_it_means_nothing(
    standin: StandIn, kubeconfig: str, argv: list[str], capsys
) -> None:
    _deploy(standin)
    with pytest.raises(SystemExit) as exit_:
        main(["--kubeconfig", kubeconfig, *argv])
    assert exit_.value.code == 2
    assert "-A/--all-namespaces" in capsys.readouterr().err
    stored = standin.objects("deployments")[("deployments", "test", "podinfo")]
    assert "perch.dev/action" not in stored["metadata"]["annotations"]


def test_status_of_one_release_reads_the_deployments_spec(
    standin: StandIn, kubeconfig: str, capsys
) -> None:
    _deploy(standin)
    _create_canary(standin, "test", "Progressing")
    assert main(["--kubeconfig", kubeconfig, "-n", "test", "status", "podinfo"]) == 0
    out = capsys.readouterr().out
    # The seed: 5 % steps to 50 %, threshold 10, two metrics and a load test.
    assert "Steps:          [0] 5 10 ... 50" in out
    assert "Failed checks:  0/10" in out
    assert "request-success-rate - >= 99% not measured yet" in [
        " ".join(line.split()) for line in out.splitlines()
    ]


@pytest.mark.parametrize("output", ["json", "yaml"])
def test_status_output_for_scripts(standin: StandIn, kubeconfig: str, output: str, capsys) -> None:
    _create_canary(standin, "test", "Progressing")
    load = json.loads if output == "json" else yaml.safe_load
    assert main(["--kubeconfig", kubeconfig, "-n", "test", "status", "podinfo", "-o", output]) == 0
    canary = load(capsys.readouterr().out)
    assert (canary["kind"], canary["metadata"]["name"]) == ("Canary", "podinfo")
    assert canary["status"]["phase"] == "Progressing"
    assert main(["--kubeconfig", kubeconfig, "-A", "status", "-o", output]) == 0
    listed = load(capsys.readouterr().out)
    assert (listed["kind"], [i["metadata"]["name"] for i in listed["items"]]) == (
        "List",
        ["podinfo"],
    )


def test_status_of_a_missing_canary(standin: StandIn, kubeconfig: str, capsys) -> None:
    assert main(["--kubeconfig", kubeconfig, "-n", "test", "status", "nope"]) == 1
    assert "canary test/nope not found" in capsys.readouterr().err


def test_watch_needs_a_name(standin: StandIn, kubeconfig: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--kubeconfig", kubeconfig, "status", "-w"])
    assert exit_.value.code == 2
    assert "give its NAME" in capsys.readouterr().err


def test_watch_of_a_release_that_already_ended_returns_its_verdict(
    standin: StandIn, kubeconfig: str, capsys
) -> None:
    _create_canary(standin, "test", "Failed")
    assert main(["--kubeconfig", kubeconfig, "-n", "test", "status", "-w", "podinfo"]) == 1
    assert "Phase:" in capsys.readouterr().out
