"""Server-side apply's field ownership: who applied a field, and what an applier's configuration is.

Helm 4, Argo CD and Flux apply with server-side apply under a field manager of their own and,
by default, without forcing conflicts. A field written by anyone else (an Update) then conflicts
with their next apply of a different value. So when Perch writes into a Deployment what such a
tool applied (the promotion copies the release the tool sent into the primary), it writes it as
that tool: a server-side apply under the tool's manager, of the tool's own configuration
extracted from the object (as client-go's ``Extract<Kind>`` does) with the new template in it. The
tool keeps owning what it applied, and its next release applies without a conflict.

Pure: functions of an object's JSON. The fieldsV1 format is structured-merge-diff's: ``f:<name>``
a field, ``k:<json>`` a list item by its keys, ``v:<json>`` a set member, ``i:<n>`` an item by
index, ``.`` the container itself.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any


def applier_of(obj: Mapping[str, Any], *path: str) -> str | None:
    """The field manager that last server-side applied the field at `path` (e.g. "spec",
    "template"), or None when no applier owns it (it was created or updated otherwise)."""
    found: tuple[str, str] | None = None
    for entry in (obj.get("metadata") or {}).get("managedFields") or ():
        if entry.get("operation") != "Apply" or entry.get("subresource"):
            continue
        fields = entry.get("fieldsV1") or {}
        for name in path:
            fields = fields.get(f"f:{name}")
            if not isinstance(fields, dict):
                break
        else:
            when = str(entry.get("time") or "")
            if found is None or when >= found[1]:
                found = (str(entry.get("manager") or ""), when)
    return found[0] if found and found[0] else None


def applied_configuration(obj: Mapping[str, Any], manager: str) -> dict[str, Any]:
    """What `manager` applied, with the object's current values: its apply configuration."""
    for entry in (obj.get("metadata") or {}).get("managedFields") or ():
        if (
            entry.get("manager") == manager
            and entry.get("operation") == "Apply"
            and not entry.get("subresource")
        ):
            picked = _pick(obj, entry.get("fieldsV1") or {})
            config = picked if isinstance(picked, dict) else {}
            break
    else:
        config = {}
    meta = obj.get("metadata") or {}
    config["apiVersion"] = obj.get("apiVersion")
    config["kind"] = obj.get("kind")
    config.setdefault("metadata", {})
    config["metadata"]["name"] = meta.get("name")
    if meta.get("namespace"):
        config["metadata"]["namespace"] = meta.get("namespace")
    return config


def _pick(value: Any, fields: Mapping[str, Any]) -> Any:
    members = {k: v for k, v in fields.items() if k != "."}
    if not members:
        return value  # a leaf, or an atomic map or list: all of it
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, sub in members.items():
            if key.startswith("f:") and key[2:] in value:
                out[key[2:]] = _pick(value[key[2:]], sub or {})
        return out
    if isinstance(value, list):
        # In the object's order: an applied list's order is the order it is stored in.
        keyed = [(json.loads(k[2:]), sub) for k, sub in members.items() if k.startswith("k:")]
        sets = [json.loads(k[2:]) for k in members if k.startswith("v:")]
        indexed = {int(k[2:]): sub for k, sub in members.items() if k.startswith("i:")}
        items: list[Any] = []
        for index, item in enumerate(value):
            if index in indexed:
                items.append(_pick(item, indexed[index] or {}))
            elif item in sets:
                items.append(item)
            elif isinstance(item, Mapping):
                for keys, sub in keyed:
                    if all(item.get(k) == v for k, v in keys.items()):
                        picked = _pick(item, sub or {})
                        # The keys identify the item: an apply configuration always has them.
                        items.append({**keys, **(picked if isinstance(picked, dict) else {})})
                        break
        return items
    return value
