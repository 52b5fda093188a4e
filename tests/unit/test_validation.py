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
