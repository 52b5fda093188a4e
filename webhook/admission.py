"""The AdmissionReview wire format (admission.k8s.io/v1): parsing requests, building responses.

Pure. Anything that is not a usable AdmissionReview raises MalformedReview with a reason that names
the field, which the HTTP shell returns as a 400.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypedDict, cast

from perch.names import json_pointer
from webhook.contract import MalformedReview

API_VERSION = "admission.k8s.io/v1"
KIND = "AdmissionReview"
Operation = Literal["CREATE", "UPDATE", "DELETE", "CONNECT"]
_OPERATIONS = ("CREATE", "UPDATE", "DELETE", "CONNECT")
# The API server truncates long warnings; keep each within what kubectl prints on one line or two.
MAX_WARNING_CHARS = 256


class PatchOp(TypedDict, total=False):
    op: Literal["add", "remove", "replace", "test"]
    path: str
    value: Any


@dataclass(frozen=True, slots=True)
class GroupVersionKind:
    group: str
    version: str
    kind: str


@dataclass(frozen=True, slots=True)
class AdmissionRequest:
    uid: str
    kind: GroupVersionKind
    operation: Operation
    namespace: str
    name: str
    object: Mapping[str, Any] | None
    old_object: Mapping[str, Any] | None
    dry_run: bool
    username: str

    @property
    def is_deployment(self) -> bool:
        return self.kind == GroupVersionKind("apps", "v1", "Deployment")


def _field(
    obj: Mapping[str, Any], key: str, path: str, kind: type, *, required: bool = True
) -> Any:
    value = obj.get(key)
    if value is None:
        if required:
            raise MalformedReview(f"{path}{key} is missing")
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise MalformedReview(f"{path}{key} must be a {_KIND_NAMES.get(kind, kind.__name__)}")
    return value


_KIND_NAMES = {dict: "JSON object", str: "string", bool: "boolean", int: "integer", list: "list"}


def _check_shape(obj: Mapping[str, Any], label: str) -> None:
    """The parts of an object the decision reads have the types Kubernetes gives them; anything
    else is a malformed review named by its path, not an error deep in the decision."""
    metadata = obj.get("metadata")
    if not isinstance(metadata, dict):
        raise MalformedReview(f"{label}.metadata must be a JSON object")
    _check_string_map(metadata, f"{label}.metadata")
    spec = _field(obj, "spec", f"{label}.", dict, required=False)
    if spec is None:
        return
    _field(spec, "replicas", f"{label}.spec.", int, required=False)
    selector = _field(spec, "selector", f"{label}.spec.", dict, required=False)
    if selector is not None:
        labels = _field(selector, "matchLabels", f"{label}.spec.selector.", dict, required=False)
        _check_strings(labels or {}, f"{label}.spec.selector.matchLabels")
    template = _field(spec, "template", f"{label}.spec.", dict, required=False)
    if template is None:
        return
    where = f"{label}.spec.template."
    template_meta = _field(template, "metadata", where, dict, required=False)
    if template_meta is not None:
        _check_string_map(template_meta, f"{where}metadata")
    pod = _field(template, "spec", where, dict, required=False)
    if pod is not None:
        _check_containers(pod, f"{where}spec.")


def _check_containers(pod: Mapping[str, Any], path: str) -> None:
    """Containers and their ports: what the canary's Deployment and Service are built from."""
    for key in ("containers", "initContainers"):
        for i, container in enumerate(_field(pod, key, path, list, required=False) or []):
            where = f"{path}{key}[{i}]"
            if not isinstance(container, dict):
                raise MalformedReview(f"{where} must be a JSON object")
            _field(container, "name", f"{where}.", str, required=False)
            _field(container, "image", f"{where}.", str, required=False)
            for j, port in enumerate(
                _field(container, "ports", f"{where}.", list, required=False) or []
            ):
                if not isinstance(port, dict):
                    raise MalformedReview(f"{where}.ports[{j}] must be a JSON object")
                _field(port, "containerPort", f"{where}.ports[{j}].", int, required=False)
                _field(port, "name", f"{where}.ports[{j}].", str, required=False)
                _field(port, "protocol", f"{where}.ports[{j}].", str, required=False)


def _check_string_map(metadata: Mapping[str, Any], path: str) -> None:
    for key in ("annotations", "labels"):
        value = _field(metadata, key, f"{path}.", dict, required=False)
        _check_strings(value or {}, f"{path}.{key}")


def _check_strings(values: Mapping[str, Any], path: str) -> None:
    for name, item in values.items():
        if not isinstance(item, str):
            raise MalformedReview(f"{path}[{name!r}] must be a string")


def parse_review(body: object) -> AdmissionRequest:
    if not isinstance(body, Mapping):
        raise MalformedReview("the body must be a JSON object (an AdmissionReview)")
    if body.get("apiVersion") != API_VERSION:
        raise MalformedReview(f"apiVersion must be {API_VERSION}, got {body.get('apiVersion')!r}")
    if body.get("kind") != KIND:
        raise MalformedReview(f"kind must be {KIND}, got {body.get('kind')!r}")
    req = _field(body, "request", "", dict)
    uid = _field(req, "uid", "request.", str)
    if not uid:
        raise MalformedReview("request.uid is empty")
    kind = _field(req, "kind", "request.", dict)
    gvk = GroupVersionKind(
        group=_field(kind, "group", "request.kind.", str, required=False) or "",
        version=_field(kind, "version", "request.kind.", str),
        kind=_field(kind, "kind", "request.kind.", str),
    )
    operation = _field(req, "operation", "request.", str)
    if operation not in _OPERATIONS:
        raise MalformedReview(f"request.operation must be one of {', '.join(_OPERATIONS)}")
    obj = _field(req, "object", "request.", dict, required=operation in ("CREATE", "UPDATE"))
    old = _field(req, "oldObject", "request.", dict, required=operation == "UPDATE")
    for label, value in (("request.object", obj), ("request.oldObject", old)):
        if value is not None:
            _check_shape(value, label)
    user = _field(req, "userInfo", "request.", dict, required=False) or {}
    return AdmissionRequest(
        uid=uid,
        kind=gvk,
        operation=cast(Operation, operation),
        namespace=_field(req, "namespace", "request.", str, required=False) or "",
        name=_field(req, "name", "request.", str, required=False)
        or ((obj or old or {}).get("metadata") or {}).get("name", ""),
        object=obj,
        old_object=old,
        dry_run=bool(_field(req, "dryRun", "request.", bool, required=False)),
        username=str(user.get("username") or ""),
    )


def request_uid(body: object) -> str | None:
    """The request uid when it can be read, so that even a failed review can be answered."""
    if isinstance(body, Mapping):
        req = body.get("request")
        if isinstance(req, Mapping) and isinstance(req.get("uid"), str) and req["uid"]:
            return str(req["uid"])
    return None


def response_review(
    *,
    uid: str,
    allowed: bool,
    patch: Sequence[PatchOp] = (),
    warnings: Sequence[str] = (),
    message: str = "",
    code: int = 403,
) -> dict[str, Any]:
    response: dict[str, Any] = {"uid": uid, "allowed": allowed}
    if patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(
            json.dumps(list(patch), separators=(",", ":")).encode()
        ).decode()
    if warnings:
        response["warnings"] = [_clip(w) for w in warnings]
    if not allowed:
        response["status"] = {
            "code": code,
            "reason": "Forbidden" if code == 403 else "",
            "message": message,
        }
    return {"apiVersion": API_VERSION, "kind": KIND, "response": response}


def _clip(text: str) -> str:
    return text if len(text) <= MAX_WARNING_CHARS else text[: MAX_WARNING_CHARS - 1] + "…"


# JSON Pointers for patch paths; shared with the analyzer through the core.
pointer = json_pointer
