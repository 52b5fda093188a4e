"""Server-side apply's ownership read from managedFields, and an applier's configuration."""

from __future__ import annotations

from perch.fields import applied_configuration, applier_of

LIVE = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {
        "name": "podinfo",
        "namespace": "test",
        "resourceVersion": "42",
        "labels": {"app": "podinfo", "team": "web"},
        "annotations": {"perch.dev/enabled": "true", "perch.dev/revision": "v1-a"},
        "managedFields": [
            {
                "manager": "helm",
                "operation": "Apply",
                "time": "2026-12-03T10:00:00Z",
                "fieldsV1": {
                    "f:metadata": {
                        "f:labels": {"f:app": {}},
                        "f:annotations": {"f:perch.dev/enabled": {}},
                    },
                    "f:spec": {
                        "f:selector": {},
                        "f:template": {
                            "f:spec": {
                                "f:containers": {
                                    'k:{"name":"app"}': {".": {}, "f:image": {}, "f:name": {}},
                                    'k:{"name":"sidecar"}': {".": {}, "f:name": {}},
                                }
                            }
                        },
                    },
                },
            },
            {
                "manager": "kube-controller-manager",
                "operation": "Update",
                "subresource": "status",
                "fieldsV1": {"f:status": {"f:replicas": {}}},
            },
            {
                "manager": "kubectl-label",
                "operation": "Update",
                "fieldsV1": {"f:metadata": {"f:labels": {"f:team": {}}}},
            },
        ],
    },
    "spec": {
        "replicas": 3,
        "selector": {"matchLabels": {"app": "podinfo"}},
        "template": {
            "spec": {
                "containers": [
                    {"name": "sidecar", "image": "envoy", "ports": [{"containerPort": 1}]},
                    {"name": "app", "image": "podinfo:1", "imagePullPolicy": "IfNotPresent"},
                ]
            }
        },
    },
    "status": {"replicas": 3},
}


def test_the_applier_of_the_template_is_the_apply_manager_that_owns_it():
    assert applier_of(LIVE, "spec", "template") == "helm"
    assert applier_of(LIVE, "status") is None  # a status Update is not an apply
    assert applier_of({"metadata": {}}, "spec", "template") is None


def test_the_latest_of_two_appliers_owns_the_field():
    two = {
        "metadata": {
            "managedFields": [
                {
                    "manager": "old",
                    "operation": "Apply",
                    "time": "2026-01-01T00:00:00Z",
                    "fieldsV1": {"f:spec": {"f:template": {}}},
                },
                {
                    "manager": "argocd-controller",
                    "operation": "Apply",
                    "time": "2026-06-01T00:00:00Z",
                    "fieldsV1": {"f:spec": {"f:template": {}}},
                },
            ]
        }
    }
    assert applier_of(two, "spec", "template") == "argocd-controller"


def test_the_configuration_is_what_the_applier_applied_with_current_values():
    config = applied_configuration(LIVE, "helm")
    assert config == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": "podinfo",
            "namespace": "test",
            "labels": {"app": "podinfo"},
            "annotations": {"perch.dev/enabled": "true"},
        },
        "spec": {
            # An atomic field the applier owns comes whole.
            "selector": {"matchLabels": {"app": "podinfo"}},
            # List items keep the object's order and always carry their keys; fields set by
            # others (the sidecar's image and ports, the defaulted pull policy) are not the tool's.
            "template": {
                "spec": {"containers": [{"name": "sidecar"}, {"name": "app", "image": "podinfo:1"}]}
            },
        },
    }


def test_a_manager_that_applied_nothing_has_an_empty_configuration():
    config = applied_configuration(LIVE, "kubectl-label")
    assert config == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "podinfo", "namespace": "test"},
    }
