"""The spec's JSON Schema, exported from the models: ``make schema`` writes docs/spec.schema.json.

The schema is for editors and CI linters (e.g. yaml-language-server, check-jsonschema) and for
the reference in the README, whose table of spec fields a unit test holds against
:func:`field_paths`. It says what each field is, its type, bounds, pattern and default; it cannot
say what depends on other fields (stepWeight at most maxWeight, what a router can express), which
only :func:`perch.spec.parse_spec` checks. Every spec that parse_spec accepts is valid against it.

Run ``python -m perch.spec.schema`` to print it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from pydantic.json_schema import GenerateJsonSchema

from perch.names import ANNOTATION_SPEC
from perch.spec.models import SpecDocument

__all__ = ["field_paths", "json_schema", "schema_text"]

_DIALECT = "https://json-schema.org/draft/2020-12/schema"


class _Generator(GenerateJsonSchema):
    def field_title_should_be_set(self, schema: Any) -> bool:
        return False  # the field's name says it


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the ``perch.dev/spec`` document (as a dict)."""
    generated = SpecDocument.model_json_schema(schema_generator=_Generator)
    schema: dict[str, Any] = {
        "$schema": _DIALECT,
        "title": ANNOTATION_SPEC,
        **{key: value for key, value in generated.items() if key != "title"},
    }
    return _tidy(schema)


def schema_text() -> str:
    """The schema as docs/spec.schema.json holds it."""
    return json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"


def _tidy(schema: dict[str, Any]) -> dict[str, Any]:
    """Pydantic's output made readable: definitions named after the document's sections rather
    than the model classes, no generated titles, and null allowed where it means "absent"."""
    renamed = {name: name.removesuffix("Model") for name in schema.get("$defs", {})}

    def walk(node: Any) -> Any:
        if isinstance(node, list):
            return [walk(item) for item in node]
        if not isinstance(node, dict):
            return node
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key == "$ref":
                out[key] = "#/$defs/" + renamed[value.removeprefix("#/$defs/")]
            elif key == "$defs":
                out[key] = {renamed[name]: walk(item) for name, item in value.items()}
            elif key == "properties":
                out[key] = {name: walk(item) for name, item in value.items()}
            elif key == "title" and not isinstance(value, dict):
                continue
            else:
                out[key] = walk(value)
        if "properties" in out:
            required = set(out.get("required", ()))
            for name, prop in out["properties"].items():
                if name not in required:
                    out["properties"][name] = _nullable(prop)
        return out

    return dict(walk(schema))


def _nullable(prop: dict[str, Any]) -> dict[str, Any]:
    # A field that is null counts as absent (as in Kubernetes objects), so the schema takes null
    # wherever the field may be left out; pydantic's "default": null says nothing more.
    if prop.get("default", ...) is None:
        prop = {key: value for key, value in prop.items() if key != "default"}
    if "anyOf" in prop:
        if {"type": "null"} not in prop["anyOf"]:
            prop = {**prop, "anyOf": [*prop["anyOf"], {"type": "null"}]}
        return prop
    if "$ref" in prop:
        ref = {"$ref": prop["$ref"]}
        rest = {key: value for key, value in prop.items() if key != "$ref"}
        return {"anyOf": [ref, {"type": "null"}], **rest}
    if isinstance(prop.get("type"), str):
        prop = {**prop, "type": [prop["type"], "null"]}
        if "enum" in prop:
            prop["enum"] = [*prop["enum"], None]
    return prop


def field_paths(schema: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Every field of the document by its path (``analysis.metrics.thresholdRange.min``; items of
    lists are not marked), with its schema. Deprecated fields (Flagger's early form) are listed
    but not entered: ``canaryAnalysis`` has the fields of ``analysis``."""
    schema = json_schema() if schema is None else schema
    return dict(_paths(schema, schema, ""))


def _paths(
    root: dict[str, Any], node: dict[str, Any], prefix: str
) -> Iterator[tuple[str, dict[str, Any]]]:
    for name, prop in node.get("properties", {}).items():
        path = f"{prefix}.{name}" if prefix else name
        yield path, prop
        if prop.get("deprecated"):
            continue
        target = _resolve(root, prop)
        if target.get("type") == "array" or "array" in target.get("type", ()):
            target = _resolve(root, target.get("items", {}))
        yield from _paths(root, target, path)


def _resolve(root: dict[str, Any], prop: dict[str, Any]) -> dict[str, Any]:
    """The object schema behind a property: through $ref, and past the null of an anyOf."""
    if "anyOf" in prop:
        options = [option for option in prop["anyOf"] if option != {"type": "null"}]
        if len(options) == 1:
            prop = options[0]
    if "$ref" in prop:
        resolved: dict[str, Any] = root["$defs"][prop["$ref"].removeprefix("#/$defs/")]
        return resolved
    return prop


if __name__ == "__main__":
    print(schema_text(), end="")
