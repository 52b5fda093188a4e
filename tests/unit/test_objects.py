"""The canary copies: relabelled so the user's Services never select them, and schema-valid."""

from __future__ import annotations

from perch.objects import (
    canary_deployment,
    canary_label_value,
    canary_selector,
    canary_service,
    without_gitops_labels,
)
from perch.spec import parse_spec
from tests.seed import IMAGE_NEW, podinfo
from tests.validation import validate


def test_label_values_stay_valid() -> None:
    assert canary_label_value("podinfo") == "podinfo-canary"
    long = "a" * 60 + "-b"
    value = canary_label_value(long)
    assert len(value) <= 63
    assert value.endswith("-canary")
    assert value[0].isalnum()


def test_selector_expressions_are_relabelled_too() -> None:
    selector = {
        "matchLabels": {"app": "podinfo"},
        "matchExpressions": [
            {"key": "tier", "operator": "In", "values": ["web"]},
            {"key": "legacy", "operator": "DoesNotExist"},
        ],
    }
    out = canary_selector(selector)
    assert out["matchLabels"] == {"app": "podinfo-canary", "perch.dev/track": "canary"}
    assert out["matchExpressions"][0]["values"] == ["web-canary"]
    assert out["matchExpressions"][1] == {"key": "legacy", "operator": "DoesNotExist"}
    assert selector["matchLabels"] == {"app": "podinfo"}  # the primary's is untouched


def test_gitops_tracking_labels_are_not_copied() -> None:
    labels = {
        "app": "podinfo",
        "argocd.argoproj.io/instance": "x",
        "app.kubernetes.io/instance": "x",
        "kustomize.toolkit.fluxcd.io/name": "apps",
        "helm.toolkit.fluxcd.io/name": "apps",
    }
    assert without_gitops_labels(labels) == {"app": "podinfo"}


def test_canary_deployment_and_service_are_valid_and_select_only_canary_pods() -> None:
    primary = podinfo()
    template = podinfo(image=IMAGE_NEW)["spec"]["template"]
    dep = canary_deployment(primary, template=template, revision="v1-abc")
    svc = canary_service(primary, spec=parse_spec("service: {port: 9898, targetPort: http}"))
    validate(dep)
    validate(svc)
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert all(pod_labels.get(k) == v for k, v in dep["spec"]["selector"]["matchLabels"].items())
    assert all(pod_labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    # The user's Service (selector app: podinfo) does not select canary pods.
    assert pod_labels.get("app") != primary["spec"]["selector"]["matchLabels"]["app"]
    assert dep["metadata"]["name"] == "podinfo-canary"
    assert dep["spec"]["replicas"] == primary["spec"]["replicas"]
    assert svc["spec"]["ports"][0]["targetPort"] == "http"
