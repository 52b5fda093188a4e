"""The AdmissionReview wire format: what is refused as malformed and how answers look."""

from __future__ import annotations

import base64
import json
import re

import pytest

from tests.seed import admission_review, podinfo
from webhook.admission import parse_review, pointer, response_review
from webhook.contract import MalformedReview


def test_parses_update():
    req = parse_review(
        admission_review(operation="UPDATE", obj=podinfo(), old=podinfo(), dry_run=True)
    )
    assert (req.operation, req.namespace, req.name, req.dry_run) == (
        "UPDATE",
        "test",
        "podinfo",
        True,
    )
    assert req.is_deployment
    assert req.username == "kubernetes-admin"


def _without(path: str) -> dict:
    body = admission_review(operation="UPDATE", obj=podinfo(), old=podinfo())
    *parents, last = path.split(".")
    target = body
    for p in parents:
        target = target[p]
    del target[last]
    return body


def _with(path: str, value: object) -> dict:
    body = admission_review(operation="UPDATE", obj=podinfo(), old=podinfo())
    *parents, last = path.split(".")
    target = body
    for p in parents:
        target = target[p]
    target[last] = value
    return body


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        pytest.param([], "JSON object", id="array"),
        pytest.param("x", "JSON object", id="string"),
        pytest.param(
            _with("apiVersion", "admission.k8s.io/v1beta1"), "apiVersion must be", id="v1beta1"
        ),
        pytest.param(_with("kind", "Review"), "kind must be AdmissionReview", id="kind"),
        pytest.param(_without("request"), "request is missing", id="no-request"),
        pytest.param(_with("request", []), "request must be a JSON object", id="request-list"),
        pytest.param(_without("request.uid"), "request.uid is missing", id="no-uid"),
        pytest.param(_with("request.uid", ""), "request.uid is empty", id="empty-uid"),
        pytest.param(_with("request.uid", 7), "request.uid must be a string", id="uid-int"),
        pytest.param(_with("request.operation", "PATCH"), "request.operation must be", id="op"),
        pytest.param(_without("request.object"), "request.object is missing", id="no-object"),
        pytest.param(_without("request.oldObject"), "request.oldObject is missing", id="no-old"),
        pytest.param(
            _with("request.object", {"spec": {}}), "request.object.metadata", id="no-meta"
        ),
        pytest.param(
            _with("request.dryRun", "yes"), "request.dryRun must be a boolean", id="dryrun"
        ),
        pytest.param(_without("request.kind"), "request.kind is missing", id="no-kind"),
    ],
)
def test_malformed_reviews_name_the_field(body, fragment):
    with pytest.raises(MalformedReview, match=fragment):
        parse_review(body)


def test_response_carries_base64_jsonpatch_and_warnings():
    patch = [
        {
            "op": "add",
            "path": pointer("metadata", "annotations", "perch.dev/revision"),
            "value": "v1-x",
        }
    ]
    out = response_review(uid="u1", allowed=True, patch=patch, warnings=["w" * 400])
    resp = out["response"]
    assert out["apiVersion"] == "admission.k8s.io/v1" and out["kind"] == "AdmissionReview"
    assert resp["patchType"] == "JSONPatch"
    assert json.loads(base64.b64decode(resp["patch"])) == patch
    assert (
        resp["patch"]
        and "/metadata/annotations/perch.dev~1revision" in base64.b64decode(resp["patch"]).decode()
    )
    assert len(resp["warnings"][0]) <= 256


def test_denial_has_status_message():
    out = response_review(uid="u1", allowed=False, message="perch: no")
    assert out["response"]["allowed"] is False
    assert out["response"]["status"] == {"code": 403, "reason": "Forbidden", "message": "perch: no"}
    assert "patch" not in out["response"]


def test_pointer_escapes():
    assert pointer("a/b", "c~d") == "/a~1b/c~0d"


@pytest.mark.parametrize(
    ("where", "value", "named"),
    [
        (("metadata", "annotations"), ["a", "b"], "request.object.metadata.annotations must be"),
        (("metadata", "labels"), {"app": 1}, "request.object.metadata.labels['app'] must be"),
        (("spec",), [], "request.object.spec must be"),
        (("spec", "template"), [[]], "request.object.spec.template must be"),
        (
            ("spec", "template", "metadata", "annotations"),
            "x",
            "request.object.spec.template.metadata.annotations must be",
        ),
        # Found by the fuzz suite: the canary's Service is built from the containers' ports.
        (
            ("spec", "template", "spec", "containers", 0, "ports"),
            True,
            "request.object.spec.template.spec.containers[0].ports must be",
        ),
        (
            ("spec", "template", "spec", "containers", 0, "ports", 0),
            "http",
            "request.object.spec.template.spec.containers[0].ports[0] must be",
        ),
        (
            ("spec", "template", "spec", "containers"),
            {"name": "x"},
            "request.object.spec.template.spec.containers must be",
        ),
        (("spec", "replicas"), "2", "request.object.spec.replicas must be"),
        (
            ("spec", "selector", "matchLabels"),
            {"app": None},
            "request.object.spec.selector.matchLabels['app'] must be",
        ),
    ],
)
def test_an_object_of_the_wrong_shape_is_malformed_naming_the_path(where, value, named):
    body = admission_review(operation="UPDATE", obj=podinfo(), old=podinfo())
    target = body["request"]["object"]
    for key in where[:-1]:
        target = target[key] if isinstance(key, int) else target.setdefault(key, {})
    target[where[-1]] = value
    with pytest.raises(MalformedReview, match=re.escape(named)):
        parse_review(body)
