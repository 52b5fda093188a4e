"""The end-to-end tier: kind + Istio + Prometheus + the chart + podinfo, with real traffic.

The cluster is set up by the functions of scripts/e2e-lib.sh, the ones `make demo`
(scripts/demo.sh) runs, against a kind cluster of its own (`perch-e2e`, or PERCH_E2E_CLUSTER),
which is deleted at the end unless PERCH_E2E_KEEP=1. The tests then act as a user does, with the
pinned kubectl, and read what Perch did.

Without Docker or without kind every test marked `e2e` here is skipped, and pytest's summary says
why. The static checks of the demo's inputs (test_manifests.py) run everywhere.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from perch.spec import CanarySpec, parse_spec

REPO = Path(__file__).resolve().parents[2]
LIB = REPO / "scripts" / "e2e-lib.sh"
VERSIONS = REPO / "scripts" / "versions.env"
MANIFESTS = Path(__file__).resolve().parent / "manifests"
BIN = Path(os.environ.get("PERCH_BIN", REPO / "bin"))
CLUSTER = os.environ.get("PERCH_E2E_CLUSTER", "perch-e2e")
KUBECONFIG = BIN / f"{CLUSTER}.kubeconfig"
NAMESPACE = "test"
APP = "podinfo"
# Creating the cluster, pulling Istio, Prometheus and podinfo, building the images: minutes on a
# laptop with a fresh Docker cache. A bound, not an expectation.
SETUP_TIMEOUT = 45 * 60


# ------------------------------------------------------------------------------------------------
# Skipping the tier


def _docker_problem() -> str | None:
    docker = shutil.which("docker")
    if docker is None:
        return "the docker CLI is not installed"
    try:
        done = subprocess.run(
            [docker, "info"], capture_output=True, text=True, timeout=20, check=False
        )
    except subprocess.TimeoutExpired:
        return "'docker info' did not answer within 20s"
    if done.returncode != 0:
        first = (done.stderr or done.stdout).strip().splitlines()
        return f"'docker info' failed ({first[0] if first else f'exit {done.returncode}'})"
    return None


def _kind_problem() -> str | None:
    if (BIN / "kind").exists() or shutil.which("kind"):
        return None
    return (
        "kind is not installed (neither ./bin/kind nor kind on PATH); "
        "`bash scripts/demo.sh --tools-only` fetches the pinned kind, kubectl, helm and istioctl"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    tier = [
        item
        for item in items
        if "tests/e2e/" in str(item.fspath).replace(os.sep, "/")
        and item.get_closest_marker("e2e") is not None
    ]
    if not tier:
        return
    problem = _docker_problem() or _kind_problem()
    if problem is None:
        return
    skip = pytest.mark.skip(reason=f"e2e tier: needs Docker and kind, and here {problem}")
    for item in tier:
        item.add_marker(skip)


# ------------------------------------------------------------------------------------------------
# The demo's inputs


@cache
def versions() -> dict[str, str]:
    """scripts/versions.env as a dict (it is plain KEY=value lines)."""
    values: dict[str, str] = {}
    for raw in VERSIONS.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and key.isidentifier(), f"versions.env: not KEY=value: {raw!r}"
        values[key] = value
    return values


def manifest(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((MANIFESTS / name).read_text()) if doc]


def podinfo_deployment() -> dict[str, Any]:
    (dep,) = [d for d in manifest("podinfo.yaml") if d["kind"] == "Deployment"]
    return dep


def podinfo_spec() -> CanarySpec:
    return parse_spec(podinfo_deployment()["metadata"]["annotations"]["perch.dev/spec"])


def release_deadline() -> float:
    """Every step, every failed check the threshold allows, and the promotion's own ticks and
    rollouts, plus five minutes: generous, since tests never assert wall-clock times."""
    analysis = podinfo_spec().analysis
    steps = analysis.max_weight // analysis.step_weight
    return analysis.interval_seconds * (steps + analysis.threshold + 5) + 300


def bad_version_patch() -> str:
    """The bad release: the good image started with podinfo's --random-error (as demo.sh)."""
    v = versions()
    return json.dumps(
        {
            "spec": {
                "template": {
                    "spec": {
                        "containers": [
                            {
                                "name": "podinfod",
                                "image": v["PODINFO_IMAGE_BAD"],
                                "command": [
                                    "./podinfo",
                                    "--port=9898",
                                    "--level=info",
                                    v["PODINFO_BAD_FLAG"],
                                ],
                            }
                        ]
                    }
                }
            }
        },
        separators=(",", ":"),
    )


# ------------------------------------------------------------------------------------------------
# The cluster, through scripts/e2e-lib.sh and the pinned kubectl


def run_lib(steps: str, log: Path, *, timeout: float) -> None:
    """Run `source scripts/e2e-lib.sh; <steps>` in bash, as demo.sh does, logging to `log`."""
    env = {
        **os.environ,
        "PERCH_CLUSTER": CLUSTER,
        "PERCH_BIN": str(BIN),
        "PERCH_KUBECONFIG": str(KUBECONFIG),
    }
    script = f"set -euo pipefail; source {shlex.quote(str(LIB))}; {steps}"
    with log.open("a") as out:
        out.write(f"\n$ {steps}\n")
        out.flush()
        try:
            done = subprocess.run(
                ["bash", "-c", script],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"{steps}: still running after {timeout:.0f}s\n{_tail(log)}")
    if done.returncode != 0:
        pytest.fail(f"{steps}: exit {done.returncode}\n{_tail(log)}")


def _tail(log: Path, lines: int = 60) -> str:
    text = log.read_text(errors="replace").splitlines()
    return f"--- last {lines} lines of {log} ---\n" + "\n".join(text[-lines:])


@dataclass(frozen=True)
class Kubectl:
    """The pinned kubectl against the e2e cluster's kubeconfig."""

    binary: Path
    kubeconfig: Path

    def run(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [str(self.binary), "--kubeconfig", str(self.kubeconfig), *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)}: exit {done.returncode}\n{done.stderr}{done.stdout}"
            )
        return done

    def get(self, *args: str) -> dict[str, Any] | None:
        """`kubectl get ... -o json`, or None when the object does not exist."""
        done = self.run("get", *args, "--ignore-not-found", "-o", "json")
        return json.loads(done.stdout) if done.stdout.strip() else None

    def canary(self) -> dict[str, Any]:
        canary = self.get("-n", NAMESPACE, f"canaries.perch.dev/{APP}")
        assert canary is not None, f"no Canary {APP}.{NAMESPACE}"
        return canary

    def canary_events(self) -> list[dict[str, Any]]:
        uid = self.canary()["metadata"]["uid"]
        events = self.get(
            "-n",
            NAMESPACE,
            "events",
            "--field-selector",
            f"involvedObject.kind=Canary,involvedObject.uid={uid}",
        )
        return list((events or {}).get("items") or [])

    def diagnostics(self) -> str:
        """What a person would look at: the pods, the Canary with its events, the analyzer's log."""
        parts = [
            ("kubectl get pods -A", ("get", "pods", "-A")),
            (
                f"kubectl -n {NAMESPACE} describe canary {APP}",
                ("-n", NAMESPACE, "describe", f"canaries.perch.dev/{APP}"),
            ),
            (
                "kubectl -n perch logs deploy/perch-webhook -c analyzer --tail=40",
                ("-n", "perch", "logs", "deploy/perch-webhook", "-c", "analyzer", "--tail=40"),
            ),
        ]
        out = []
        for title, args in parts:
            done = self.run(*args, check=False)
            out.append(f"--- {title} ---\n{done.stdout}{done.stderr}")
        return "\n".join(out)

    def held_back_revision(self) -> str:
        """The revision Perch holds back for analysis (the primary's annotation)."""
        dep = self.get("-n", NAMESPACE, f"deploy/{APP}")
        assert dep is not None
        return str((dep["metadata"].get("annotations") or {}).get("perch.dev/canary-revision", ""))


def wait_for(
    what: str,
    probe: Callable[[], Any],
    *,
    deadline: float,
    every: float = 3.0,
    explain: Callable[[], str] | None = None,
) -> Any:
    """Poll `probe` until it returns something truthy; fail naming `what` at the deadline, with
    what `explain` says."""
    end = time.monotonic() + deadline
    last: Any = None
    while time.monotonic() < end:
        last = probe()
        if last:
            return last
        time.sleep(every)
    details = f"\n{explain()}" if explain else ""
    pytest.fail(f"{what}: not within {deadline:.0f}s (last seen: {last!r}){details}")


def wait_final_phase(kubectl: Kubectl, revision: str) -> dict[str, Any]:
    """The Canary once its analysis of `revision` has ended (Succeeded or Failed)."""

    def ended() -> dict[str, Any] | None:
        canary = kubectl.canary()
        status = canary.get("status") or {}
        if status.get("canaryRevision") == revision and status.get("phase") in (
            "Succeeded",
            "Failed",
        ):
            return canary
        return None

    canary: dict[str, Any] = wait_for(
        f"the analysis of {revision} to end",
        ended,
        deadline=release_deadline(),
        explain=kubectl.diagnostics,
    )
    return canary


@pytest.fixture(scope="session")
def e2e_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e") / "e2e-lib.log"


@pytest.fixture(scope="session")
def cluster(e2e_log: Path) -> Iterator[Kubectl]:
    """A kind cluster with Istio, Prometheus, the Gateway and Perch installed by the chart."""
    run_lib(
        "require_docker; ensure_tools; setup_cluster; install_istio; install_prometheus; "
        "build_and_load_images; install_perch",
        e2e_log,
        timeout=SETUP_TIMEOUT,
    )
    yield Kubectl(BIN / "kubectl", KUBECONFIG)
    if os.environ.get("PERCH_E2E_KEEP") != "1":
        run_lib("delete_cluster", e2e_log, timeout=300)


@pytest.fixture
def podinfo(cluster: Kubectl, e2e_log: Path) -> Kubectl:
    """podinfo at the stable version with the seed's annotations, freshly created, Canary idle."""
    run_lib("deploy_podinfo", e2e_log, timeout=15 * 60)

    def idle() -> bool:
        return (cluster.canary().get("status") or {}).get("phase") == "Initialized"

    wait_for(
        f"Canary {APP}.{NAMESPACE} Initialized", idle, deadline=120, explain=cluster.diagnostics
    )
    return cluster
