"""The demo's inputs, checked where no cluster runs: the manifests `make demo` and the e2e suite
apply are valid, carry the seed's configuration, and use the versions pinned in
scripts/versions.env; and demo.sh stops at once, creating nothing, when Docker is missing.

Not marked e2e: these run in every `make test`.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from perch.spec import parse_spec
from tests.e2e.conftest import (
    LIB,
    MANIFESTS,
    REPO,
    bad_version_patch,
    manifest,
    podinfo_deployment,
    podinfo_spec,
    release_deadline,
    versions,
)
from tests.seed import IMAGE_NEW, IMAGE_STABLE, SEED_SPEC_EARLY, podinfo
from tests.validation import validate

DEMO = REPO / "scripts" / "demo.sh"
REQUIRED = {
    "KIND_VERSION",
    "KIND_NODE_IMAGE",
    "KUBERNETES_VERSION",
    "KUBECTL_VERSION",
    "HELM_VERSION",
    "ISTIO_VERSION",
    "ISTIO_PROFILE",
    "PODINFO_IMAGE_STABLE",
    "PODINFO_IMAGE_GOOD",
    "PODINFO_IMAGE_BAD",
    "PODINFO_BAD_FLAG",
    "LOADTESTER_IMAGE",
    "DEMO_INTERVAL_SECONDS",
}


def test_versions_are_pinned() -> None:
    v = versions()
    assert set(v) >= REQUIRED, REQUIRED - set(v)
    # kind supports a node image only at the digest its release notes give.
    assert re.fullmatch(r"kindest/node:v\d+\.\d+\.\d+@sha256:[0-9a-f]{64}", v["KIND_NODE_IMAGE"])
    assert v["KIND_NODE_IMAGE"].startswith(f"kindest/node:{v['KUBERNETES_VERSION']}@")
    # kubectl within one minor of the cluster.
    minor = [int(x.split(".")[1]) for x in (v["KUBECTL_VERSION"], v["KUBERNETES_VERSION"])]
    assert abs(minor[0] - minor[1]) <= 1
    for key, value in v.items():
        if key.endswith("_IMAGE") or key.startswith("PODINFO_IMAGE"):
            assert re.search(r":[\w.-]+(@sha256:[0-9a-f]{64})?$", value), f"{key} is not pinned"
            assert not value.endswith(":latest"), key
        if key.startswith("HELM_SHA256_"):
            assert re.fullmatch(r"[0-9a-f]{64}", value), key


@pytest.mark.parametrize("name", sorted(p.name for p in MANIFESTS.glob("*.yaml")))
def test_manifest_objects_are_valid(name: str) -> None:
    docs = manifest(name)
    assert docs
    for doc in docs:
        validate(doc)


def test_podinfo_is_the_seed_with_the_demo_interval() -> None:
    dep = podinfo_deployment()
    seed = podinfo(spec=SEED_SPEC_EARLY, uid=None, defaulted=False)
    # The Deployment is the seed's, without the GitOps tool labels the seed carries for tests.
    assert dep["spec"] == seed["spec"]
    assert dep["metadata"]["annotations"]["perch.dev/enabled"] == "true"
    # The spec is the seed's early form with two documented changes (see the manifest's header).
    ours = yaml.safe_load(dep["metadata"]["annotations"]["perch.dev/spec"])
    expected = copy.deepcopy(yaml.safe_load(SEED_SPEC_EARLY))
    expected["canaryAnalysis"]["interval"] = f"{versions()['DEMO_INTERVAL_SECONDS']}s"
    (latency,) = [
        m
        for m in expected["canaryAnalysis"]["metrics"]
        if m["name"] == "istio_request_duration_seconds_bucket"
    ]
    latency["name"] = "istio_request_duration_milliseconds_bucket"
    assert ours == expected
    spec = podinfo_spec()
    assert spec.form == "canaryAnalysis"
    assert spec.analysis.interval_seconds == float(versions()["DEMO_INTERVAL_SECONDS"])
    assert [m.histogram_unit for m in spec.analysis.metrics if m.builtin == "request-duration"] == [
        "milliseconds"
    ]


def test_images_are_the_pinned_ones() -> None:
    v = versions()
    assert v["PODINFO_IMAGE_STABLE"] == IMAGE_STABLE
    assert v["PODINFO_IMAGE_GOOD"] == IMAGE_NEW
    (container,) = podinfo_deployment()["spec"]["template"]["spec"]["containers"]
    assert container["image"] == v["PODINFO_IMAGE_STABLE"]
    (tester,) = [d for d in manifest("loadtester.yaml") if d["kind"] == "Deployment"]
    assert tester["spec"]["template"]["spec"]["containers"][0]["image"] == v["LOADTESTER_IMAGE"]


def test_the_objects_the_spec_names_exist() -> None:
    spec = podinfo_spec()
    (hpa,) = [d for d in manifest("podinfo.yaml") if d["kind"] == "HorizontalPodAutoscaler"]
    assert spec.autoscaler_ref is not None
    assert hpa["metadata"]["name"] == spec.autoscaler_ref.name
    assert hpa["spec"]["scaleTargetRef"]["name"] == "podinfo"
    (svc,) = [d for d in manifest("podinfo.yaml") if d["kind"] == "Service"]
    assert svc["spec"]["ports"][0]["port"] == spec.service.port
    (gateway,) = manifest("gateway.yaml")
    meta = gateway["metadata"]
    assert spec.service.gateways == (f"{meta['name']}.{meta['namespace']}.svc.cluster.local",)
    (gate,) = spec.analysis.webhooks
    (tester_svc,) = [d for d in manifest("loadtester.yaml") if d["kind"] == "Service"]
    tmeta = tester_svc["metadata"]
    assert gate.url == f"http://{tmeta['name']}.{tmeta['namespace']}/"
    assert tester_svc["spec"]["ports"][0]["port"] == 80
    (namespace,) = manifest("namespace.yaml")
    assert namespace["metadata"]["labels"]["istio-injection"] == "enabled"


def test_bad_version_differs_from_the_good_one_only_by_the_flag() -> None:
    patch = yaml.safe_load(bad_version_patch())
    (container,) = patch["spec"]["template"]["spec"]["containers"]
    (ours,) = podinfo_deployment()["spec"]["template"]["spec"]["containers"]
    assert container["name"] == ours["name"]
    assert container["command"] == [*ours["command"], versions()["PODINFO_BAD_FLAG"]]
    assert parse_spec(podinfo_deployment()["metadata"]["annotations"]["perch.dev/spec"])
    assert release_deadline() > 0


def test_the_shell_scripts_parse() -> None:
    for script in (DEMO, LIB):
        done = subprocess.run(
            ["bash", "-n", str(script)], capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stderr


def test_demo_stops_at_once_without_docker(tmp_path: Path) -> None:
    # A Docker host that does not exist: `docker info` fails whether or not Docker runs here.
    tools = tmp_path / "bin"
    env = {
        **os.environ,
        "DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock",
        "PERCH_BIN": str(tools),
    }
    done = subprocess.run(
        ["bash", str(DEMO)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        cwd=REPO,
        check=False,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Docker is required" in done.stderr
    assert not tools.exists(), "demo.sh fetched tools before checking for Docker"
