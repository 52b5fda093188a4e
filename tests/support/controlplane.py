"""A real Kubernetes control plane for the cluster tier, started the way envtest starts one.

Where the API server comes from, in order:

1. ``PERCH_TEST_KUBECONFIG``: any running cluster (kind, a shared test cluster). Nothing is started
   or stopped; the audit log is not available.
2. ``PERCH_KUBE_ASSETS``: a folder with ``kube-up``, ``kube-down`` and ``kubectl`` (etcd,
   kube-apiserver and kube-controller-manager behind them). A control plane is started in a
   temporary folder for the test session and stopped at its end.
3. ``../shared/kube`` beside the repository: the same, found without configuration.

With none of them the cluster tier is skipped, and :func:`unavailable` says how to get one.
``PERCH_REQUIRE_CLUSTER=1`` (set by ``.ci/run``) turns that skip into a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
KUBECONFIG_ENV = "PERCH_TEST_KUBECONFIG"
ASSETS_ENV = "PERCH_KUBE_ASSETS"
REQUIRE_ENV = "PERCH_REQUIRE_CLUSTER"
SHARED_ASSETS = REPO.parent / "shared" / "kube"
# kube-up waits up to KUBE_UP_TIMEOUT per stage itself; this bounds a wedged start.
START_DEADLINE = 300.0


def assets() -> Path | None:
    """The folder holding kube-up, kube-down and kubectl, if there is one."""
    configured = os.environ.get(ASSETS_ENV)
    for candidate in ([Path(configured)] if configured else []) + [SHARED_ASSETS]:
        if (candidate / "kube-up").is_file() and (candidate / "kube-down").is_file():
            return candidate
    return None


def unavailable() -> str | None:
    """Why the cluster tier cannot run here; None when it can."""
    if os.environ.get(KUBECONFIG_ENV) or assets() is not None:
        return None
    return (
        f"cluster tier: no Kubernetes control plane. Set {KUBECONFIG_ENV} to the kubeconfig of a "
        f"cluster (e.g. kind create cluster), or {ASSETS_ENV} to a folder whose kube-up DIR / "
        "kube-down DIR scripts start and stop etcd, kube-apiserver and kube-controller-manager "
        f"(looked for in {SHARED_ASSETS} by default); see docs/testing.md"
    )


def describe() -> str:
    if os.environ.get(KUBECONFIG_ENV):
        return f"{KUBECONFIG_ENV}={os.environ[KUBECONFIG_ENV]}"
    found = assets()
    return f"started from {found}" if found else "none"


def required() -> bool:
    return os.environ.get(REQUIRE_ENV, "").strip().lower() in ("1", "true", "yes")


@dataclass
class ControlPlane:
    kubeconfig: Path
    # Set when this session started the control plane (kube-up): its folder holds the audit log.
    directory: Path | None
    kubectl_path: str | None

    @property
    def audit_log(self) -> Path | None:
        if self.directory is None:
            return None
        path = self.directory / "audit.log"
        return path if path.exists() else None

    @property
    def local(self) -> bool:
        """Started here: no kubelet, no scheduler, nodes only as the tests make them."""
        return self.directory is not None

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        kubeconfig: Path | None = None,
        check: bool = True,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        if self.kubectl_path is None:
            raise RuntimeError("no kubectl: set PERCH_KUBE_ASSETS or put kubectl on PATH")
        done = subprocess.run(
            [self.kubectl_path, "--kubeconfig", str(kubeconfig or self.kubeconfig), *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
            )
        return done

    def audit_size(self) -> int:
        """Where the audit log ends now: ``audit_events(since=...)`` reads what comes after."""
        path = self.audit_log
        return path.stat().st_size if path is not None else 0

    def audit_events(self, *, since: int = 0) -> Iterator[dict[str, Any]]:
        """Every completed request the API server has logged so far (after the ``since`` byte
        of the log, an earlier ``audit_size()``; the API server starts a new log at 100 MB, and
        a log shorter than ``since`` is read from its start)."""
        path = self.audit_log
        if path is None:
            return
        with path.open() as lines:
            lines.seek(since if since <= path.stat().st_size else 0)
            for line in lines:
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line being written right now
                if event.get("stage") == "ResponseComplete":
                    yield event

    def restart(self) -> None:
        """kube-down then kube-up on the same folder: etcd's data is kept.

        The API server may come back on another port (kube-up picks a new one while sockets of
        the old server linger) and rewrites ``kubeconfig``: clients made before must be made again
        from it, and kubeconfigs derived from it (ServiceAccount ones) re-pointed with
        :func:`repoint`."""
        found = assets()
        if self.directory is None or found is None:
            raise RuntimeError("only a control plane this session started can be restarted")
        subprocess.run([str(found / "kube-down"), str(self.directory)], check=True, timeout=120)
        _up(found, self.directory)


def server_of(kubeconfig: Path) -> str:
    import yaml

    return str(yaml.safe_load(kubeconfig.read_text())["clusters"][0]["cluster"]["server"])


def repoint(kubeconfig: Path, *, server: str) -> None:
    """Point a kubeconfig derived from the control plane's at its current address."""
    import yaml

    config = yaml.safe_load(kubeconfig.read_text())
    for cluster in config["clusters"]:
        cluster["cluster"]["server"] = server
    kubeconfig.write_text(yaml.safe_dump(config))


def _up(found: Path, directory: Path) -> Path:
    done = subprocess.run(
        [str(found / "kube-up"), str(directory)],
        capture_output=True,
        text=True,
        timeout=START_DEADLINE,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"kube-up {directory} failed ({done.returncode}):\n{done.stderr[-4000:]}"
        )
    return Path(done.stdout.strip().splitlines()[-1])


def _kubectl_for(found: Path | None) -> str | None:
    if found is not None and (found / "kubectl").is_file():
        return str(found / "kubectl")
    return shutil.which("kubectl")


@dataclass
class Session:
    plane: ControlPlane
    _assets: Path | None

    def stop(self) -> None:
        if self.plane.directory is not None and self._assets is not None:
            subprocess.run(
                [str(self._assets / "kube-down"), str(self.plane.directory)],
                check=False,
                timeout=120,
            )


def start(directory: Path) -> Session:
    """The control plane for this session: the configured cluster, or one started in `directory`."""
    external = os.environ.get(KUBECONFIG_ENV)
    found = assets()
    if external:
        return Session(ControlPlane(Path(external), None, _kubectl_for(found)), None)
    if found is None:
        raise RuntimeError(unavailable() or "no control plane")
    kubeconfig = _up(found, directory)
    return Session(ControlPlane(kubeconfig, directory, _kubectl_for(found)), found)
