"""The validators themselves catch what they are there to catch."""

from __future__ import annotations

import pytest

from tests.validation import crd_kinds, validate


def test_all_crds_load():
    kinds = crd_kinds()
    for key in [
        ("networking.istio.io/v1", "VirtualService"),
        ("networking.istio.io/v1", "DestinationRule"),
        ("gateway.networking.k8s.io/v1", "HTTPRoute"),
        ("perch.dev/v1alpha1", "Canary"),
    ]:
        assert key in kinds


def test_typo_in_virtualservice_is_caught():
    vs = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "podinfo", "namespace": "test"},
        "spec": {
            "hosts": ["podinfo"],
            "http": [{"route": [{"destination": {"host": "podinfo"}, "wieght": 100}]}],
        },
    }
    with pytest.raises(AssertionError, match="wieght"):
        validate(vs)


def test_unknown_field_in_deployment_is_caught():
    dep = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "x"},
        "spec": {"selector": {"matchLabels": {"a": "b"}}, "replicas": 1, "templates": {}},
    }
    with pytest.raises(AssertionError):
        validate(dep)


def test_the_schemas_the_tests_use_ship_with_the_repository():
    """A clone needs nothing beside it: every CRD file is in tests/schemas and listed in its
    README with the release it came from."""
    from tests.validation import SCHEMAS

    files = sorted(p.name for p in SCHEMAS.glob("*.yaml"))
    readme = (SCHEMAS / "README.md").read_text()
    assert len(files) == 4
    for name in files:
        assert f"| {name} |" in readme, f"{name} is not listed in tests/schemas/README.md"
    assert sorted(p.name for p in SCHEMAS.iterdir()) == sorted([*files, "README.md"])
