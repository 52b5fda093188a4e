"""The MutatingWebhookConfiguration that registers Perch with the API server.

The chart renders the same fields; the cluster tests and `perch-certs inject` use this builder.
Pure: it returns the object as a dict.

Why each field is what it is (docs/webhook.md has the longer story):
- the name sorts after other mutating webhooks, because the API server calls configurations in
  name order and policy engines that edit pod templates must run before Perch hashes them;
- matchConditions make the API server call Perch only for opted-in Deployments (new or old object,
  so that opting out is seen) and only when something Perch cares about changed (the template, or
  Perch's own annotations), so `failurePolicy: Fail` makes only releases of opted-in apps wait
  while Perch is down, never a scale or a label change;
- `sideEffects: NoneOnDryRun`, because Perch creates objects but not on dry-run;
- `reinvocationPolicy: IfNeeded`, so that Perch sees the template again if a later webhook edits it.
"""

from __future__ import annotations

from typing import Any, Literal

from perch.names import ANNOTATION_ENABLED, ANNOTATION_SPEC

CONFIGURATION_NAME = "zz-perch.perch.dev"
WEBHOOK_NAME = "deployments.perch.dev"
MUTATE_PATH = "/mutate"
DEFAULT_TIMEOUT_SECONDS = 5
FailurePolicy = Literal["Fail", "Ignore"]


def _annotation(obj: str, key: str) -> str:
    """CEL for an annotation's value, '' when absent (no optional types: CEL of Kubernetes 1.28)."""
    return (
        f"(has({obj}.metadata.annotations) && '{key}' in {obj}.metadata.annotations"
        f" ? {obj}.metadata.annotations['{key}'] : '')"
    )


_ENABLED_NOW = _annotation("object", ANNOTATION_ENABLED)
_ENABLED_BEFORE = _annotation("oldObject", ANNOTATION_ENABLED)
_SPEC_NOW = _annotation("object", ANNOTATION_SPEC)
_SPEC_BEFORE = _annotation("oldObject", ANNOTATION_SPEC)

# Evaluated by the API server for CREATE and UPDATE; `oldObject` is read only for UPDATE.
MATCH_CONDITIONS: list[dict[str, str]] = [
    {
        "name": "opted-in",
        "expression": (
            f"{_ENABLED_NOW} == 'true' || "
            f"(request.operation == 'UPDATE' && {_ENABLED_BEFORE} == 'true')"
        ),
    },
    {
        "name": "release-or-configuration-change",
        "expression": (
            "request.operation == 'CREATE' || "
            "object.spec.template != oldObject.spec.template || "
            f"{_ENABLED_NOW} != {_ENABLED_BEFORE} || "
            f"{_SPEC_NOW} != {_SPEC_BEFORE}"
        ),
    },
]


def registration(
    *,
    namespace: str,
    service: str | None = None,
    url: str | None = None,
    ca_bundle: str | None = None,
    failure_policy: FailurePolicy = "Fail",
    timeout_seconds: int = DEFAULT_TIMEOUT_SECONDS,
    name: str = CONFIGURATION_NAME,
) -> dict[str, Any]:
    """`namespace` is Perch's own (excluded, with kube-system); give `service` or `url`."""
    if (service is None) == (url is None):
        raise ValueError("give exactly one of service and url")
    if not 1 <= timeout_seconds <= 30:
        raise ValueError("timeout_seconds must be between 1 and 30")
    client_config: dict[str, Any] = (
        {"url": url}
        if url is not None
        else {
            "service": {"name": service, "namespace": namespace, "path": MUTATE_PATH, "port": 443}
        }
    )
    if ca_bundle:
        client_config["caBundle"] = ca_bundle
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "perch"}},
        "webhooks": [
            {
                "name": WEBHOOK_NAME,
                "admissionReviewVersions": ["v1"],
                "clientConfig": client_config,
                "rules": [
                    {
                        "apiGroups": ["apps"],
                        "apiVersions": ["v1"],
                        "resources": ["deployments"],
                        "operations": ["CREATE", "UPDATE"],
                        "scope": "Namespaced",
                    }
                ],
                "namespaceSelector": {
                    "matchExpressions": [
                        {
                            "key": "kubernetes.io/metadata.name",
                            "operator": "NotIn",
                            "values": sorted({namespace, "kube-system"}),
                        }
                    ]
                },
                "matchConditions": [dict(c) for c in MATCH_CONDITIONS],
                "sideEffects": "NoneOnDryRun",
                "reinvocationPolicy": "IfNeeded",
                "failurePolicy": failure_policy,
                "matchPolicy": "Equivalent",
                "timeoutSeconds": timeout_seconds,
            }
        ],
    }
