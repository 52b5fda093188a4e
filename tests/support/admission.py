"""Helpers for admission tests on a real control plane (tests/cluster/test_admission.py).

- ``kubectl``: run kubectl in a Release's namespace and keep stderr, where kubectl prints the
  admission warnings ("Warning: perch: …") and the API server's denials.
- ``admission_counts``: the webhook's own request counter, by decision, from its /metrics.
- ``snapshot``: the resourceVersion of every object in a namespace (Events aside), to show that a
  request changed nothing.
- ``denying_policy``: a ValidatingAdmissionPolicy and its binding, the admission plugin that runs
  after every mutating webhook, waited for until the API server enforces it.
- ``ObjectLog``: a watch that records every ADDED/MODIFIED/DELETED of one kind in a namespace, so a
  test sees objects that existed only for a moment.
- ``MutatorServer``/``registered_mutator``: a second mutating webhook (tests/support/
  template_mutator.py) registered by URL under a chosen configuration name.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException
from prometheus_client.parser import text_string_to_metric_families

from tests.support.controlplane import ControlPlane
from tests.support.kubelet import wait_for
from tests.support.release import Release, rolled_out
from tests.support.template_mutator import MUTATOR_ANNOTATION, registration_for
from tests.support.webhook_server import Server, start_server

MUTATOR_APP = "tests.support.template_mutator:create_app"
REQUESTS_METRIC = "perch_webhook_requests_total"
# Kinds whose objects the controllers keep writing on their own clock: never a sign of a request.
_NOISY = {"events", "events.events.k8s.io"}
# Bound for the API server to pick up a new admission configuration; a deadline, not a measure.
REGISTERED_DEADLINE = 60.0


def kubectl(
    release: Release, *args: str, input: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    return release.perch.plane.kubectl("-n", release.namespace, *args, input=input, check=check)


def warnings_of(done: subprocess.CompletedProcess[str]) -> list[str]:
    """The admission warnings kubectl printed, without its "Warning: " prefix."""
    return [
        line.removeprefix("Warning: ")
        for line in done.stderr.splitlines()
        if line.startswith("Warning: ")
    ]


def admission_counts(server: Server) -> dict[str, float]:
    """How many AdmissionReviews the webhook answered, by decision (all workers summed)."""
    answer = server.get("/metrics")
    answer.raise_for_status()
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            if sample.name == REQUESTS_METRIC:
                decision = sample.labels.get("decision", "")
                counts[decision] = counts.get(decision, 0.0) + sample.value
    return counts


def total(counts: dict[str, float]) -> float:
    return sum(counts.values())


# --- the namespace's objects ----------------------------------------------------------------

_listable: dict[Path, list[str]] = {}


def _namespaced_kinds(plane: ControlPlane) -> list[str]:
    if plane.kubeconfig not in _listable:
        names = plane.kubectl(
            "api-resources", "--namespaced=true", "--verbs=list", "-o", "name"
        ).stdout.split()
        _listable[plane.kubeconfig] = [n for n in names if n not in _NOISY]
    return _listable[plane.kubeconfig]


def snapshot(plane: ControlPlane, namespace: str) -> dict[tuple[str, str], str]:
    """(kind, name) -> resourceVersion of every object in the namespace but Events."""
    listed = json.loads(
        plane.kubectl(
            "get", "-n", namespace, ",".join(_namespaced_kinds(plane)), "-o", "json"
        ).stdout
    )
    return {
        (item["kind"], item["metadata"]["name"]): item["metadata"]["resourceVersion"]
        for item in listed["items"]
    }


def settled(dep: dict[str, Any] | None) -> bool:
    """Rolled out, and the Deployment controller has written its final conditions: from here on
    nothing writes the object until someone changes it."""
    if dep is None or not rolled_out(dep):
        return False
    conditions = {c["type"]: c for c in (dep.get("status") or {}).get("conditions") or []}
    progressing = conditions.get("Progressing") or {}
    available = conditions.get("Available") or {}
    return progressing.get("reason") == "NewReplicaSetAvailable" and (
        available.get("status") == "True"
    )


def wait_settled(release: Release, name: str | None = None, *, deadline: float = 60.0) -> None:
    wait_for(
        lambda: settled(release.deployment(name)),
        what=f"Deployment {name or release.name} to roll out and settle",
        deadline=deadline,
    )


# --- a validating admission policy ------------------------------------------------------------


@contextlib.contextmanager
def denying_policy(
    api: client.ApiClient,
    *,
    name: str,
    namespace: str,
    label: str,
    message: str,
) -> Iterator[None]:
    """Deployments of `namespace` carrying `label` are refused by a ValidatingAdmissionPolicy.

    The binding leaves out objects labelled app.kubernetes.io/managed-by=perch: the canary
    Deployment copies the primary's labels, and the policy is about what the user sends.
    """
    adm = client.AdmissionregistrationV1Api(api)
    adm.create_validating_admission_policy(
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicy",
            "metadata": {"name": name},
            "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": {
                    "resourceRules": [
                        {
                            "apiGroups": ["apps"],
                            "apiVersions": ["v1"],
                            "operations": ["CREATE", "UPDATE"],
                            "resources": ["deployments"],
                        }
                    ]
                },
                "validations": [
                    {
                        "expression": (
                            "!has(object.metadata.labels) || "
                            f"!('{label}' in object.metadata.labels)"
                        ),
                        "message": message,
                    }
                ],
            },
        }
    )
    adm.create_validating_admission_policy_binding(
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": {"name": name},
            "spec": {
                "policyName": name,
                "validationActions": ["Deny"],
                "matchResources": {
                    "namespaceSelector": {
                        "matchLabels": {"kubernetes.io/metadata.name": namespace}
                    },
                    "objectSelector": {
                        "matchExpressions": [
                            {
                                "key": "app.kubernetes.io/managed-by",
                                "operator": "NotIn",
                                "values": ["perch"],
                            }
                        ]
                    },
                },
            },
        }
    )
    try:
        _wait_enforced(api, namespace=namespace, label=label, message=message)
        yield
    finally:
        with contextlib.suppress(ApiException):
            adm.delete_validating_admission_policy_binding(name)
        with contextlib.suppress(ApiException):
            adm.delete_validating_admission_policy(name)


def _probe(name: str, labels: dict[str, str]) -> dict[str, Any]:
    """A Deployment no webhook of Perch's cares about (not opted in), for dry-run probes."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "c", "image": "probe:1"}]},
            },
        },
    }


def _wait_enforced(api: client.ApiClient, *, namespace: str, label: str, message: str) -> None:
    """The API server loads policies asynchronously: wait until a dry-run is refused."""
    apps = client.AppsV1Api(api)

    def refused() -> bool:
        try:
            apps.create_namespaced_deployment(
                namespace, _probe("policy-probe", {label: "true"}), dry_run="All"
            )
        except ApiException as exc:
            if message in (exc.body or ""):
                return True
            raise
        return False

    wait_for(refused, what="the ValidatingAdmissionPolicy to be enforced", deadline=60)


# --- watching a kind --------------------------------------------------------------------------


@dataclass
class ObjectLog:
    """Every change to objects of one custom kind in a namespace, from a watch started first."""

    api: client.ApiClient
    namespace: str
    group: str
    version: str
    plural: str
    events: list[tuple[str, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _ready: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> ObjectLog:
        threading.Thread(target=self._run, daemon=True, name=f"log-{self.plural}").start()
        if not self._ready.wait(30):
            raise AssertionError(f"the watch on {self.plural} did not start")
        return self

    def stop(self) -> None:
        self._stop.set()

    def seen(self) -> list[tuple[str, str]]:
        with self._lock:
            return list(self.events)

    def _run(self) -> None:
        custom = client.CustomObjectsApi(self.api)
        args = (self.group, self.version, self.namespace, self.plural)
        rv = custom.list_namespaced_custom_object(*args)["metadata"]["resourceVersion"]
        self._ready.set()
        while not self._stop.is_set():
            try:
                for event in watch.Watch().stream(
                    custom.list_namespaced_custom_object,
                    *args,
                    resource_version=rv,
                    timeout_seconds=5,
                ):
                    obj = event["object"]
                    rv = obj["metadata"]["resourceVersion"]
                    with self._lock:
                        self.events.append((event["type"], obj["metadata"]["name"]))
                    if self._stop.is_set():
                        return
            except Exception:
                time.sleep(0.1)


# --- a second mutating webhook ----------------------------------------------------------------


@dataclass
class MutatorServer:
    server: Server

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.server.port}/mutate"

    @property
    def ca_bundle(self) -> str:
        return base64.b64encode(self.server.certs.ca.read_bytes()).decode()


def start_mutator(tmp: Path) -> MutatorServer:
    return MutatorServer(start_server(tmp, app=MUTATOR_APP, workers=1))


@contextlib.contextmanager
def registered_mutator(
    api: client.ApiClient, mutator: MutatorServer, *, name: str, namespace: str
) -> Iterator[None]:
    """The mutator registered under the configuration `name` for `namespace`'s Deployments."""
    adm = client.AdmissionregistrationV1Api(api)
    adm.create_mutating_webhook_configuration(
        registration_for(
            name=name, url=mutator.url, ca_bundle=mutator.ca_bundle, namespace=namespace
        )
    )
    apps = client.AppsV1Api(api)

    def stamps() -> bool:
        made = apps.create_namespaced_deployment(
            namespace, _probe("mutator-probe", {}), dry_run="All"
        )
        annotations = made.spec.template.metadata.annotations or {}
        return annotations.get(MUTATOR_ANNOTATION) is not None

    try:
        wait_for(stamps, what=f"the API server to call {name}", deadline=REGISTERED_DEADLINE)
        yield
    finally:
        with contextlib.suppress(ApiException):
            adm.delete_mutating_webhook_configuration(name)


def with_image(template: dict[str, Any], image: str) -> dict[str, Any]:
    changed = copy.deepcopy(template)
    changed["spec"]["containers"][0]["image"] = image
    return changed
