"""Builders for the objects Perch makes beside a primary: canary Deployment, Service and HPA.

Pure: they take the primary (as the API server sends it) and return new objects as dicts.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Any

from perch.names import (
    ANNOTATION_REVISION,
    LABEL_MANAGED_BY,
    LABEL_TRACK,
    MANAGED_BY_VALUE,
    TRACK_CANARY,
    canary_name,
)
from perch.spec import CanarySpec

_LABEL_VALUE_MAX = 63
_CANARY_VALUE_SUFFIX = "-canary"
# Labels GitOps tools use to track what they own. Copying them would make Argo CD or Flux claim
# (and prune) the objects Perch creates.
_GITOPS_LABEL = re.compile(
    r"^(argocd\.argoproj\.io/.*|[^/]*\.toolkit\.fluxcd\.io/.*|app\.kubernetes\.io/instance)$"
)


def owner_reference(primary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """An ownerReference to the primary, or none while it has no uid (admission of a CREATE)."""
    metadata = primary.get("metadata") or {}
    uid = metadata.get("uid")
    if not uid:
        return []
    # No blockOwnerDeletion: it would need update rights on deployments/finalizers, and foreground
    # deletion of the primary does not need to wait for Perch's objects.
    return [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": metadata["name"],
            "uid": uid,
            "controller": True,
        }
    ]


def without_gitops_labels(labels: Mapping[str, str] | None) -> dict[str, str]:
    return {k: v for k, v in (labels or {}).items() if not _GITOPS_LABEL.match(k)}


def canary_label_value(value: str) -> str:
    """`podinfo` -> `podinfo-canary`, kept within the 63 characters a label value may have."""
    head = value[: _LABEL_VALUE_MAX - len(_CANARY_VALUE_SUFFIX)].rstrip("-_.")
    return head + _CANARY_VALUE_SUFFIX


def canary_selector(selector: Mapping[str, Any]) -> dict[str, Any]:
    """The primary's selector with each value suffixed, plus the canary track label.

    The user's Services select primary pods by these values; suffixing them keeps canary pods out.
    """
    result: dict[str, Any] = copy.deepcopy(dict(selector))
    match_labels = {
        k: canary_label_value(v) for k, v in (selector.get("matchLabels") or {}).items()
    }
    match_labels[LABEL_TRACK] = TRACK_CANARY
    result["matchLabels"] = match_labels
    expressions = []
    for original in selector.get("matchExpressions") or ():
        expr = dict(original)
        if expr.get("operator") == "In":
            expr["values"] = [canary_label_value(v) for v in expr.get("values") or ()]
        expressions.append(expr)
    if expressions:
        result["matchExpressions"] = expressions
    return result


def _selected_keys(selector: Mapping[str, Any]) -> set[str]:
    keys = set((selector.get("matchLabels") or {}).keys())
    keys.update(
        e.get("key") for e in selector.get("matchExpressions") or () if e.get("operator") == "In"
    )
    return keys


def canary_template(template: Mapping[str, Any], selector: Mapping[str, Any]) -> dict[str, Any]:
    """The pod template for canary pods: selected label values suffixed, track label added."""
    result: dict[str, Any] = copy.deepcopy(dict(template))
    metadata = result.setdefault("metadata", {})
    labels = dict(metadata.get("labels") or {})
    for key in _selected_keys(selector):
        if key in labels:
            labels[key] = canary_label_value(labels[key])
    labels[LABEL_TRACK] = TRACK_CANARY
    metadata["labels"] = labels
    return result


def _object_labels(primary_labels: Mapping[str, str] | None) -> dict[str, str]:
    labels = without_gitops_labels(primary_labels)
    labels[LABEL_MANAGED_BY] = MANAGED_BY_VALUE
    return labels


def canary_deployment(
    primary: Mapping[str, Any], *, template: Mapping[str, Any], revision: str
) -> dict[str, Any]:
    """A copy of the primary that runs `template` under the `-canary` name and labels."""
    metadata = primary["metadata"]
    spec = primary.get("spec") or {}
    selector = spec.get("selector") or {}
    labels = _object_labels(metadata.get("labels"))
    labels[LABEL_TRACK] = TRACK_CANARY
    canary_spec: dict[str, Any] = {
        "replicas": spec.get("replicas", 1),
        "selector": canary_selector(selector),
        "template": canary_template(template, selector),
    }
    # Rollout behaviour follows the primary; paused and status-like fields do not.
    for key in ("strategy", "minReadySeconds", "revisionHistoryLimit", "progressDeadlineSeconds"):
        if key in spec:
            canary_spec[key] = copy.deepcopy(spec[key])
    out_meta: dict[str, Any] = {
        "name": canary_name(metadata["name"]),
        "namespace": metadata.get("namespace"),
        "labels": labels,
        "annotations": {ANNOTATION_REVISION: revision},
    }
    owners = owner_reference(primary)
    if owners:
        out_meta["ownerReferences"] = owners
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": out_meta,
        "spec": canary_spec,
    }


def canary_service(primary: Mapping[str, Any], *, spec: CanarySpec) -> dict[str, Any]:
    """The Service that selects canary pods, which the routes send the canary's share to."""
    metadata = primary["metadata"]
    selector = (primary.get("spec") or {}).get("selector") or {}
    svc = spec.service
    port: dict[str, Any] = {
        "name": svc.port_name,
        "port": svc.port,
        "targetPort": svc.target_port if svc.target_port is not None else svc.port,
        "protocol": "TCP",
    }
    if svc.app_protocol:
        port["appProtocol"] = svc.app_protocol
    out_meta: dict[str, Any] = {
        "name": canary_name(metadata["name"]),
        "namespace": metadata.get("namespace"),
        "labels": _object_labels(metadata.get("labels")),
    }
    owners = owner_reference(primary)
    if owners:
        out_meta["ownerReferences"] = owners
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": out_meta,
        "spec": {
            "type": "ClusterIP",
            "selector": canary_selector(selector)["matchLabels"],
            "ports": [port],
        },
    }


def canary_hpa(primary: Mapping[str, Any], *, primary_hpa: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the primary's HPA that scales the canary Deployment instead."""
    metadata = primary["metadata"]
    hpa_spec: dict[str, Any] = copy.deepcopy(dict(primary_hpa.get("spec") or {}))
    target = dict(hpa_spec.get("scaleTargetRef") or {})
    target.update(
        {"apiVersion": "apps/v1", "kind": "Deployment", "name": canary_name(metadata["name"])}
    )
    hpa_spec["scaleTargetRef"] = target
    out_meta: dict[str, Any] = {
        "name": canary_name(metadata["name"]),
        "namespace": metadata.get("namespace"),
        "labels": _object_labels((primary_hpa.get("metadata") or {}).get("labels")),
    }
    owners = owner_reference(primary)
    if owners:
        out_meta["ownerReferences"] = owners
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": out_meta,
        "spec": hpa_spec,
    }
