"""The Helm chart rendered with the embedded Helm engine, and RBAC read back out of it.

- `render()` renders `charts/perch` as `helm install` (or `helm upgrade`) would, offline, and returns
  every object: the templates' and the CRDs'.
- `RecordingClient` wraps a `kubernetes` ApiClient and records every request it sends as a `Use`
  (API group, resource, RBAC verb, namespace, name), classified by the same rules as the API
  stand-in's own log, so a component's permissions can be derived from what its code really does.
- `Access` answers, for one ServiceAccount, which Roles and ClusterRoles its bindings grant, where.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import helm_python
import yaml
from kubernetes import client

from tests.standin import _route, _verb

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "perch"
RELEASE = "perch"
NAMESPACE = "perch"
HOOK = "helm.sh/hook"

JSON = dict[str, Any]


@functools.cache
def _loaded(path: str) -> helm_python.Chart:
    return helm_python.Chart.load(path)


def load_chart(path: Path = CHART) -> helm_python.Chart:
    return _loaded(str(path))


@dataclasses.dataclass(frozen=True)
class Release:
    manifests: Mapping[str, str]  # template path → rendered text
    objects: tuple[JSON, ...]  # templates' objects, then the CRDs'
    notes: str
    namespace: str
    name: str
    values: Mapping[str, Any]  # the chart's defaults merged with the values given

    def find(self, kind: str, name: str | None = None) -> list[JSON]:
        return [
            o
            for o in self.objects
            if o["kind"] == kind and name in (None, o["metadata"].get("name"))
        ]

    def one(self, kind: str, name: str | None = None) -> JSON:
        found = self.find(kind, name)
        assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
        return found[0]

    def workloads(self) -> Iterator[tuple[JSON, JSON]]:
        """(owner object, pod spec) of every Deployment, Job and CronJob."""
        for obj in self.objects:
            if obj["kind"] in ("Deployment", "Job"):
                yield obj, obj["spec"]["template"]["spec"]
            elif obj["kind"] == "CronJob":
                yield obj, obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]

    def containers(self) -> Iterator[tuple[JSON, JSON, JSON]]:
        """(owner, pod spec, container) of every container, init containers included."""
        for owner, pod in self.workloads():
            for container in [*pod.get("initContainers", []), *pod["containers"]]:
                yield owner, pod, container

    def pod_running(self, container_name: str) -> tuple[JSON, JSON]:
        """(owner, pod spec) of the one long-running pod that has this container."""
        found = [
            (owner, pod)
            for owner, pod in self.workloads()
            if owner["kind"] == "Deployment"
            and any(c["name"] == container_name for c in pod["containers"])
        ]
        assert len(found) == 1, f"{len(found)} Deployments run a container {container_name!r}"
        return found[0]

    def hooks(self) -> list[JSON]:
        return [o for o in self.objects if HOOK in (o["metadata"].get("annotations") or {})]


def render(
    values: Mapping[str, Any] | None = None,
    *,
    namespace: str = NAMESPACE,
    name: str = RELEASE,
    upgrade: bool = False,
    chart_dir: Path = CHART,
) -> Release:
    chart = load_chart(chart_dir)
    manifests = chart.render(
        dict(values or {}),
        name=name,
        namespace=namespace,
        is_install=not upgrade,
        is_upgrade=upgrade,
    )
    objects: list[JSON] = []
    notes = ""
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        objects += [doc for doc in yaml.safe_load_all(text) if doc]
    for crd in chart.crds:
        objects += [doc for doc in yaml.safe_load_all(crd["data"]) if doc]
    merged = chart.merge_values(dict(values or {}))
    return Release(manifests, tuple(objects), notes, namespace, name, merged)


def values_error(values: Mapping[str, Any], *, chart_dir: Path = CHART) -> str:
    """The message Helm gives for values the chart refuses (schema or template check)."""
    try:
        load_chart(chart_dir).render(dict(values), name=RELEASE, namespace=NAMESPACE)
    except helm_python.HelmError as exc:
        return str(exc)
    raise AssertionError(f"the chart accepted {dict(values)!r}")


# --- what the code requests -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, order=True)
class Use:
    """One request, as RBAC sees it."""

    group: str
    resource: str  # plural, or plural/subresource
    verb: str
    namespace: str | None
    name: str | None

    @property
    def permission(self) -> tuple[str, str, str]:
        return self.group, self.resource, self.verb


def classify(method: str, url: str) -> Use | None:
    """The RBAC view of one request; None for non-resource URLs (/version/, discovery)."""
    parts = urlsplit(url)
    route = _route(parts.path)
    if route is None:
        return None
    group, _version, namespace, plural, name, sub = route
    verb = _verb(method.upper(), name, dict(parse_qsl(parts.query)))
    return Use(group, f"{plural}/{sub}" if sub else plural, verb, namespace, name)


class RecordingClient:
    """Records every request sent through the ApiClients it wraps."""

    def __init__(self, label: str) -> None:
        self.label = label
        self._lock = threading.Lock()
        self.uses: list[Use] = []
        self.non_resource: list[str] = []

    def wrap(self, api_client: client.ApiClient) -> client.ApiClient:
        # Every typed API, the raw Kube helper and the watch stream call ApiClient.call_api.
        send = api_client.call_api

        def call_api(method: str, url: str, *args: Any, **kwargs: Any) -> Any:
            use = classify(method, url)
            with self._lock:
                if use is None:
                    self.non_resource.append(urlsplit(url).path)
                else:
                    self.uses.append(use)
            return send(method, url, *args, **kwargs)

        api_client.call_api = call_api  # type: ignore[method-assign]
        return api_client

    def permissions(self) -> set[tuple[str, str, str]]:
        with self._lock:
            return {u.permission for u in self.uses}


# --- what the chart grants ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Grant:
    group: str
    resource: str
    verb: str
    scope: str  # a namespace, or "*" for the whole cluster
    names: frozenset[str] | None  # resourceNames, None when the rule has none
    source: str  # "ClusterRole perch-webhook", for messages

    @property
    def permission(self) -> tuple[str, str, str]:
        return self.group, self.resource, self.verb

    def allows(self, use: Use) -> bool:
        if use.permission != self.permission:
            return False
        if self.scope != "*" and use.namespace != self.scope:
            return False
        # RBAC cannot limit create, list or watch by name: a named rule never grants them.
        return self.names is None or (use.name is not None and use.name in self.names)


class Access:
    """What the bindings in a release grant one ServiceAccount."""

    def __init__(self, release: Release, *, service_account: str, namespace: str) -> None:
        self.grants: list[Grant] = []
        roles = {
            (o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o
            for o in release.objects
            if o["kind"] in ("Role", "ClusterRole")
        }
        for binding in release.objects:
            if binding["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
                continue
            subject = {"kind": "ServiceAccount", "name": service_account, "namespace": namespace}
            if not any(
                {k: s.get(k) for k in subject} == subject for s in binding.get("subjects") or []
            ):
                continue
            ref = binding["roleRef"]
            where = binding["metadata"].get("namespace")
            role_ns = where if ref["kind"] == "Role" else None
            role = roles.get((ref["kind"], role_ns, ref["name"]))
            assert role is not None, f"{binding['kind']} {ref['name']} refers to a missing role"
            scope = "*" if binding["kind"] == "ClusterRoleBinding" else where
            for rule in role.get("rules") or []:
                assert "nonResourceURLs" not in rule, rule
                names = rule.get("resourceNames")
                for group in rule["apiGroups"]:
                    for resource in rule["resources"]:
                        for verb in rule["verbs"]:
                            self.grants.append(
                                Grant(
                                    group,
                                    resource,
                                    verb,
                                    scope,
                                    frozenset(names) if names else None,
                                    f"{ref['kind']} {ref['name']} ({binding['kind']} "
                                    f"{binding['metadata']['name']})",
                                )
                            )

    def allows(self, use: Use) -> bool:
        return any(g.allows(use) for g in self.grants)

    def permissions(self) -> set[tuple[str, str, str]]:
        return {g.permission for g in self.grants}
