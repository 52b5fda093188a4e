"""The revision of a Deployment: a versioned hash of its pod template.

The hash is taken over canonical JSON (sorted keys) of the template with empty values and
server-filled defaults removed, so that the same template reads the same whether it comes from a
client manifest, from the API server after defaulting, or from another serialiser. Client model
objects are never hashed: their field sets change between client versions.

The version prefix ("v1-") lets a later normalisation change without two schemes being compared.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from perch.names import RESTARTED_AT_ANNOTATION

REVISION_SCHEME = "v1"
_DIGEST_CHARS = 16

# Values the API server fills in when a field is left out. Dropping them when they hold their
# default makes a defaulted template hash like the manifest it came from.
_POD_DEFAULTS: Mapping[str, Any] = {
    "restartPolicy": "Always",
    "terminationGracePeriodSeconds": 30,
    "dnsPolicy": "ClusterFirst",
    "schedulerName": "default-scheduler",
    "enableServiceLinks": True,
}
_CONTAINER_DEFAULTS: Mapping[str, Any] = {
    "terminationMessagePath": "/dev/termination-log",
    "terminationMessagePolicy": "File",
}
_PROBE_DEFAULTS: Mapping[str, Any] = {
    "timeoutSeconds": 1,
    "periodSeconds": 10,
    "successThreshold": 1,
    "failureThreshold": 3,
}
_PORT_DEFAULTS: Mapping[str, Any] = {"protocol": "TCP"}
_CONTAINER_LISTS = ("initContainers", "containers", "ephemeralContainers")
_PROBES = ("livenessProbe", "readinessProbe", "startupProbe")
# Annotations on the template that do not make a new release.
_VOLATILE_TEMPLATE_ANNOTATIONS = frozenset({RESTARTED_AT_ANNOTATION})


def _drop_defaults(obj: dict[str, Any], defaults: Mapping[str, Any]) -> None:
    for key, default in defaults.items():
        if key in obj and obj[key] == default:
            del obj[key]


def _default_pull_policy(image: str) -> str:
    # The API server's rule: no tag or ":latest" pulls always, anything else (a tag or a digest)
    # only when missing.
    if "@" in image:
        return "IfNotPresent"
    last = image.rsplit("/", 1)[-1]
    if ":" not in last or last.endswith(":latest"):
        return "Always"
    return "IfNotPresent"


def _normalise_container(container: dict[str, Any]) -> None:
    _drop_defaults(container, _CONTAINER_DEFAULTS)
    image = container.get("image")
    if isinstance(image, str) and container.get("imagePullPolicy") == _default_pull_policy(image):
        del container["imagePullPolicy"]
    for probe in _PROBES:
        value = container.get(probe)
        if isinstance(value, dict):
            _drop_defaults(value, _PROBE_DEFAULTS)
            http_get = value.get("httpGet")
            if isinstance(http_get, dict) and http_get.get("scheme") == "HTTP":
                del http_get["scheme"]
    for port in container.get("ports") or ():
        if isinstance(port, dict):
            _drop_defaults(port, _PORT_DEFAULTS)


def _prune_empty(value: Any) -> Any:
    """Remove None, empty strings, empty mappings and empty lists, bottom-up."""
    if isinstance(value, dict):
        pruned = {k: _prune_empty(v) for k, v in value.items()}
        return {k: v for k, v in pruned.items() if v not in (None, "", {}, [])}
    if isinstance(value, list):
        return [_prune_empty(v) for v in value]
    return value


def normalise_template(template: Mapping[str, Any]) -> dict[str, Any]:
    """The pod template reduced to what defines a release."""
    tpl: dict[str, Any] = copy.deepcopy(dict(template))
    metadata = tpl.get("metadata")
    if isinstance(metadata, dict):
        metadata.pop("creationTimestamp", None)
        annotations = metadata.get("annotations")
        if isinstance(annotations, dict):
            for key in _VOLATILE_TEMPLATE_ANNOTATIONS:
                annotations.pop(key, None)
    spec = tpl.get("spec")
    if isinstance(spec, dict):
        _drop_defaults(spec, _POD_DEFAULTS)
        if spec.get("securityContext") == {}:
            del spec["securityContext"]
        for list_name in _CONTAINER_LISTS:
            for container in spec.get(list_name) or ():
                if isinstance(container, dict):
                    _normalise_container(container)
    pruned: dict[str, Any] = _prune_empty(tpl)
    return pruned


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def template_revision(template: Mapping[str, Any]) -> str:
    """E.g. "v1-3f9c2a0b1d7e4c55"."""
    digest = hashlib.sha256(canonical_json(normalise_template(template)).encode()).hexdigest()
    return f"{REVISION_SCHEME}-{digest[:_DIGEST_CHARS]}"


def _restarted_at(template: Mapping[str, Any]) -> str | None:
    metadata = template.get("metadata") or {}
    annotations = metadata.get("annotations") or {}
    value = annotations.get(RESTARTED_AT_ANNOTATION)
    return value if isinstance(value, str) else None


def is_restart_only(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """True when the only change is the stamp `kubectl rollout restart` puts on the template."""
    return _restarted_at(old) != _restarted_at(new) and template_revision(old) == template_revision(
        new
    )
