"""A second mutating webhook for the cluster tier: a policy engine that edits pod templates.

Served with ``perch-webhook --app tests.support.template_mutator:create_app``, it plays what
Kyverno or Gatekeeper's mutation do to a Deployment: it stamps the pod template with the
annotation ``MUTATOR_ANNOTATION`` (value ``MUTATOR_VALUE``) when it is missing, and answers with no
patch when it is there already, so that it is consistent and converges under reinvocation.

``registration_for`` builds its MutatingWebhookConfiguration, scoped to one namespace, so that
the other tests of a session never meet it. Its configuration name decides where it runs relative
to Perch: the API server calls configurations in name order.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any

from flask import Flask

from webhook.app import create_app as create_webhook_app
from webhook.contract import AdmitResult, MalformedReview

MUTATOR_ANNOTATION = "policy.example.com/checked"
MUTATOR_VALUE = "true"
_POINTER_KEY = MUTATOR_ANNOTATION.replace("~", "~0").replace("/", "~1")


def template_patch(obj: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The JSONPatch that stamps the pod template; empty when it is stamped already."""
    template = (obj.get("spec") or {}).get("template") or {}
    metadata = template.get("metadata")
    annotations = (metadata or {}).get("annotations")
    if isinstance(annotations, Mapping) and annotations.get(MUTATOR_ANNOTATION) == MUTATOR_VALUE:
        return []
    if metadata is None:
        return [
            {
                "op": "add",
                "path": "/spec/template/metadata",
                "value": {"annotations": {MUTATOR_ANNOTATION: MUTATOR_VALUE}},
            }
        ]
    if annotations is None:
        return [
            {
                "op": "add",
                "path": "/spec/template/metadata/annotations",
                "value": {MUTATOR_ANNOTATION: MUTATOR_VALUE},
            }
        ]
    return [
        {
            "op": "add",
            "path": f"/spec/template/metadata/annotations/{_POINTER_KEY}",
            "value": MUTATOR_VALUE,
        }
    ]


class TemplateMutator:
    def admit(self, body: Mapping[str, Any]) -> AdmitResult:
        request = body.get("request")
        if not isinstance(request, Mapping):
            raise MalformedReview("request is missing")
        uid = request.get("uid")
        if not isinstance(uid, str) or not uid:
            raise MalformedReview("request.uid is missing")
        obj = request.get("object")
        response: dict[str, Any] = {"uid": uid, "allowed": True}
        ops = template_patch(obj) if isinstance(obj, Mapping) else []
        if ops:
            response["patchType"] = "JSONPatch"
            response["patch"] = base64.b64encode(json.dumps(ops).encode()).decode()
        review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}
        return AdmitResult(
            review={**review, "response": response},
            decision="mutated" if ops else "unchanged",
        )

    def ready(self) -> bool:
        return True


def create_app() -> Flask:
    return create_webhook_app(TemplateMutator())


def registration_for(*, name: str, url: str, ca_bundle: str, namespace: str) -> dict[str, Any]:
    """The mutator's MutatingWebhookConfiguration: Deployments of `namespace` only."""
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [
            {
                "name": "templates.policy.example.com",
                "admissionReviewVersions": ["v1"],
                "clientConfig": {"url": url, "caBundle": ca_bundle},
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
                    "matchLabels": {"kubernetes.io/metadata.name": namespace},
                },
                "sideEffects": "None",
                "reinvocationPolicy": "IfNeeded",
                "failurePolicy": "Fail",
                "timeoutSeconds": 10,
            }
        ],
    }
