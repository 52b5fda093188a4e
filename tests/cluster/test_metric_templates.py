"""MetricTemplates on a real control plane, against a Prometheus that requires basic auth and TLS.

A second real Prometheus scrapes the session's Istio-shaped exporter with a ``--web.config.file``
that requires HTTP basic auth (a bcrypt hash) and serves TLS with a certificate from
``certs.issue`` (a CA of its own, for 127.0.0.1). A release's metrics name MetricTemplates (the
chart's CRD) through ``templateRef`` with ``templateVariables``: one in the app's namespace, one in
another namespace, each with a Secret beside it holding ``username``, ``password`` and ``ca.crt``.
The analyzer (a process with the chart's ServiceAccount and RBAC) reads the templates through its
watch cache and each Secret with one GET per TTL (the audit log counts them), queries the secured
server and promotes. A template that is missing, or whose Secret the chart does not let the
analyzer read (``analyzer.secretNames``), halts with a message that says which and rolls back;
the release is never promoted.

Every wait is on a condition (a phase, events, a series in Prometheus), never a fixed sleep.
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from certs.issue import issue
from tests.seed import IMAGE_NEW, IMAGE_STABLE
from tests.support import secrets
from tests.support.chart import NAMESPACE, render
from tests.support.controlplane import ControlPlane
from tests.support.install import APPLIED_KINDS, Identity, apply, kubeconfig_for
from tests.support.prometheus import PrometheusServer, WebConfig
from tests.support.release import Perch, Release

GROUP, VERSION, PLURAL = "perch.dev", "v1alpha1", "metrictemplates"
USER, PASSWORD = "perch-analyzer", "metric-template-password-7f3a"
SECRET = "prom-auth"  # the name analyzer.secretNames grants below

ERROR_RATE = """\
100 * sum(rate(istio_requests_total{reporter="destination",
  destination_workload_namespace="{{ namespace }}", destination_workload="{{ target }}",
  response_code=~"{{ variables.codes }}"}[{{ interval }}]))
/ sum(rate(istio_requests_total{reporter="destination",
  destination_workload_namespace="{{ namespace }}", destination_workload="{{ target }}"}
  [{{ interval }}]))
"""
LATENCY = """\
histogram_quantile({{ variables.quantile }}, sum(rate(istio_request_duration_seconds_bucket{
  reporter="destination", destination_workload_namespace="{{ namespace }}",
  destination_workload="{{ target }}"}[{{ interval }}])) by (le)) * 1000
"""


@dataclass
class Secured:
    server: PrometheusServer
    ca: bytes

    def secret(self) -> dict[str, str]:
        def b64(value: bytes) -> str:
            return base64.b64encode(value).decode()

        return {
            "username": b64(USER.encode()),
            "password": b64(PASSWORD.encode()),
            "ca.crt": b64(self.ca),
        }

    def queries_answered(self) -> float:
        """How many /api/v1/query requests the server answered with 200 (its own counter)."""
        text = requests.get(
            f"{self.server.url}/metrics", timeout=10, **self.server.requests_args
        ).text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("prometheus_http_requests_total{")
            and 'handler="/api/v1/query"' in line
            and 'code="200"' in line
        )


@pytest.fixture(scope="module")
def secured(perch: Perch, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    tls = issue(
        service="prometheus", namespace="monitoring", ips=[ipaddress.ip_address("127.0.0.1")]
    )
    secrets.remember(PASSWORD)
    server = PrometheusServer(
        tmp_path_factory.mktemp("secured-prometheus"),
        scrape_interval="1s",
        web=WebConfig(users={USER: PASSWORD}, tls=tls),
    )
    server.scrape(f"127.0.0.1:{perch.exporter.port}").start()
    yield Secured(server, tls.ca_crt)
    server.stop()


def create_secret(api: client.ApiClient, namespace: str, name: str, data: dict[str, str]) -> None:
    client.CoreV1Api(api).create_namespaced_secret(
        namespace, {"metadata": {"name": name}, "data": data}
    )


def create_template(
    api: client.ApiClient, namespace: str, name: str, *, query: str, address: str, secret: str
) -> None:
    client.CustomObjectsApi(api).create_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "MetricTemplate",
            "metadata": {"name": name},
            "spec": {
                "provider": {
                    "type": "prometheus",
                    "address": address,
                    "secretRef": {"name": secret},
                },
                "query": query,
            },
        },
    )


def spec(metrics: str) -> str:
    return (
        "service:\n  port: 9898\n"
        "analysis:\n  interval: 1s\n  threshold: 2\n  maxWeight: 50\n  stepWeight: 25\n"
        f"  metrics:\n{metrics}"
    )


def secret_reads(plane: ControlPlane, identity: Identity, namespace: str) -> int:
    return sum(
        1
        for event in plane.audit_events()
        if (event.get("user") or {}).get("username") == identity.username
        and (event.get("objectRef") or {}).get("resource") == "secrets"
        and (event.get("objectRef") or {}).get("namespace") == namespace
        and event.get("stage") in (None, "ResponseComplete")
    )


def test_a_release_judged_by_metric_templates_behind_basic_auth_and_tls_is_promoted(
    release: Release, secured: Secured, other_namespace: str, plane: ControlPlane
) -> None:
    app, api = release, release.api
    # The app's own template (an error counter that is silent while there are no 5xx, hence
    # onNoData: pass) and the platform team's latency template in another namespace.
    for namespace in (app.namespace, other_namespace):
        create_secret(api, namespace, SECRET, secured.secret())
    create_template(
        api, app.namespace, "error-rate", query=ERROR_RATE, address=secured.server.url,
        secret=SECRET,
    )  # fmt: skip
    create_template(
        api, other_namespace, "latency", query=LATENCY, address=secured.server.url,
        secret=SECRET,
    )  # fmt: skip
    metrics = (
        "  - name: error-rate\n"
        "    templateRef: {name: error-rate}\n"
        "    templateVariables: {codes: '5..'}\n"
        "    thresholdRange: {max: 1}\n"
        "    interval: 5s\n"
        "    onNoData: pass\n"
        "  - name: latency\n"
        f"    templateRef: {{name: latency, namespace: {other_namespace}}}\n"
        "    templateVariables: {quantile: '0.99'}\n"
        "    thresholdRange: {max: 500}\n"
        "    interval: 5s\n"
    )
    app.flow("podinfo-canary")
    # The secured server scrapes the same exporter: wait until it has the canary's latency too.
    has_rate = (
        "sum(rate(istio_request_duration_seconds_bucket{destination_workload_namespace="
        f'"{app.namespace}",destination_workload="podinfo-canary"}}[5s]))'
    )
    app.wait_for(lambda: secured.server.query(has_rate), "the secured Prometheus to have a rate")
    app.create(spec(metrics))
    app.watch_weights()
    app.release(IMAGE_NEW)
    answered = secured.queries_answered()
    app.start_analyzer(namespaces=(other_namespace,))
    app.wait_phase("Succeeded", "Failed")
    events = app.wait_events(f"Promotion completed! Scaling down podinfo-canary.{app.namespace}")
    assert app.phase() == "Succeeded", events
    assert not [e for e in events if e.startswith("Halt")], events
    assert app.image() == IMAGE_NEW
    assert [w for w in app.weights_seen if w[1]] == [(75, 25), (50, 50)]
    # Both metrics were judged on the secured server, at least once per judged step each.
    assert secured.queries_answered() >= answered + 4
    if plane.audit_log is not None:
        analyzer = app.perch.installed.analyzer
        # Each Secret was read once per TTL (30 s), not once per metric per tick.
        for namespace in (app.namespace, other_namespace):
            reads = secret_reads(plane, analyzer, namespace)
            assert 1 <= reads <= 2, (namespace, reads)
        # Templates come from the watch cache: listed and watched, never a GET. (A watch is
        # audited when it ends: the analyzer is stopped first.)
        app.analyzers[0].stop()

        def verbs() -> set[str]:
            return {
                str(event["verb"])
                for event in plane.audit_events()
                if (event.get("objectRef") or {}).get("resource") == PLURAL
                and (event.get("user") or {}).get("username") == analyzer.username
            }

        app.wait_for(lambda: "watch" in verbs(), "the template watch in the audit log", deadline=30)
        assert verbs() == {"list", "watch"}


@dataclass(frozen=True)
class Narrow:
    identity: Identity


@pytest.fixture(scope="module")
def narrow(
    perch: Perch, api: client.ApiClient, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Narrow]:
    """The analyzer's RBAC as the chart renders it with ``analyzer.secretNames: [prom-auth]``,
    bound to a ServiceAccount of its own (so the session's identities stay as the chart makes
    them for test_least_privilege.py)."""
    release = render(
        {"analyzer": {"mode": "deployment", "secretNames": [SECRET]}},
        namespace=NAMESPACE,
        name="narrow",
    )
    objects = [
        o
        for o in release.objects
        if o["kind"] in APPLIED_KINDS
        and o["kind"] not in ("CustomResourceDefinition", "Namespace")
        and (o["metadata"].get("labels") or {}).get("app.kubernetes.io/component") == "analyzer"
    ]
    (sa,) = [o for o in objects if o["kind"] == "ServiceAccount"]
    apply(api, objects)
    identity = kubeconfig_for(
        api,
        perch.plane.kubeconfig,
        service_account=sa["metadata"]["name"],
        namespace=NAMESPACE,
        out=Path(tmp_path_factory.mktemp("narrow")) / "kubeconfig",
    )
    yield Narrow(identity)
    rbac = client.RbacAuthorizationV1Api(api)
    for obj in objects:
        name, kind = obj["metadata"]["name"], obj["kind"]
        try:
            if kind == "ClusterRole":
                rbac.delete_cluster_role(name)
            elif kind == "ClusterRoleBinding":
                rbac.delete_cluster_role_binding(name)
            elif kind == "Role":
                rbac.delete_namespaced_role(name, NAMESPACE)
            elif kind == "RoleBinding":
                rbac.delete_namespaced_role_binding(name, NAMESPACE)
            elif kind == "ServiceAccount":
                client.CoreV1Api(api).delete_namespaced_service_account(name, NAMESPACE)
        except ApiException as exc:
            if exc.status != 404:
                raise


@pytest.mark.parametrize("broken", ["missing-template", "secret-not-granted"])
def test_a_template_that_cannot_be_used_halts_saying_which_and_rolls_back(
    release: Release, secured: Secured, narrow: Narrow, broken: str
) -> None:
    app, api = release, release.api
    ns = app.namespace
    # The Secret exists and is right; only its name is not among analyzer.secretNames.
    create_secret(api, ns, "other-auth", secured.secret())
    create_template(
        api, ns, "error-rate", query=ERROR_RATE, address=secured.server.url, secret="other-auth"
    )
    ref = "nowhere" if broken == "missing-template" else "error-rate"
    metrics = (
        "  - name: error-rate\n"
        f"    templateRef: {{name: {ref}}}\n"
        "    templateVariables: {codes: '5..'}\n"
        "    thresholdRange: {max: 1}\n"
        "    interval: 5s\n"
        "    onNoData: pass\n"
    )
    if broken == "missing-template":
        halt = f"metric error-rate: MetricTemplate nowhere.{ns} not found"
    else:
        halt = (
            f"metric error-rate: cannot read Secret other-auth.{ns} of MetricTemplate "
            f"error-rate.{ns}: Kubernetes API answered 403 Forbidden: "
            f'secrets "other-auth" is forbidden: User '
            f'"{narrow.identity.username}" cannot get resource "secrets" in API group "" in the '
            f'namespace "{ns}" (the analyzer may read only the Secrets the chart names in '
            "analyzer.secretNames)"
        )
    app.create(spec(metrics))
    app.watch_primary()
    app.release(IMAGE_NEW)
    app.start_analyzer(env={"KUBECONFIG": str(narrow.identity.kubeconfig)})
    app.wait_phase("Failed", "Succeeded", "Promoting")
    events = app.wait_events(f"Canary failed! Scaling down podinfo-canary.{ns}")
    assert app.phase() == "Failed", events
    target = f"podinfo.{ns}"
    halts = [e for e in events if e.startswith(f"Halt {target} advancement")]
    assert halts == [f"Halt {target} advancement {halt}"] * 2, events
    assert f"Rolling back {target} failed checks threshold reached 2" in events
    # Never promoted: the primary only ever ran the stable revision.
    assert not [e for e in events if e.startswith("Copying")]
    assert app.image() == IMAGE_STABLE
    assert len(app.primary_revisions_seen) == 1, app.primary_revisions_seen
