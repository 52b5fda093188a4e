"""Schema validation of every object Perch produces.

Built-in kinds go through kubernetes-validate (strict: unknown fields fail). Custom kinds go through
jsonschema against the CRDs: Istio and Gateway API from tests/schemas (copied verbatim, see its README), the Canary from the chart.
`additionalProperties: false` is added below the root because the API server silently prunes
unknown fields, which would hide a typo in a builder.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parents[1]
SCHEMAS = REPO / "tests" / "schemas"
CANARY_CRD = REPO / "charts" / "perch" / "crds" / "canaries.perch.dev.yaml"
KUBERNETES_VERSION = "1.30.0"


def _closed(schema: Any, *, root: bool) -> Any:
    if isinstance(schema, list):
        return [_closed(s, root=False) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {
        k: _closed(v, root=False) if k not in ("enum", "default", "example") else v
        for k, v in schema.items()
    }
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.get("nullable"):
        t = out.get("type")
        if isinstance(t, str):
            out["type"] = [t, "null"]
    if (
        not root
        and out.get("type") == "object"
        and "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def _crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    # The Canary's and every other CRD the chart ships (AlertProvider, ...).
    files = [*sorted(SCHEMAS.glob("*.yaml")), *sorted(CANARY_CRD.parent.glob("*.yaml"))]
    schemas: dict[tuple[str, str], dict[str, Any]] = {}
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            group = doc["spec"]["group"]
            kind = doc["spec"]["names"]["kind"]
            for version in doc["spec"]["versions"]:
                raw = version["schema"]["openAPIV3Schema"]
                schemas[(f"{group}/{version['name']}", kind)] = _closed(
                    copy.deepcopy(raw), root=True
                )
    return schemas


def crd_kinds() -> set[tuple[str, str]]:
    return set(_crd_schemas())


def validate(obj: dict[str, Any]) -> None:
    """Raise AssertionError naming the object and the problem when `obj` is not valid."""
    key = (obj.get("apiVersion", ""), obj.get("kind", ""))
    meta = obj.get("metadata", {})
    name = f"{key[1]} {meta.get('namespace', '')}/{meta.get('name', '')}"
    schema = _crd_schemas().get(key)
    if schema is not None:
        try:
            jsonschema.validate(obj, schema)
        except jsonschema.ValidationError as err:
            path = ".".join(str(p) for p in err.absolute_path)
            raise AssertionError(f"{name} is invalid at {path}: {err.message}") from None
        _check_metadata(obj, name)
        return
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        path = ".".join(str(p) for p in err.path)
        raise AssertionError(f"{name} is invalid at {path}: {err.message}") from None


def _check_metadata(obj: dict[str, Any], name: str) -> None:
    # The CRD schemas leave metadata open; check it against the core ObjectMeta schema by wrapping
    # it in a ConfigMap, which has no other required fields.
    wrapper = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj.get("metadata", {})}
    try:
        kubernetes_validate.validate(wrapper, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        raise AssertionError(f"{name} has invalid metadata: {err.message}") from None
