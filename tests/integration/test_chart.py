"""The Helm chart, rendered by the real Helm engine (helm-python-sdk embeds Helm's Go SDK).

For the default values and each option, every rendered object is validated (kubernetes-validate,
strict; cert-manager and ServiceMonitor objects, whose schemas are not available here, are checked
field by field), and what the chart says is checked against the code it runs:

- the MutatingWebhookConfiguration equals webhook/registration.py's, field by field;
- every container runs a console script of pyproject.toml with flags its own parser accepts;
- RBAC: the webhook's admission logic, the analyzer and perch-certs run against the API stand-in
  through recording clients; every request each makes must be granted by the rules the chart binds
  to its ServiceAccount, and every rule must be used by some request (no rule kept "just in case").
"""

from __future__ import annotations

import base64
import copy
import datetime
import json
import re
import shutil
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import helm_python
import jsonpatch
import kubernetes_validate
import pytest
import yaml
from kubernetes import client

import analyzer.__main__ as analyzer_cli
import certs.__main__ as certs_cli
from analyzer.alerts import AlertProviderResolver
from analyzer.cache import ROUTE_KINDS, WatchCache
from analyzer.leader import LeaseElector
from analyzer.metrics.base import ProviderSettings
from analyzer.metrics.prometheus import PrometheusProvider
from analyzer.metrics.resolver import TemplateResolver
from analyzer.notify import Notifications, notifiers_from_settings, providers_from_settings
from analyzer.service import Analyzer
from analyzer.telemetry import Telemetry
from certs.ensure import ensure
from certs.issue import CERT_FILE, KEY_FILE, issue, service_dns_names, write_files
from perch.resources import Kube
from perch.spec import parse_spec
from tests.seed import IMAGE_NEW, admission_review, podinfo
from tests.standin import StandIn
from tests.support.chart import (
    CHART,
    HOOK,
    NAMESPACE,
    REPO,
    Access,
    RecordingClient,
    Release,
    Use,
    load_chart,
    render,
    values_error,
)
from tests.support.mesh import DeploymentController
from tests.validation import KUBERNETES_VERSION, validate
from webhook import server as webhook_server
from webhook.handler import PerchAdmitter
from webhook.registration import CONFIGURATION_NAME, registration

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
CONSOLE_SCRIPTS = PYPROJECT["project"]["scripts"]
DASHBOARD = Path("dashboards") / "perch.json"
IMAGE_NEWER = "ghcr.io/stefanprodan/podinfo:6.7.2"

# Every option the chart has, alone, then all together.
VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "analyzer-deployment": {"analyzer": {"mode": "deployment"}},
    "analyzer-namespaces": {"analyzer": {"namespaces": ["team-a", "team-b"]}},
    "analyzer-secret-names": {"analyzer": {"secretNames": ["on-call-url", "teams.url"]}},
    "cert-manager": {"tls": {"certManager": {"enabled": True}}},
    "cert-manager-own-issuer": {
        "tls": {
            "certManager": {
                "enabled": True,
                "issuerRef": {"name": "corp-ca", "kind": "ClusterIssuer"},
            }
        }
    },
    "no-renewal-cronjob": {"tls": {"certsJob": {"renewal": {"enabled": False}}}},
    "network-policy": {
        "networkPolicy": {
            "enabled": True,
            "metricsFrom": [
                {
                    "namespaceSelector": {
                        "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}
                    }
                }
            ],
        }
    },
    "network-policy-analyzer-deployment": {
        "networkPolicy": {"enabled": True},
        "analyzer": {"mode": "deployment"},
    },
    "service-monitor": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
    "dashboard": {"dashboard": {"enabled": True, "namespace": "monitoring"}},
    "failure-policy-ignore": {"webhook": {"failurePolicy": "Ignore", "timeoutSeconds": 30}},
    "notifications-inline": {
        "notifications": {
            "slack": {"url": "https://hooks.slack.com/services/T0/B0/x", "channel": "#releases"},
            "generic": {"url": "https://audit.example.com/perch"},
            "alertProviders": {
                "on-call": {"type": "slack", "url": "https://hooks.slack.com/services/T0/B1/y"}
            },
        }
    },
    "notifications-existing-secrets": {
        "notifications": {
            "slack": {"existingSecret": {"name": "perch-slack", "key": "url"}},
            "generic": {"existingSecret": {"name": "perch-audit", "key": "url"}},
            "alertProvidersExistingSecret": {"name": "perch-alerts", "key": "providers.json"},
        }
    },
    "everything": {
        "logLevel": "debug",
        "image": {"webhook": {"digest": "sha256:" + "a" * 64}, "analyzer": {"tag": "0.1.0-rc1"}},
        "imagePullSecrets": [{"name": "registry"}],
        "webhook": {"replicas": 3, "failurePolicy": "Ignore", "timeoutSeconds": 10},
        "analyzer": {
            "mode": "deployment",
            "replicas": 3,
            "maxActive": 4,
            "namespaces": ["team-a"],
            "prometheus": {"url": "https://prometheus.monitoring:9090"},
        },
        "tls": {"certManager": {"enabled": True}},
        "networkPolicy": {"enabled": True},
        "serviceMonitor": {"enabled": True},
        "dashboard": {"enabled": True},
        "notifications": {"slack": {"url": "https://hooks.slack.com/services/T0/B0/x"}},
    },
}

# Kinds with no schema on this machine: checked field by field below.
STRUCTURAL_GROUPS = ("cert-manager.io/", "monitoring.coreos.com/")


@pytest.fixture(scope="module")
def chart_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The chart; while charts/perch/dashboards/perch.json is not written yet, a copy with a
    stand-in dashboard, so that the dashboard option is still rendered and checked."""
    if (CHART / DASHBOARD).is_file():
        return CHART
    copied = tmp_path_factory.mktemp("chart") / "perch"
    shutil.copytree(CHART, copied)
    (copied / DASHBOARD).parent.mkdir(parents=True, exist_ok=True)
    (copied / DASHBOARD).write_text(json.dumps({"title": "Perch (stand-in)", "panels": []}))
    return copied


def rendered(chart_dir: Path, name: str, **kwargs: Any) -> Release:
    return render(VALUE_SETS[name], chart_dir=chart_dir, **kwargs)


def merged(*parts: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
                out[key] = merged(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
    return out


# --- every object is valid ----------------------------------------------------------------------


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_rendered_object_is_valid(chart_dir: Path, name: str) -> None:
    release = rendered(chart_dir, name)
    seen: set[tuple[str, str | None, str]] = set()
    for obj in release.objects:
        meta = obj["metadata"]
        key = (obj["kind"], meta.get("namespace"), meta["name"])
        assert key not in seen, f"{key} rendered twice"
        seen.add(key)
        if obj["apiVersion"].startswith(STRUCTURAL_GROUPS):
            _check_metadata(obj)
        else:
            validate(obj)
        if obj["kind"] != "CustomResourceDefinition":
            labels = meta.get("labels") or {}
            assert labels.get("app.kubernetes.io/instance") == release.name, key
            assert labels.get("app.kubernetes.io/managed-by") == "Helm", key


def _check_metadata(obj: dict[str, Any]) -> None:
    wrapper = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]}
    kubernetes_validate.validate(wrapper, KUBERNETES_VERSION, strict=True)


def test_chart_metadata_and_crd_ship_as_they_are() -> None:
    meta = load_chart().metadata
    assert meta["apiVersion"] == "v2"
    assert meta["appVersion"] == PYPROJECT["project"]["version"] == "0.1.0"
    assert meta["kubeVersion"] == ">=1.28.0-0"  # matchConditions: beta in 1.28, GA in 1.30
    crds = load_chart().crds
    names = [c["name"] for c in crds]
    assert {"crds/canaries.perch.dev.yaml", "crds/alertproviders.perch.dev.yaml"} <= set(names)
    assert names == sorted(f"crds/{p.name}" for p in (CHART / "crds").glob("*.yaml"))
    for crd in crds:
        assert crd["data"] == (CHART / crd["name"]).read_text()


def test_no_certificate_or_key_is_committed_in_the_chart() -> None:
    for path in CHART.rglob("*"):
        if path.is_file():
            text = path.read_text(errors="replace")
            assert "-----BEGIN" not in text, f"{path} holds PEM material"
    release = render(VALUE_SETS["default"])
    assert not [s for s in release.find("Secret") if s.get("type") == "kubernetes.io/tls"]


# --- helm lint --strict, and values.schema.json -----------------------------------------------


@pytest.mark.parametrize("name", VALUE_SETS)
def test_helm_lint_strict_is_clean(chart_dir: Path, name: str) -> None:
    report = helm_python.lint(str(chart_dir), VALUE_SETS[name], strict=True)
    # Severity 1 is INFO ("icon is recommended"): helm lint --strict passes with it.
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


def test_helm_lint_reports_values_the_schema_refuses() -> None:
    report = helm_python.lint(str(CHART), {"webhook": {"failurePolicy": "Never"}}, strict=True)
    assert any("failurePolicy" in e for e in report["errors"]), report


@pytest.mark.parametrize(
    ("values", "where", "why"),
    [
        ({"webhook": {"failurePolicy": "Never"}}, "/webhook/failurePolicy", "'Fail', 'Ignore'"),
        ({"webhook": {"failurePolicy": "fail"}}, "/webhook/failurePolicy", "'Fail', 'Ignore'"),
        ({"webhook": {"timeoutSeconds": 0}}, "/webhook/timeoutSeconds", "minimum"),
        ({"webhook": {"timeoutSeconds": 31}}, "/webhook/timeoutSeconds", "maximum"),
        ({"webhook": {"timeoutSeconds": 2.5}}, "/webhook/timeoutSeconds", "want integer"),
        ({"webhook": {"replicas": "2"}}, "/webhook/replicas", "got string, want integer"),
        ({"webhook": {"replicas": 0}}, "/webhook/replicas", "minimum"),
        ({"analyzer": {"mode": "cronjob"}}, "/analyzer/mode", "'sidecar', 'deployment'"),
        ({"analyzer": {"maxActive": -1}}, "/analyzer/maxActive", "minimum"),
        ({"analyzer": {"prometheus": {"url": "prometheus:9090"}}}, "/analyzer/prometheus/url", ""),
        ({"analyzer": {"namespaces": ["Team_A"]}}, "/analyzer/namespaces/0", ""),
        ({"logLevel": "verbose"}, "/logLevel", "'debug'"),
        ({"webhook": {"resources": {"limits": {"cpu": "1"}}}}, "/webhook/resources/limits", ""),
        (
            {"notifications": {"slack": {"url": "hooks.slack.com/x"}}},
            "/notifications/slack/url",
            "",
        ),
        ({"tls": {"certManager": {"enabled": "yes"}}}, "/tls/certManager/enabled", "want boolean"),
        ({"webhook": {"failurePolicyy": "Fail"}}, "/webhook", "failurePolicyy"),
        ({"image": {"webhook": {"digest": "latest"}}}, "/image/webhook/digest", ""),
    ],
)
def test_schema_refuses_wrong_values_naming_them(
    values: dict[str, Any], where: str, why: str
) -> None:
    message = values_error(values)
    assert f"'{where}'" in message, message
    assert why in message, message


def test_schema_log_levels_are_the_ones_both_services_accept() -> None:
    schema = load_chart().schema
    assert schema is not None
    assert schema["properties"]["logLevel"]["enum"] == list(webhook_server._LOG_LEVELS)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"webhook": {"apiTimeoutSeconds": 5, "timeoutSeconds": 5}},
            "webhook.apiTimeoutSeconds (5) must be below webhook.timeoutSeconds (5)",
        ),
        (
            {
                "notifications": {
                    "slack": {"url": "https://x.example", "existingSecret": {"name": "s"}}
                }
            },
            "notifications.slack: set url or existingSecret.name, not both",
        ),
        (
            {
                "notifications": {
                    "generic": {"url": "https://x.example", "existingSecret": {"name": "s"}}
                }
            },
            "notifications.generic: set url or existingSecret.name, not both",
        ),
    ],
)
def test_contradictory_values_are_refused_with_a_message(
    values: dict[str, Any], message: str
) -> None:
    assert message in values_error(values)


# --- the webhook registration -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "namespace"),
    [
        ({}, NAMESPACE),
        (
            {"webhook": {"failurePolicy": "Ignore", "timeoutSeconds": 1, "apiTimeoutSeconds": 0.5}},
            "perch-system",
        ),
        ({"webhook": {"timeoutSeconds": 30, "apiTimeoutSeconds": 10}}, "kube-system"),
    ],
)
def test_webhook_configuration_is_what_registration_py_builds(
    values: dict[str, Any], namespace: str
) -> None:
    release = render(values, namespace=namespace)
    config = release.one("MutatingWebhookConfiguration")
    service = release.one("Service", f"{release.name}-webhook")
    webhook_values = release.values["webhook"]
    expected = registration(
        namespace=namespace,
        service=service["metadata"]["name"],
        failure_policy=webhook_values["failurePolicy"],
        timeout_seconds=webhook_values["timeoutSeconds"],
    )
    assert config["apiVersion"] == expected["apiVersion"]
    assert config["metadata"]["name"] == expected["metadata"]["name"] == CONFIGURATION_NAME
    assert len(config["webhooks"]) == len(expected["webhooks"]) == 1
    ours, theirs = config["webhooks"][0], expected["webhooks"][0]
    for field in sorted(set(ours) | set(theirs)):
        assert ours.get(field) == theirs.get(field), f"webhooks[0].{field} differs"
    # The API server reaches the pods through the Service: port 443 to the port the server binds.
    assert service["metadata"]["namespace"] == namespace
    (port,) = service["spec"]["ports"]
    assert (port["port"], port["targetPort"]) == (ours["clientConfig"]["service"]["port"], "https")
    _, pod = release.pod_running("webhook")
    assert _labels_match(service["spec"]["selector"], _pod_labels(release, "webhook"))
    webhook = _container(pod, "webhook")
    assert {"name": "https", "containerPort": 8443, "protocol": "TCP"} in webhook["ports"]
    assert "--bind=0.0.0.0:8443" in webhook["args"]


def test_webhook_configuration_carries_no_ca_bundle_and_is_not_a_hook() -> None:
    # A hook would outlive `helm uninstall` and keep blocking releases with failurePolicy Fail.
    for values in ({}, VALUE_SETS["cert-manager"]):
        config = render(values).one("MutatingWebhookConfiguration")
        assert HOOK not in (config["metadata"].get("annotations") or {})
        assert "caBundle" not in config["webhooks"][0]["clientConfig"]


# --- TLS ----------------------------------------------------------------------------------------


def test_tls_default_is_perch_certs_ensure_before_and_after_install_and_upgrade() -> None:
    install, upgrade = render({}), render({}, upgrade=True)
    config = install.one("MutatingWebhookConfiguration")["metadata"]["name"]
    secret = _mounted_tls_secret(install)
    for release, pre_injects in ((install, False), (upgrade, True)):
        jobs = {j["metadata"]["annotations"][HOOK]: j for j in release.find("Job")}
        assert set(jobs) == {"pre-install,pre-upgrade", "post-install,post-upgrade"}
        for events, job in jobs.items():
            args = _certs_args(job["spec"]["template"]["spec"])
            assert args.command == "ensure"
            assert args.secret == f"{release.namespace}/{secret}"
            assert args.service == f"{release.name}-webhook"
            assert args.namespace == release.namespace
            # Before install the configuration does not exist yet; after, it always does.
            injects = events.startswith("post") or pre_injects
            assert args.webhook_config == (config if injects else None), events
    # The hook's ServiceAccount and permissions exist before its Jobs run.
    hooks = install.hooks()
    job_weight = {
        int(j["metadata"]["annotations"]["helm.sh/hook-weight"]) for j in install.find("Job")
    }
    for obj in hooks:
        annotations = obj["metadata"]["annotations"]
        if obj["kind"] != "Job":
            assert int(annotations["helm.sh/hook-weight"]) < min(job_weight), obj["metadata"]
            assert set(annotations[HOOK].split(",")) == {
                "pre-install",
                "pre-upgrade",
                "post-install",
                "post-upgrade",
            }
        assert "before-hook-creation" in annotations["helm.sh/hook-delete-policy"]
    hook_sa = {o["metadata"]["name"] for o in hooks if o["kind"] == "ServiceAccount"}
    for job in install.find("Job"):
        assert job["spec"]["template"]["spec"]["serviceAccountName"] in hook_sa
    assert {o["kind"] for o in hooks} == {
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "ClusterRole",
        "ClusterRoleBinding",
        "Job",
    }
    # The renewal CronJob is a permanent object with permanent permissions of its own.
    cron = install.one("CronJob")
    args = _certs_args(cron["spec"]["jobTemplate"]["spec"]["template"]["spec"])
    assert (args.secret, args.webhook_config) == (f"{install.namespace}/{secret}", config)
    assert HOOK not in (cron["metadata"].get("annotations") or {})
    assert not render(VALUE_SETS["no-renewal-cronjob"]).find("CronJob")


@pytest.mark.parametrize("name", ["cert-manager", "cert-manager-own-issuer"])
def test_tls_by_cert_manager(name: str) -> None:
    release = render(VALUE_SETS[name])
    assert not release.find("Job") and not release.find("CronJob") and not release.hooks()
    certificate = release.one("Certificate")
    spec = certificate["spec"]
    assert set(spec) <= {
        "secretName",
        "commonName",
        "dnsNames",
        "duration",
        "renewBefore",
        "privateKey",
        "usages",
        "issuerRef",
    }, spec
    assert spec["secretName"] == _mounted_tls_secret(release)
    # The names perch-certs would put in the certificate: the Service, however it is addressed.
    service = f"{release.name}-webhook"
    assert spec["dnsNames"] == service_dns_names(service, release.namespace)
    assert spec["commonName"] in spec["dnsNames"]
    assert _go_duration(spec["renewBefore"]) < _go_duration(spec["duration"])
    assert set(spec["privateKey"]) <= {"algorithm", "size", "rotationPolicy", "encoding"}
    assert spec["privateKey"]["algorithm"] in ("RSA", "ECDSA", "Ed25519")
    assert set(spec["usages"]) <= {"server auth", "digital signature", "key encipherment"}
    assert "server auth" in spec["usages"]
    issuer_ref = spec["issuerRef"]
    if name == "cert-manager":
        issuer = release.one("Issuer")
        assert issuer["apiVersion"] == certificate["apiVersion"] == "cert-manager.io/v1"
        assert issuer["spec"] == {"selfSigned": {}}
        assert issuer_ref == {
            "name": issuer["metadata"]["name"],
            "kind": "Issuer",
            "group": "cert-manager.io",
        }
    else:
        assert not release.find("Issuer")
        assert issuer_ref == {
            "name": "corp-ca",
            "kind": "ClusterIssuer",
            "group": "cert-manager.io",
        }
    config = release.one("MutatingWebhookConfiguration")
    assert config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == (
        f"{release.namespace}/{certificate['metadata']['name']}"
    )


def _go_duration(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text)
    assert "".join(n + u for n, u in parts) == text, text
    return sum(float(n) * units[u] for n, u in parts)


def _mounted_tls_secret(release: Release) -> str:
    _, pod = release.pod_running("webhook")
    mount = next(m for m in _container(pod, "webhook")["volumeMounts"] if m["name"] == "tls")
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    return str(volume["secret"]["secretName"])


def _certs_args(pod: dict[str, Any]) -> Any:
    (container,) = pod["containers"]
    assert container["command"] == ["perch-certs"]
    return certs_cli._parser().parse_args(container["args"])


# --- pods: security, resources, probes ----------------------------------------------------------


@pytest.mark.parametrize("name", ["default", "analyzer-deployment", "everything"])
def test_every_pod_runs_restricted(chart_dir: Path, name: str) -> None:
    release = rendered(chart_dir, name)
    workloads = list(release.workloads())
    assert len(workloads) >= 2
    for owner, pod in workloads:
        where = f"{owner['kind']} {owner['metadata']['name']}"
        ctx = pod["securityContext"]
        assert ctx["runAsNonRoot"] is True, where
        assert ctx["runAsUser"] > 0 and ctx["runAsGroup"] > 0, where
        assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}, where
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            assert not pod.get(key), where
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in pod["containers"]:
            sc = container["securityContext"]
            at = f"{where} container {container['name']}"
            assert sc["allowPrivilegeEscalation"] is False, at
            assert sc["readOnlyRootFilesystem"] is True, at
            assert sc["capabilities"] == {"drop": ["ALL"]}, at
            assert sc.get("privileged") is not True and sc.get("runAsUser", 1) != 0, at
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, at
            # The only writable place: /tmp on an emptyDir (gunicorn's and the metrics' files).
            tmp = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
            assert tmp and "emptyDir" in volumes[tmp[0]["name"]], at


@pytest.mark.parametrize("name", ["default", "analyzer-deployment"])
def test_resources_are_requested_with_no_cpu_limit(name: str) -> None:
    for owner, _, container in render(VALUE_SETS[name]).containers():
        at = f"{owner['kind']} {owner['metadata']['name']} container {container['name']}"
        resources = container["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]), at
        assert "cpu" not in resources.get("limits", {}), at
        assert "memory" in resources["limits"], at


def test_webhook_deployment_is_highly_available_and_probed_over_https() -> None:
    release = render({})
    deployment, pod = release.pod_running("webhook")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    term = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert _labels_match(
        term["podAffinityTerm"]["labelSelector"]["matchLabels"], _pod_labels(release, "webhook")
    )
    webhook = _container(pod, "webhook")
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        assert webhook[probe]["httpGet"] == {"path": path, "port": "https", "scheme": "HTTPS"}
    # The analyzer sidecar is not a readiness gate of the webhook's pod.
    analyzer = _container(pod, "analyzer")
    assert analyzer["livenessProbe"]["httpGet"] == {
        "path": "/healthz",
        "port": "metrics",
        "scheme": "HTTP",
    }
    assert "readinessProbe" not in analyzer
    pdb = release.one("PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert _labels_match(pdb["spec"]["selector"]["matchLabels"], _pod_labels(release, "webhook"))


def test_analyzer_as_its_own_deployment() -> None:
    release = render(VALUE_SETS["analyzer-deployment"])
    _, webhook_pod = release.pod_running("webhook")
    assert [c["name"] for c in webhook_pod["containers"]] == ["webhook"]
    deployment, pod = release.pod_running("analyzer")
    assert deployment["spec"]["replicas"] == 2
    assert pod["serviceAccountName"] != webhook_pod["serviceAccountName"]
    analyzer = _container(pod, "analyzer")
    assert analyzer["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert "--leader-elect" in analyzer["args"]
    assert len(release.find("PodDisruptionBudget")) == 2
    metrics = release.one("Service", f"{release.name}-analyzer-metrics")
    assert _labels_match(metrics["spec"]["selector"], _pod_labels(release, "analyzer"))
    assert not _labels_match(metrics["spec"]["selector"], _pod_labels(release, "webhook"))


@pytest.mark.parametrize("mode", ["sidecar", "deployment"])
def test_analyzer_is_probed_on_the_port_it_serves(mode: str) -> None:
    release = render({"analyzer": {"mode": mode, "metricsPort": 9091}})
    owner, pod = release.pod_running("analyzer")
    assert owner["metadata"]["name"].endswith("-webhook" if mode == "sidecar" else "-analyzer")
    analyzer = _container(pod, "analyzer")
    ports = {p["name"]: p["containerPort"] for p in analyzer["ports"]}
    bind = next(a for a in analyzer["args"] if a.startswith("--metrics-bind="))
    assert bind == f"--metrics-bind=0.0.0.0:{ports['metrics']}" == "--metrics-bind=0.0.0.0:9091"
    probes = {"startupProbe": "/healthz", "livenessProbe": "/healthz"}
    if mode == "deployment":
        probes["readinessProbe"] = "/readyz"
    else:
        # The pod's readiness is the webhook's: admission must not wait for the analyzer's list.
        assert "readinessProbe" not in analyzer
    for probe, path in probes.items():
        assert analyzer[probe]["httpGet"] == {"path": path, "port": "metrics", "scheme": "HTTP"}
    liveness, startup = analyzer["livenessProbe"], analyzer["startupProbe"]
    assert (liveness["periodSeconds"], liveness["failureThreshold"]) == (10, 3)
    assert "initialDelaySeconds" not in liveness  # the startup probe holds it back instead
    # A process slow to import on a busy node is given a minute before liveness may restart it.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60


# --- every command exists, and its flags are accepted ------------------------------------------


@pytest.mark.parametrize(
    "name", ["default", "analyzer-deployment", "everything", "notifications-inline"]
)
def test_every_container_runs_a_console_script_with_accepted_flags(
    chart_dir: Path, name: str, tmp_path: Path
) -> None:
    release = rendered(chart_dir, name)
    seen = set()
    for owner, pod, container in release.containers():
        command = container["command"]
        assert len(command) == 1 and command[0] in CONSOLE_SCRIPTS, command
        seen.add(command[0])
        env = _container_env(release, container, pod_name=f"{owner['metadata']['name']}-0")
        if command[0] == "perch-webhook":
            _check_webhook_args(release, container, env, tmp_path)
        elif command[0] == "perch-analyzer":
            _check_analyzer_args(release, container, env)
        else:
            assert command[0] == "perch-certs"
            assert (
                container["image"]
                == _container(release.pod_running("webhook")[1], "webhook")["image"]
            )
            _certs_args(pod)
    expected = {"perch-webhook", "perch-analyzer"}
    if not VALUE_SETS[name].get("tls", {}).get("certManager", {}).get("enabled"):
        expected.add("perch-certs")
    assert seen == expected


def _check_webhook_args(
    release: Release, container: dict[str, Any], env: dict[str, str], tmp: Path
) -> None:
    # The mounted Secret's files are where --certfile and --keyfile point: give the server real
    # ones at that place and let it validate everything, the TLS pair included.
    mount = next(m for m in container["volumeMounts"] if m["name"] == "tls")
    write_files(issue(service=f"{release.name}-webhook", namespace=release.namespace), tmp)
    args = [a.replace(mount["mountPath"], str(tmp)) for a in container["args"]]
    settings = webhook_server.parse_settings(args, env)
    assert Path(settings.certfile).name == CERT_FILE and Path(settings.keyfile).name == KEY_FILE
    values = release.values
    assert (settings.workers, settings.threads) == (
        values["webhook"]["workers"],
        values["webhook"]["threads"],
    )
    assert settings.log_level == values["logLevel"]
    api_timeout = float(env["PERCH_API_TIMEOUT_SECONDS"])
    assert 0 < api_timeout < values["webhook"]["timeoutSeconds"]
    assert container["image"].startswith(values["image"]["webhook"]["repository"])


def _check_analyzer_args(release: Release, container: dict[str, Any], env: dict[str, str]) -> None:
    args = analyzer_cli.parse_args(container["args"], env)
    values = release.values["analyzer"]
    assert args.leader_elect is True
    assert args.lease_namespace == release.namespace
    assert args.lease_name == values["leaseName"]
    assert args.identity == env["POD_NAME"]
    assert args.prometheus_url == values["prometheus"]["url"]
    assert args.max_active == values["maxActive"]
    assert args.namespace == (values["namespaces"] or None)
    assert args.log_level == release.values["logLevel"]
    port = int(args.metrics_bind.rpartition(":")[2])
    assert {"name": "metrics", "containerPort": port, "protocol": "TCP"} in container["ports"]
    # The notification settings as the analyzer reads them: the URLs from the Secrets.
    notifiers_from_settings(env)
    providers_from_settings(env)


@pytest.mark.parametrize("script", ["perch-webhook", "perch-analyzer", "perch-certs"])
def test_console_scripts_are_installed_and_answer_help(script: str) -> None:
    assert script in CONSOLE_SCRIPTS
    path = Path(sys.executable).with_name(script)
    assert path.is_file(), f"{script} is not installed next to {sys.executable}"
    argv = [str(path), *(["ensure"] if script == "perch-certs" else []), "--help"]
    done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout


def _container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in pod["containers"] if c["name"] == name)


def _pod_labels(release: Release, container: str) -> dict[str, str]:
    owner, _ = release.pod_running(container)
    return dict(owner["spec"]["template"]["metadata"]["labels"])


def _labels_match(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _container_env(release: Release, container: dict[str, Any], *, pod_name: str) -> dict[str, str]:
    """The container's environment as the kubelet would give it."""
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
            continue
        source = var["valueFrom"]
        if "fieldRef" in source:
            field = source["fieldRef"]["fieldPath"]
            env[var["name"]] = {"metadata.name": pod_name, "metadata.namespace": release.namespace}[
                field
            ]
        else:
            ref = source["secretKeyRef"]
            secret = release.find("Secret", ref["name"])
            if secret:
                env[var["name"]] = base64.b64decode(secret[0]["data"][ref["key"]]).decode()
            else:  # the user's own Secret: any valid content will do
                env[var["name"]] = (
                    "{}"
                    if var["name"] == "PERCH_ALERT_PROVIDERS"
                    else "https://hooks.example.com/x"
                )
    return env


# --- options ------------------------------------------------------------------------------------


def test_notifications_given_as_urls_live_in_a_secret_the_analyzer_reads() -> None:
    values = VALUE_SETS["notifications-inline"]
    release = render(values)
    (secret,) = release.find("Secret")
    assert secret["type"] == "Opaque"
    _, pod = release.pod_running("analyzer")
    analyzer = _container(pod, "analyzer")
    env = _container_env(release, analyzer, pod_name="perch-webhook-0")
    notify = values["notifications"]
    assert env["PERCH_SLACK_URL"] == notify["slack"]["url"]
    assert env["PERCH_SLACK_CHANNEL"] == "#releases"
    assert env["PERCH_NOTIFY_URL"] == notify["generic"]["url"]
    assert json.loads(env["PERCH_ALERT_PROVIDERS"]) == notify["alertProviders"]
    # Never in the pod spec itself: only references to the Secret.
    spec_text = json.dumps(pod)
    assert notify["slack"]["url"] not in spec_text and notify["generic"]["url"] not in spec_text
    assert len(notifiers_from_settings(env)) == 2
    assert set(providers_from_settings(env)) == {"on-call"}
    # A change of the URLs restarts the pods that read them.
    other = render(
        merged(values, {"notifications": {"slack": {"url": "https://hooks.slack.com/z"}}})
    )
    checksum = "checksum/notifications"
    assert (
        other.pod_running("analyzer")[0]["spec"]["template"]["metadata"]["annotations"][checksum]
        != release.pod_running("analyzer")[0]["spec"]["template"]["metadata"]["annotations"][
            checksum
        ]
    )


def test_notifications_from_existing_secrets() -> None:
    release = render(VALUE_SETS["notifications-existing-secrets"])
    assert not release.find("Secret")
    analyzer = _container(release.pod_running("analyzer")[1], "analyzer")
    refs = {
        v["name"]: v["valueFrom"]["secretKeyRef"]
        for v in analyzer["env"]
        if "secretKeyRef" in v.get("valueFrom", {})
    }
    assert refs == {
        "PERCH_SLACK_URL": {"name": "perch-slack", "key": "url"},
        "PERCH_NOTIFY_URL": {"name": "perch-audit", "key": "url"},
        "PERCH_ALERT_PROVIDERS": {"name": "perch-alerts", "key": "providers.json"},
    }
    # Without any notification setting the analyzer gets no notification variables at all.
    default = _container(render({}).pod_running("analyzer")[1], "analyzer")
    assert {v["name"] for v in default["env"]} == {"POD_NAME", "POD_NAMESPACE"}


@pytest.mark.parametrize("name", ["network-policy", "network-policy-analyzer-deployment"])
def test_network_policy_admits_the_webhook_and_metrics_ports_of_perch_pods_only(name: str) -> None:
    release = render(VALUE_SETS[name])
    policies = release.find("NetworkPolicy")
    covered: set[str] = set()
    for policy in policies:
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        pods = [
            (owner, pod)
            for owner, pod in release.workloads()
            if owner["kind"] == "Deployment"
            and _labels_match(
                policy["spec"]["podSelector"]["matchLabels"],
                owner["spec"]["template"]["metadata"]["labels"],
            )
        ]
        assert len(pods) == 1, policy["metadata"]["name"]
        owner, pod = pods[0]
        named_ports = {p["name"] for c in pod["containers"] for p in c.get("ports", [])}
        allowed = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
        # Exactly the pod's ports: the webhook's TLS port and the analyzer's metrics port.
        assert allowed == named_ports, (allowed, named_ports)
        covered.add(owner["metadata"]["name"])
        metrics_from = VALUE_SETS[name]["networkPolicy"].get("metricsFrom")
        for rule in policy["spec"]["ingress"]:
            if any(p["port"] == "metrics" for p in rule["ports"]):
                assert rule.get("from") == metrics_from
            else:
                assert "from" not in rule  # the API server's address differs per cluster
    assert covered == {
        o["metadata"]["name"] for o, _ in release.workloads() if o["kind"] == "Deployment"
    }
    assert not render({}).find("NetworkPolicy")


@pytest.mark.parametrize("mode", ["sidecar", "deployment"])
def test_service_monitor_scrapes_both_services(mode: str) -> None:
    values = merged(VALUE_SETS["service-monitor"], {"analyzer": {"mode": mode}})
    release = render(values)
    monitor = release.one("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    spec = monitor["spec"]
    assert set(spec) == {"namespaceSelector", "selector", "endpoints"}
    assert spec["namespaceSelector"] == {"matchNames": [release.namespace]}
    services = [
        s
        for s in release.find("Service")
        if _labels_match(spec["selector"]["matchLabels"], s["metadata"]["labels"])
    ]
    ports = {p["name"]: (s, p) for s in services for p in s["spec"]["ports"]}
    endpoints = {e["port"]: e for e in spec["endpoints"]}
    assert set(endpoints) == set(ports) == {"webhook-metrics", "analyzer-metrics"}
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= {
            "port",
            "scheme",
            "path",
            "interval",
            "scrapeTimeout",
            "tlsConfig",
            "honorLabels",
        }
        assert endpoint["path"] == "/metrics"
        service, port = ports[endpoint["port"]]
        # Each Service's port leads to a container port of that name in the pods it selects.
        owner = next(
            o
            for o, _ in release.workloads()
            if o["kind"] == "Deployment"
            and _labels_match(
                service["spec"]["selector"], o["spec"]["template"]["metadata"]["labels"]
            )
        )
        container_ports = {
            p["name"]
            for c in owner["spec"]["template"]["spec"]["containers"]
            for p in c.get("ports", [])
        }
        assert port["targetPort"] in container_ports
    tls = endpoints["webhook-metrics"]
    assert tls["scheme"] == "https"
    assert tls["tlsConfig"]["ca"] == {
        "secret": {"name": _mounted_tls_secret(release), "key": "ca.crt"}
    }
    assert tls["tlsConfig"]["serverName"] in service_dns_names(
        f"{release.name}-webhook", release.namespace
    )
    assert endpoints["analyzer-metrics"]["scheme"] == "http"
    # The canary metrics keep their own namespace label (the dashboard filters on it).
    assert endpoints["analyzer-metrics"]["honorLabels"] is True
    assert not render({}).find("ServiceMonitor")


def test_dashboard_configmap_carries_the_dashboard_for_grafanas_sidecar(chart_dir: Path) -> None:
    release = rendered(chart_dir, "dashboard")
    configmap = release.one("ConfigMap")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["namespace"] == "monitoring"
    text = (chart_dir / DASHBOARD).read_text()
    assert configmap["data"]["perch.json"].strip() == text.strip()
    assert isinstance(json.loads(configmap["data"]["perch.json"]), dict)
    assert not render({}).find("ConfigMap")


def test_dashboard_without_its_file_is_an_error(tmp_path: Path) -> None:
    copied = tmp_path / "perch"
    shutil.copytree(CHART, copied)
    shutil.rmtree(copied / "dashboards", ignore_errors=True)
    message = values_error({"dashboard": {"enabled": True}}, chart_dir=copied)
    assert "dashboard.enabled: the chart has no dashboards/perch.json" in message


def test_notes_tell_how_to_opt_in() -> None:
    notes = render({}).notes
    assert "kubectl get canaries -A" in notes
    # The example is a Deployment whose annotations are valid: the spec parses without warnings.
    example = "\n".join(
        line[2:]
        for line in notes.split("Opt a Deployment in")[1]
        .split("Or on a running")[0]
        .splitlines()[2:]
    )
    deployment = yaml.safe_load(example)
    annotations = deployment["metadata"]["annotations"]
    assert annotations["perch.dev/enabled"] == "true"
    spec = parse_spec(annotations["perch.dev/spec"])
    assert spec.warnings == ()
    assert spec.analysis.metrics


# --- RBAC: exactly what the code requests -------------------------------------------------------

SPECS = {
    "istio": """\
provider: istio
autoscalerRef: {apiVersion: autoscaling/v2, kind: HorizontalPodAutoscaler, name: podinfo}
service:
  port: 9898
  hosts: [app.example.com]
  trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}  # so that Perch makes DestinationRules too
analysis: {interval: 1s, threshold: 1, maxWeight: 50, stepWeight: 50}
""",
    "gatewayapi": """\
provider: gatewayapi
autoscalerRef: {apiVersion: autoscaling/v2, kind: HorizontalPodAutoscaler, name: podinfo}
service:
  port: 9898
  hosts: [app.example.com]
  gatewayRefs: [{name: public, namespace: istio-system}]
analysis: {interval: 1s, threshold: 1, maxWeight: 50, stepWeight: 50}
""",
}
ROUTES = {
    "istio": [
        ("networking.istio.io", "v1", "virtualservices"),
        ("networking.istio.io", "v1", "destinationrules"),
    ],
    "gatewayapi": [("gateway.networking.k8s.io", "v1", "httproutes")],
}
DEADLINE = 30.0

# Requests the chart's rules refuse on purpose, (group, resource, verb) → why. Empty: none.
NOT_GRANTED: dict[tuple[str, str, str], str] = {}
# Rules kept although no exercised path uses them, (group, resource, verb) → why. Empty: every
# rule is used by a path below (watch included: the stand-in serves and records watch streams).
UNUSED_BUT_KEPT: dict[tuple[str, str, str], str] = {}
# Non-resource URLs the code calls: readable by every account through Kubernetes' default
# system:public-info-viewer ClusterRole, so the chart grants nothing for them.
PUBLIC_PATHS = {"/version/", "/version"}


def wait_for(predicate: Callable[[], Any], what: str, deadline: float = DEADLINE) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


class World:
    """The API stand-in, with one recording client per component and one for the test itself."""

    def __init__(self, standin: StandIn) -> None:
        self.standin = standin
        self.recorders = {k: RecordingClient(k) for k in ("webhook", "analyzer", "certs", "test")}
        self.test_api = self.client("test")
        self.apps = client.AppsV1Api(self.test_api)
        self.custom = client.CustomObjectsApi(self.test_api)
        self.webhook = PerchAdmitter(Kube(self.client("webhook")), adopt_timeout=1.0)
        self.controllers: list[DeploymentController] = []

    def client(self, component: str) -> client.ApiClient:
        return self.recorders[component].wrap(self.standin.api_client())

    def namespace(self, *, controller: bool = False) -> str:
        ns = f"rbac-{uuid.uuid4().hex[:6]}"
        client.CoreV1Api(self.test_api).create_namespace({"metadata": {"name": ns}})
        if controller:  # plays the Deployment controller and kubelet: pods become ready
            self.controllers.append(DeploymentController(self.test_api, ns).start())
        return ns

    def obj(self, plural: str, ns: str, name: str) -> dict[str, Any] | None:
        return self.standin.objects(plural).get((plural, ns, name))

    def create_hpa(self, ns: str) -> None:
        client.AutoscalingV2Api(self.test_api).create_namespaced_horizontal_pod_autoscaler(
            ns,
            {
                "metadata": {"name": "podinfo"},
                "spec": {
                    "scaleTargetRef": {
                        "apiVersion": "apps/v1",
                        "kind": "Deployment",
                        "name": "podinfo",
                    },
                    "minReplicas": 2,
                    "maxReplicas": 4,
                },
            },
        )

    def admit(
        self, op: str, obj: dict[str, Any], old: dict[str, Any] | None = None, *, store: bool = True
    ) -> None:
        """What the API server does: admission through Perch's webhook logic, then storage."""
        review = admission_review(operation=op, obj=obj, old=old, uid=str(uuid.uuid4()))
        answer = self.webhook.admit(review).review["response"]
        assert answer["allowed"], answer
        if "patch" in answer:
            obj = jsonpatch.apply_patch(obj, json.loads(base64.b64decode(answer["patch"])))
        if not store:
            return
        ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        if op == "CREATE":
            self.apps.create_namespaced_deployment(ns, obj)
        else:
            self.apps.replace_namespaced_deployment(name, ns, obj)

    def create(self, ns: str, provider: str, name: str = "podinfo", *, store: bool = True) -> None:
        dep = podinfo(namespace=ns, uid=None, spec=SPECS[provider])
        dep["metadata"]["name"] = name
        for key in ("resourceVersion", "generation"):
            dep["metadata"].pop(key, None)
        self.admit("CREATE", dep, store=store)

    def update(
        self,
        ns: str,
        change: Callable[[dict[str, Any]], None],
        *,
        name: str = "podinfo",
        store: bool = True,
    ) -> None:
        for _ in range(10):  # the Deployment controller writes status meanwhile: retry on 409
            live = self.obj("deployments", ns, name)
            assert live is not None
            new = copy.deepcopy(live)
            change(new)
            try:
                self.admit("UPDATE", new, live, store=store)
                return
            except client.exceptions.ApiException as exc:
                if exc.status != 409:
                    raise
        pytest.fail("could not update the Deployment")

    def adopted(self, ns: str) -> bool:
        """Every object Perch made in the namespace has its Deployment as owner."""
        made = [
            obj
            for (_, where, _), obj in self.standin.objects().items()
            if where == ns
            and (obj["metadata"].get("labels") or {}).get("app.kubernetes.io/managed-by") == "perch"
        ]
        return bool(made) and all(obj["metadata"].get("ownerReferences") for obj in made)

    def set_route_weights(self, ns: str, provider: str, canary: int) -> None:
        """What the analyzer does between admissions: traffic on the canary."""
        group, version, plural = ROUTES[provider][0]
        route = self.obj(plural, ns, "podinfo")
        assert route is not None
        if provider == "istio":
            weights = route["spec"]["http"][0]["route"]
        else:
            weights = route["spec"]["rules"][0]["backendRefs"]
        weights[0]["weight"], weights[1]["weight"] = 100 - canary, canary
        self.custom.replace_namespaced_custom_object(group, version, ns, plural, "podinfo", route)

    def stop(self) -> None:
        for controller in self.controllers:
            controller.stop()


def set_image(image: str) -> Callable[[dict[str, Any]], None]:
    def change(dep: dict[str, Any]) -> None:
        dep["spec"]["template"]["spec"]["containers"][0]["image"] = image

    return change


def opt_out(dep: dict[str, Any]) -> None:
    del dep["metadata"]["annotations"]["perch.dev/enabled"]
    dep["spec"]["template"]["spec"]["containers"][0]["image"] = IMAGE_NEWER


def run_webhook(world: World, provider: str) -> None:
    """Every path of the admission logic that touches the API, for one router."""
    ns = world.namespace()
    world.create_hpa(ns)
    # CREATE: Canary object, canary Service and routes at weight 0, then adopted by the Deployment.
    world.create(ns, provider)
    wait_for(lambda: world.adopted(ns), "the objects made at CREATE to be adopted")
    # A release: the canary Deployment and its HPA copy.
    world.update(ns, set_image(IMAGE_NEW))
    # A newer release during the analysis, after the primary's HPA changed and with another
    # trafficPolicy: the canary Deployment, its HPA copy and the DestinationRules replaced.
    client.AutoscalingV2Api(world.test_api).patch_namespaced_horizontal_pod_autoscaler(
        "podinfo", ns, {"spec": {"maxReplicas": 6}}, _content_type="application/merge-patch+json"
    )

    def newer_release(dep: dict[str, Any]) -> None:
        set_image(IMAGE_NEWER)(dep)
        annotations = dep["metadata"]["annotations"]
        annotations["perch.dev/spec"] = annotations["perch.dev/spec"].replace(
            "ISTIO_MUTUAL", "DISABLE"
        )

    world.update(ns, newer_release)
    # Opting out mid-analysis: routes back to the primary, the canary's objects deleted.
    world.set_route_weights(ns, provider, 30)
    world.update(ns, opt_out)
    assert world.obj("deployments", ns, "podinfo-canary") is None
    # A CREATE that a later admission plugin refused: what was made for it is removed.
    world.create(ns, provider, "ghost", store=False)
    wait_for(
        lambda: world.obj("canaries", ns, "ghost") is None, "the ghost's objects to be removed"
    )
    assert world.webhook.ready()  # /readyz


def run_analyzer(world: World, release: Release) -> None:
    """The analyzer as its container runs it: promotion, recreation and orphan clean-up."""
    container = _container(release.pod_running("analyzer")[1], "analyzer")
    args = analyzer_cli.parse_args(container["args"], {"POD_NAME": "perch-webhook-0"})
    api = world.client("analyzer")
    # Leader election in the Lease the chart grants: take it, renew it, release it.
    elector = LeaseElector(
        api,
        namespace=args.lease_namespace,
        name=args.lease_name,
        identity=args.identity,
        lease_duration=3,
        renew_deadline=1.8,
        retry_period=0.3,
    )
    elector.start()
    wait_for(elector.is_leader, "leadership")
    lease = (args.lease_namespace, args.lease_name)
    first = world.obj("leases", *lease)
    wait_for(lambda: world.obj("leases", *lease) != first, "a renewal")
    elector.stop(release=True)

    promoted, orphans = [], []
    for provider in SPECS:
        ns = world.namespace(controller=True)
        world.create_hpa(ns)
        world.create(ns, provider)
        wait_for(lambda ns=ns: world.adopted(ns), "adoption")
        world.update(ns, set_image(IMAGE_NEW))
        # The canary Deployment went missing: the analyzer recreates it from the Canary object.
        world.apps.delete_namespaced_deployment("podinfo-canary", ns)
        if provider == "istio":
            # Someone edited a DestinationRule: the analyzer puts it back when it sets the weights.
            rule = world.obj("destinationrules", ns, "podinfo-canary")
            assert rule is not None
            rule["spec"]["trafficPolicy"] = {"tls": {"mode": "DISABLE"}}
            world.custom.replace_namespaced_custom_object(
                "networking.istio.io", "v1", ns, "destinationrules", "podinfo-canary", rule
            )
        promoted.append(ns)

        ns = world.namespace(controller=True)
        world.create_hpa(ns)
        world.create(ns, provider)
        wait_for(lambda ns=ns: world.adopted(ns), "adoption")
        # Admitted but never stored (a later admission plugin said no): an orphaned canary, whose
        # route someone deleted meanwhile.
        world.update(ns, set_image(IMAGE_NEW), store=False)
        for group, version, plural in ROUTES[provider]:
            for route in world.standin.objects(plural):
                if route[1] == ns:
                    world.custom.delete_namespaced_custom_object(
                        group, version, ns, plural, route[2]
                    )
        orphans.append(ns)

    clock = [datetime.datetime.now(datetime.UTC)]
    cache = WatchCache(api, namespaces=args.namespace, backoff_initial=0.05, backoff_max=0.4)
    # As __main__ does: MetricTemplates in a watch cache of their own.
    template_cache = WatchCache(api, namespaces=args.namespace, kinds=("MetricTemplate",))
    # And Perch's routes, so that a tick reads them without a GET.
    route_cache = WatchCache(api, namespaces=args.namespace, kinds=ROUTE_KINDS)
    analyzer = Analyzer(
        kube=Kube(api, timeout=5.0),
        cache=cache,
        provider=PrometheusProvider(args.prometheus_url, timeout_seconds=args.prometheus_timeout),
        notifications=Notifications.from_env({}),
        telemetry=Telemetry(),
        max_active=args.max_active,
        orphan_grace=0.0,
        now=lambda: clock[0],
        templates=TemplateResolver(
            templates=template_cache,
            secrets=Kube(api, timeout=5.0),
            default=ProviderSettings(args.prometheus_url),
        ),
        routes=route_cache,
    )
    cache.start()
    template_cache.start()
    route_cache.start()
    try:
        assert cache.wait_synced(timeout=10)
        assert template_cache.wait_synced(timeout=10)
        assert route_cache.wait_synced(timeout=10)

        def phase(ns: str) -> str:
            canary = world.obj("canaries", ns, "podinfo") or {}
            return str((canary.get("status") or {}).get("phase"))

        def done() -> bool:
            return all(phase(ns) == "Succeeded" for ns in promoted) and all(
                phase(ns) in ("Initialized", "Succeeded") for ns in orphans
            )

        end = time.monotonic() + DEADLINE
        while not done():
            assert time.monotonic() < end, {ns: phase(ns) for ns in promoted + orphans}
            for ns in promoted + orphans:
                analyzer.tick(ns, "podinfo")
            clock[0] += datetime.timedelta(seconds=2)
            time.sleep(0.2)  # the watch cache and the Deployment controller catch up
        # A halt that lasts: the same event again counts on the first Event (a patch).
        waiting = world.obj("canaries", promoted[0], "podinfo")
        for _ in range(2):
            analyzer.actor.events.record(waiting, reason="Waiting", message="Halt advancement")
    finally:
        cache.stop()
        template_cache.stop()
        route_cache.stop()
        analyzer.notifications.close()
    for ns in promoted:
        primary = world.obj("deployments", ns, "podinfo")
        assert primary["spec"]["template"]["spec"]["containers"][0]["image"] == IMAGE_NEW
    for ns in orphans:
        assert world.obj("deployments", ns, "podinfo-canary") is None
    # A notification due for a canary whose alert names an AlertProvider with its address in a
    # Secret: the analyzer reads both, as its notifications' thread does.
    ns = world.namespace()
    client.CoreV1Api(world.test_api).create_namespaced_secret(
        ns,
        {
            "metadata": {"name": "on-call-url"},
            "data": {"address": base64.b64encode(b"https://chat.example/hook").decode()},
        },
    )
    world.custom.create_namespaced_custom_object(
        "perch.dev",
        "v1alpha1",
        ns,
        "alertproviders",
        {
            "apiVersion": "perch.dev/v1alpha1",
            "kind": "AlertProvider",
            "metadata": {"name": "on-call"},
            "spec": {"type": "slack", "secretRef": {"name": "on-call-url"}},
        },
    )
    provider = AlertProviderResolver(Kube(api, timeout=5.0)).resolve("on-call", namespace=ns)
    assert provider is not None and provider["url"] == "https://chat.example/hook"


CertsRun = tuple[str, Release, dict[str, Any], list[Use]]


def run_certs(world: World) -> list[CertsRun]:
    """perch-certs ensure as each Job and the CronJob run it: issue, keep, inject, renew."""
    api = world.client("certs")
    recorder = world.recorders["certs"]
    install, upgrade = render({}), render({}, upgrade=True)
    config = copy.deepcopy(install.one("MutatingWebhookConfiguration"))

    def job(release: Release, events: str) -> dict[str, Any]:
        (found,) = [j for j in release.find("Job") if j["metadata"]["annotations"][HOOK] == events]
        return dict(found["spec"]["template"]["spec"])

    cron = install.one("CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    steps: list[tuple[str, Release, dict[str, Any], str, int]] = [
        ("pre-install", install, job(install, "pre-install,pre-upgrade"), "issued", 0),
        # helm applies the release's objects between the two hooks.
        ("post-install", install, job(install, "post-install,post-upgrade"), "kept", 0),
        ("pre-upgrade", upgrade, job(upgrade, "pre-install,pre-upgrade"), "kept", 0),
        ("renewal", install, cron, "renewed", 300),  # two thirds of a year later
    ]
    runs: list[CertsRun] = []
    for label, release, pod, action, days_later in steps:
        if label == "post-install":
            client.AdmissionregistrationV1Api(world.test_api).create_mutating_webhook_configuration(
                config
            )
        args = _certs_args(pod)
        secret_ns, secret_name = args.secret.split("/")
        before = len(recorder.uses)
        outcome = ensure(
            api,
            secret_namespace=secret_ns,
            secret_name=secret_name,
            service=args.service,
            namespace=args.namespace,
            webhook_config=args.webhook_config,
            days=args.days,
            now=datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=days_later),
        )
        assert outcome.action == action, (label, outcome.describe())
        runs.append((label, release, pod, recorder.uses[before:]))
    stored = world.obj("mutatingwebhookconfigurations", None, CONFIGURATION_NAME)
    assert stored["webhooks"][0]["clientConfig"].get("caBundle")
    return runs


@pytest.fixture(scope="module")
def exercised() -> Iterator[tuple[World, list[CertsRun]]]:
    """Run every component's paths once; yields the world and the certs runs per workload."""
    with StandIn() as standin:
        world = World(standin)
        try:
            for provider in SPECS:
                run_webhook(world, provider)
            run_analyzer(world, render({}))
            certs_runs = run_certs(world)
        finally:
            world.stop()
        yield world, certs_runs
    assert not standin.crashes()


def test_the_recorded_requests_are_the_stand_ins_own_log(exercised) -> None:
    world, _ = exercised

    def keys(uses: Iterable[Use]) -> set[tuple[str, str, str | None, str | None]]:
        return {(u.verb, u.resource, u.namespace, u.name) for u in uses}

    served = {(c.verb, c.resource, c.namespace, c.name) for c in world.standin.calls()}
    recorded = keys(u for r in world.recorders.values() for u in r.uses)
    # Every request the stand-in served came from a recorded client: none is unattributed.
    assert served <= recorded, served - recorded
    # And the stand-in served every request the components recorded. (The test's own Deployment
    # controllers may have one in flight as they stop.)
    components = keys(u for k, r in world.recorders.items() if k != "test" for u in r.uses)
    assert components <= served, components - served


# Each component, the ServiceAccount of the pod that runs it, in both analyzer modes.
@pytest.mark.parametrize("mode", ["sidecar", "deployment"])
@pytest.mark.parametrize("component", ["webhook", "analyzer"])
def test_every_request_of_a_service_is_granted_to_its_pod(
    exercised, mode: str, component: str
) -> None:
    world, _ = exercised
    release = render({"analyzer": {"mode": mode}})
    _, pod = release.pod_running(component)
    access = Access(release, service_account=pod["serviceAccountName"], namespace=release.namespace)
    denied = sorted(
        {u for u in world.recorders[component].uses if not access.allows(u)}
        - {u for u in world.recorders[component].uses if u.permission in NOT_GRANTED}
    )
    assert denied == [], denied
    assert set(world.recorders[component].non_resource) <= PUBLIC_PATHS


def test_analyzer_limited_to_namespaces_is_granted_there_only(exercised) -> None:
    world, _ = exercised
    uses = world.recorders["analyzer"].uses
    # The namespaces the analyzer's canaries and their AlertProviders were in, and a cache
    # limited to them.
    namespaces = sorted(
        {u.namespace for u in uses if u.resource in ("canaries/status", "alertproviders")}
    )
    release = render({"analyzer": {"mode": "deployment", "namespaces": namespaces}})
    _, pod = release.pod_running("analyzer")
    args = analyzer_cli.parse_args(_container(pod, "analyzer")["args"], {})
    assert args.namespace == namespaces
    recorder = RecordingClient("analyzer-namespaced")
    cache = WatchCache(recorder.wrap(world.standin.api_client()), namespaces=args.namespace)
    cache.start()
    try:
        assert cache.wait_synced(timeout=10)
    finally:
        cache.stop()
    access = Access(release, service_account=pod["serviceAccountName"], namespace=release.namespace)
    in_scope = [u for u in uses if u.namespace is not None]  # the tick paths, not the wide cache
    denied = [u for u in [*in_scope, *recorder.uses] if not access.allows(u)]
    assert denied == []
    # ... and nothing elsewhere: the cluster-wide lists are refused.
    assert not any(access.allows(u) for u in uses if u.namespace is None)
    assert not access.allows(Use("apps", "deployments", "get", "elsewhere", "podinfo"))


def test_every_request_of_perch_certs_is_granted_to_its_jobs(exercised) -> None:
    world, runs = exercised
    assert [r[0] for r in runs] == ["pre-install", "post-install", "pre-upgrade", "renewal"]
    for label, release, pod, uses in runs:
        assert uses, label
        access = Access(
            release, service_account=pod["serviceAccountName"], namespace=release.namespace
        )
        denied = [u for u in uses if not access.allows(u)]
        assert denied == [], (label, denied)
    assert world.recorders["certs"].non_resource == []


@pytest.mark.parametrize("mode", ["sidecar", "deployment"])
def test_every_granted_rule_is_used(exercised, mode: str) -> None:
    world, _ = exercised
    release = render({"analyzer": {"mode": mode}})
    unused = []
    for role in [*release.find("Role"), *release.find("ClusterRole")]:
        component = role["metadata"]["labels"]["app.kubernetes.io/component"]
        uses = world.recorders[component].uses
        for rule in role["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        names = rule.get("resourceNames")
                        used = any(
                            u.permission == (group, resource, verb)
                            and (not names or u.name in names)
                            for u in uses
                        )
                        if not used and (group, resource, verb) not in UNUSED_BUT_KEPT:
                            unused.append(
                                (role["kind"], role["metadata"]["name"], group, resource, verb)
                            )
    assert unused == [], unused


def test_secret_names_narrow_the_analyzers_secret_reads_to_those_names() -> None:
    def secret_rules(values: dict[str, Any]) -> list[dict[str, Any]]:
        role = render(values).one("ClusterRole", "perch-analyzer")
        return [r for r in role["rules"] if "secrets" in r["resources"]]

    (default,) = secret_rules({})
    assert default["verbs"] == ["get"] and "resourceNames" not in default
    (named,) = secret_rules(VALUE_SETS["analyzer-secret-names"])
    assert named["verbs"] == ["get"]
    assert named["resourceNames"] == ["on-call-url", "teams.url"]
    release = render(VALUE_SETS["analyzer-secret-names"])
    _, pod = release.pod_running("analyzer")
    access = Access(release, service_account=pod["serviceAccountName"], namespace=release.namespace)
    assert access.allows(Use("", "secrets", "get", "team-a", "on-call-url"))
    assert not access.allows(Use("", "secrets", "get", "team-a", "db-password"))
    assert not access.allows(Use("", "secrets", "list", "team-a", None))


@pytest.mark.parametrize("name", VALUE_SETS)
def test_rbac_has_no_wildcards_and_binds_only_its_own_roles(name: str) -> None:
    release = render(VALUE_SETS[name])
    roles = {
        (r["kind"], r["metadata"]["name"])
        for r in [*release.find("Role"), *release.find("ClusterRole")]
    }
    for role in [*release.find("Role"), *release.find("ClusterRole")]:
        for rule in role["rules"]:
            for key in ("apiGroups", "resources", "verbs", "resourceNames"):
                assert "*" not in rule.get(key, []), (role["metadata"]["name"], rule)
            assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"]), rule
            assert "nonResourceURLs" not in rule
    for binding in [*release.find("RoleBinding"), *release.find("ClusterRoleBinding")]:
        ref = binding["roleRef"]
        assert (ref["kind"], ref["name"]) in roles, ref
        for subject in binding["subjects"]:
            assert subject["kind"] == "ServiceAccount" and subject["namespace"] == release.namespace
            assert release.find("ServiceAccount", subject["name"]), subject
