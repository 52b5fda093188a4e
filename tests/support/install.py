"""Perch installed into a real API server the way the chart installs it, minus the pods.

The chart is rendered (tests/support/chart.py) and its CRDs, namespace, ServiceAccounts and RBAC
are applied server-side. The webhook and the analyzer then run here as processes, each with a
kubeconfig holding a token of its own ServiceAccount from the TokenRequest API: the real
authorizer judges every call they make with the chart's rules, and the audit log names them.

The mesh's CRDs (Istio's VirtualService and DestinationRule, Gateway API's HTTPRoute) come from
tests/schemas, so the API server validates the routes Perch writes against the real schemas.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.support import secrets
from tests.support.chart import NAMESPACE, RELEASE, Release, render
from tests.validation import SCHEMAS
from webhook.registration import registration

MESH_CRDS = (
    "istio-1.30.3-virtualservices.networking.istio.io.yaml",
    "istio-1.30.3-destinationrules.networking.istio.io.yaml",
    "gateway-api-v1.6.1-standard-gateway.networking.k8s.io_httproutes.yaml",
)
FIELD_MANAGER = "perch-tests"
TOKEN_SECONDS = 24 * 3600
ESTABLISHED_DEADLINE = 60.0
# The kinds the chart renders that the tests apply: identity, permissions, schema. Deployments,
# Services, Jobs and the webhook configuration are not (no pods run; the tests run processes).
APPLIED_KINDS = {
    "Namespace": ("", "v1", "namespaces", False),
    "CustomResourceDefinition": ("apiextensions.k8s.io", "v1", "customresourcedefinitions", False),
    "ServiceAccount": ("", "v1", "serviceaccounts", True),
    "ClusterRole": ("rbac.authorization.k8s.io", "v1", "clusterroles", False),
    "ClusterRoleBinding": ("rbac.authorization.k8s.io", "v1", "clusterrolebindings", False),
    "Role": ("rbac.authorization.k8s.io", "v1", "roles", True),
    "RoleBinding": ("rbac.authorization.k8s.io", "v1", "rolebindings", True),
}


@dataclass(frozen=True)
class Identity:
    service_account: str
    namespace: str
    kubeconfig: Path

    @property
    def username(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.service_account}"


@dataclass(frozen=True)
class Installed:
    release: Release
    webhook: Identity
    analyzer: Identity


def _path(kind: str, namespace: str | None, name: str) -> str:
    group, version, plural, namespaced = APPLIED_KINDS[kind]
    base = f"/api/{version}" if not group else f"/apis/{group}/{version}"
    if namespaced:
        base += f"/namespaces/{namespace}"
    return f"{base}/{plural}/{name}"


def apply(api: client.ApiClient, objects: Iterable[Mapping[str, Any]]) -> None:
    """Server-side apply, as `kubectl apply --server-side --force-conflicts` does."""
    for obj in objects:
        meta = obj["metadata"]
        path = _path(obj["kind"], meta.get("namespace") or NAMESPACE, meta["name"])
        api.call_api(
            "PATCH",
            f"{api.configuration.host}{path}?fieldManager={FIELD_MANAGER}&force=true",
            header_params={"Content-Type": "application/apply-patch+yaml"},
            body=json.dumps(obj),
            _request_timeout=30,
        ).read()


def mesh_crds() -> list[dict[str, Any]]:
    return [yaml.safe_load((SCHEMAS / name).read_text()) for name in MESH_CRDS]


def wait_established(api: client.ApiClient, names: Iterable[str]) -> None:
    ext = client.ApiextensionsV1Api(api)
    for name in names:
        deadline = time.monotonic() + ESTABLISHED_DEADLINE
        while True:
            conditions = ext.read_custom_resource_definition(name).status.conditions or []
            if any(c.type == "Established" and c.status == "True" for c in conditions):
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"CRD {name} not Established after {ESTABLISHED_DEADLINE}s")
            time.sleep(0.1)


def warm(api: client.ApiClient) -> None:
    """The first write of each custom kind after its CRD is installed can take the API server
    seconds (storage and validators are built then), longer than the webhook's 2 s API timeout.
    Write each once, so that the first test meets a warm server like every later one."""
    ns = f"warm-{uuid.uuid4().hex[:6]}"
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    core.create_namespace({"metadata": {"name": ns}})
    meta = {"name": "warm", "namespace": ns}
    for group, version, plural, kind, spec in (
        ("perch.dev", "v1alpha1", "canaries", "Canary", {"targetRef": {"name": "warm"}}),
        ("networking.istio.io", "v1", "virtualservices", "VirtualService", {"hosts": ["warm"]}),
        (
            "gateway.networking.k8s.io",
            "v1",
            "httproutes",
            "HTTPRoute",
            {"rules": [{"backendRefs": [{"name": "warm", "port": 80}]}]},
        ),
    ):
        obj = {"apiVersion": f"{group}/{version}", "kind": kind, "metadata": meta, "spec": spec}
        custom.create_namespaced_custom_object(group, version, ns, plural, obj, _request_timeout=60)
    core.delete_namespace(ns)


def kubeconfig_for(
    api: client.ApiClient,
    admin_kubeconfig: Path,
    *,
    service_account: str,
    namespace: str,
    out: Path,
) -> Identity:
    """A kubeconfig that authenticates as the ServiceAccount, with a TokenRequest token."""
    core = client.CoreV1Api(api)
    answer = core.create_namespaced_service_account_token(
        service_account,
        namespace,
        {"spec": {"expirationSeconds": TOKEN_SECONDS, "audiences": []}},
    )
    admin = yaml.safe_load(admin_kubeconfig.read_text())
    cluster = admin["clusters"][0]["cluster"]
    server = {"server": cluster["server"]}
    if cluster.get("certificate-authority-data"):
        server["certificate-authority-data"] = cluster["certificate-authority-data"]
    elif cluster.get("certificate-authority"):
        ca = Path(cluster["certificate-authority"]).read_bytes()
        server["certificate-authority-data"] = base64.b64encode(ca).decode()
    user = f"{namespace}-{service_account}"
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": server}],
        "users": [{"name": user, "user": {"token": answer.status.token}}],
        "contexts": [{"name": user, "context": {"cluster": "test", "user": user}}],
        "current-context": user,
    }
    out.write_text(yaml.safe_dump(config))
    secrets.remember(answer.status.token)
    return Identity(service_account, namespace, out)


def install(
    api: client.ApiClient,
    *,
    admin_kubeconfig: Path,
    directory: Path,
    values: Mapping[str, Any] | None = None,
) -> Installed:
    release = render(values or {}, namespace=NAMESPACE, name=RELEASE)
    crds = [o for o in release.objects if o["kind"] == "CustomResourceDefinition"] + mesh_crds()
    apply(api, crds)
    wait_established(api, [c["metadata"]["name"] for c in crds])
    try:
        client.CoreV1Api(api).create_namespace({"metadata": {"name": release.namespace}})
    except ApiException as exc:
        if exc.status != 409:
            raise
    apply(
        api,
        [
            o
            for o in release.objects
            if o["kind"] in APPLIED_KINDS and o["kind"] not in ("CustomResourceDefinition",)
        ],
    )
    warm(api)
    accounts = {o["metadata"]["name"] for o in release.find("ServiceAccount")}
    webhook_sa = f"{RELEASE}-webhook"
    analyzer_sa = f"{RELEASE}-analyzer" if f"{RELEASE}-analyzer" in accounts else webhook_sa
    assert webhook_sa in accounts, f"the chart renders no ServiceAccount {webhook_sa}: {accounts}"
    return Installed(
        release=release,
        webhook=kubeconfig_for(
            api,
            admin_kubeconfig,
            service_account=webhook_sa,
            namespace=release.namespace,
            out=directory / "webhook.kubeconfig",
        ),
        analyzer=kubeconfig_for(
            api,
            admin_kubeconfig,
            service_account=analyzer_sa,
            namespace=release.namespace,
            out=directory / "analyzer.kubeconfig",
        ),
    )


REGISTERED_DEADLINE = 60.0


def register_webhook(
    api: client.ApiClient,
    *,
    namespace: str,
    host: str,
    port: int,
    ca: Path,
    name: str,
    timeout_seconds: int = 10,
) -> dict[str, Any]:
    """Perch's MutatingWebhookConfiguration as the chart makes it, pointed by URL at a
    perch-webhook on this host (the API server runs here too), created and returned. The API
    server takes it up asynchronously: :func:`wait_registered` waits for that."""
    config = registration(
        namespace=namespace,
        url=f"https://{host}:{port}/mutate",
        ca_bundle=base64.b64encode(ca.read_bytes()).decode(),
        name=name,
        timeout_seconds=timeout_seconds,
    )
    client.AdmissionregistrationV1Api(api).create_mutating_webhook_configuration(config)
    return config


def opted_in_deployment(name: str) -> dict[str, Any]:
    """An opted-in Deployment whose spec does not parse: Perch denies it, and only Perch."""
    return {
        "metadata": {
            "name": name,
            "annotations": {"perch.dev/enabled": "true", "perch.dev/spec": "analysis: [1"},
        },
        "spec": {
            "selector": {"matchLabels": {"app": "probe"}},
            "template": {
                "metadata": {"labels": {"app": "probe"}},
                "spec": {"containers": [{"name": "c", "image": "probe"}]},
            },
        },
    }


def wait_registered(api: client.ApiClient) -> None:
    """The API server picks up a new webhook configuration asynchronously: wait until it calls
    Perch (an opted-in Deployment with an invalid spec is then denied), instead of sleeping."""
    probe = opted_in_deployment("registration-probe")  # its spec is invalid
    apps = client.AppsV1Api(api)
    deadline = time.monotonic() + REGISTERED_DEADLINE
    while True:
        try:
            apps.create_namespaced_deployment("default", probe, dry_run="All")
        except ApiException as exc:
            if exc.status == 403 and "perch" in (exc.body or ""):
                return
            raise
        if time.monotonic() > deadline:
            raise AssertionError("the API server never called the registered webhook")
        time.sleep(0.2)
