"""perch-certs inject/ensure and perch.kube against the Kubernetes API stand-in, over real HTTP.

What depends on the real API server is shown on one, in tests/cluster/test_certs.py, with the
chart's certs Jobs' args and ServiceAccounts: the Secret issued, kept without a write and renewed;
the CA bundle injected (again into a re-created configuration) and then used by the API server to
call the webhook; replicas racing to create the Secret; a patch from a stale read refused with 409
and retried; the RBAC those calls need.

What stays here needs what only the stand-in gives:
- injected errors (`standin.fail`): a 409 on a given patch or create, at a chosen moment;
- a server that keeps fields this client does not know (a newer API server; a real one of this
  version prunes them);
- fake clocks: certificates issued at chosen past moments, to find the renewal threshold;
- Secrets crafted to be wrong (names changed, key and certificate apart, another type): what
  `ensure` makes of them is its own logic, whatever the server;
- the command lines' own behaviour: `inject`'s output (the chart's Jobs run `ensure`), error
  reporting (a missing configuration, no credentials: one line, exit 2), client-config loading
  (`load_api_client`) and `retry_on_conflict`'s attempt limit, which need no real cluster.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from kubernetes import client

import perch.kube
from certs.ensure import EnsureResult, ensure
from certs.errors import CertsError
from certs.inject import inject_ca_bundle
from certs.issue import issue
from perch.kube import (
    JSON_PATCH,
    MERGE_PATCH,
    ApiException,
    KubeConfigError,
    is_conflict,
    is_not_found,
    load_api_client,
    response_json,
    retry_on_conflict,
)

NS = "perch"
SERVICE = "perch-webhook"
SECRET = "perch-webhook-tls"
CONFIG = "zz-perch"
DNS_NAMES = [SERVICE, f"{SERVICE}.{NS}", f"{SERVICE}.{NS}.svc", f"{SERVICE}.{NS}.svc.cluster.local"]


# --- helpers -------------------------------------------------------------------------------------


@pytest.fixture
def api(standin: Any) -> Iterator[client.ApiClient]:
    with standin.api_client() as api_client:
        yield api_client


def _webhook(name: str, *, ca_bundle: str | None = None) -> client.V1MutatingWebhook:
    return client.V1MutatingWebhook(
        name=name,
        admission_review_versions=["v1"],
        side_effects="NoneOnDryRun",
        client_config=client.AdmissionregistrationV1WebhookClientConfig(
            service=client.AdmissionregistrationV1ServiceReference(
                name=SERVICE, namespace=NS, path="/mutate", port=443
            ),
            ca_bundle=ca_bundle,
        ),
    )


def _create_config(api: client.ApiClient, *, name: str = CONFIG, webhooks: int = 2) -> None:
    hooks = [_webhook(f"hook{i}.perch.dev") for i in range(webhooks)]
    if hooks:
        # One webhook starts with a stale bundle, as after a previous install.
        stale = issue(service=SERVICE, namespace=NS).ca_crt
        hooks[0] = _webhook("hook0.perch.dev", ca_bundle=base64.b64encode(stale).decode())
    client.AdmissionregistrationV1Api(api).create_mutating_webhook_configuration(
        client.V1MutatingWebhookConfiguration(
            api_version="admissionregistration.k8s.io/v1",
            kind="MutatingWebhookConfiguration",
            metadata=client.V1ObjectMeta(name=name),
            webhooks=hooks,
        )
    )


def _read_config(api: client.ApiClient, name: str = CONFIG) -> dict[str, Any]:
    return response_json(
        client.AdmissionregistrationV1Api(api).read_mutating_webhook_configuration(
            name, _preload_content=False
        )
    )


def _bundles(config: dict[str, Any]) -> list[bytes]:
    return [base64.b64decode(hook["clientConfig"]["caBundle"]) for hook in config["webhooks"]]


def _read_secret(api: client.ApiClient) -> dict[str, Any]:
    return response_json(
        client.CoreV1Api(api).read_namespaced_secret(SECRET, NS, _preload_content=False)
    )


def _secret_files(secret: dict[str, Any]) -> dict[str, bytes]:
    return {key: base64.b64decode(value) for key, value in secret["data"].items()}


def _put_secret(
    api: client.ApiClient, data: dict[str, bytes], *, kind: str = "kubernetes.io/tls"
) -> None:
    client.CoreV1Api(api).create_namespaced_secret(
        NS,
        client.V1Secret(
            api_version="v1",
            kind="Secret",
            metadata=client.V1ObjectMeta(name=SECRET, namespace=NS),
            type=kind,
            data={key: base64.b64encode(value).decode() for key, value in data.items()},
        ),
    )


def _assert_consistent(files: dict[str, bytes]) -> x509.Certificate:
    """The Secret is one a webhook can serve with and the API server can verify."""
    leaf = x509.load_pem_x509_certificate(files["tls.crt"])
    cas = x509.load_pem_x509_certificates(files["ca.crt"])
    leaf.verify_directly_issued_by(cas[0])
    key = serialization.load_pem_private_key(files["tls.key"], password=None)
    assert key.public_key() == leaf.public_key()
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == DNS_NAMES
    return leaf


def _ensure(api: client.ApiClient, **overrides: Any) -> EnsureResult:
    arguments: dict[str, Any] = {
        "secret_namespace": NS,
        "secret_name": SECRET,
        "service": SERVICE,
        "namespace": NS,
        "webhook_config": CONFIG,
    }
    return ensure(api, **{**arguments, **overrides})


def _cli(standin: Any, tmp_path: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    kubeconfig = tmp_path / "kubeconfig"
    standin.kubeconfig(kubeconfig)
    env = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}
    env["KUBECONFIG"] = str(kubeconfig)
    script = Path(sys.executable).with_name("perch-certs")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "certs"]
    return subprocess.run(
        [*command, *argv], capture_output=True, text=True, env=env, check=False, timeout=60
    )


# --- inject --------------------------------------------------------------------------------------


def test_inject_writes_the_bundle_into_every_webhook_and_keeps_the_rest(
    api: client.ApiClient,
) -> None:
    _create_config(api, webhooks=3)
    # A field newer than this kubernetes client: a read-modify-write through its models would
    # drop it.
    client.AdmissionregistrationV1Api(api).patch_mutating_webhook_configuration(
        CONFIG,
        [{"op": "add", "path": "/webhooks/1/futureField", "value": {"keep": True}}],
        _content_type=JSON_PATCH,
    )
    ca = issue(service=SERVICE, namespace=NS).ca_crt

    result = inject_ca_bundle(api, webhook_config=CONFIG, ca_bundle=ca)

    assert (result.webhooks, result.updated) == (3, 3)
    config = _read_config(api)
    assert config["webhooks"][1]["futureField"] == {"keep": True}
    assert _bundles(config) == [ca, ca, ca]
    assert [hook["name"] for hook in config["webhooks"]] == [
        "hook0.perch.dev",
        "hook1.perch.dev",
        "hook2.perch.dev",
    ]
    assert {hook["clientConfig"]["service"]["path"] for hook in config["webhooks"]} == {"/mutate"}


def test_inject_retries_after_a_conflict(standin: Any, api: client.ApiClient) -> None:
    _create_config(api)
    ca = issue(service=SERVICE, namespace=NS).ca_crt
    standin.fail("patch", "mutatingwebhookconfigurations", status=409)

    result = inject_ca_bundle(api, webhook_config=CONFIG, ca_bundle=ca)

    assert result.updated == 2
    assert _bundles(_read_config(api)) == [ca, ca]
    patches = [c.status for c in standin.writes() if c.verb == "patch"]
    assert patches == [409, 200]


def test_inject_into_a_missing_configuration_fails_clearly(api: client.ApiClient) -> None:
    ca = issue(service=SERVICE, namespace=NS).ca_crt
    with pytest.raises(CertsError, match="MutatingWebhookConfiguration 'absent' not found"):
        inject_ca_bundle(api, webhook_config="absent", ca_bundle=ca)


def test_cli_inject_into_a_missing_configuration_exits_2_with_one_line(
    standin: Any, tmp_path: Path
) -> None:
    ca_file = tmp_path / "ca.crt"
    ca_file.write_bytes(issue(service=SERVICE, namespace=NS).ca_crt)

    result = _cli(
        standin, tmp_path, "inject", "--webhook-config", "absent", "--ca-file", str(ca_file)
    )

    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert "MutatingWebhookConfiguration 'absent' not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_inject_writes_the_bundle(standin: Any, api: client.ApiClient, tmp_path: Path) -> None:
    _create_config(api)
    ca = issue(service=SERVICE, namespace=NS).ca_crt
    (tmp_path / "ca.crt").write_bytes(ca)

    result = _cli(
        standin,
        tmp_path,
        "inject",
        "--webhook-config",
        CONFIG,
        "--ca-file",
        str(tmp_path / "ca.crt"),
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        f"injected CA bundle into 2 of 2 webhooks of MutatingWebhookConfiguration {CONFIG}"
    )
    assert _bundles(_read_config(api)) == [ca, ca]


# --- ensure --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("age_days", "action"),
    [
        # 365-day certificate: renewal is due once less than a third (121.7 days) is left.
        (230, "kept"),
        (250, "renewed"),
    ],
)
def test_ensure_renews_only_past_two_thirds_of_the_lifetime(
    api: client.ApiClient, age_days: int, action: str
) -> None:
    _create_config(api)
    issued_at = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=age_days)
    old = issue(service=SERVICE, namespace=NS, days=365, now=issued_at)
    _put_secret(api, {"ca.crt": old.ca_crt, "tls.crt": old.tls_crt, "tls.key": old.tls_key})
    before = _read_secret(api)["metadata"]["resourceVersion"]

    result = _ensure(api)

    assert result.action == action
    files = _secret_files(_read_secret(api))
    leaf = _assert_consistent(files)
    assert _bundles(_read_config(api)) == [files["ca.crt"], files["ca.crt"]]
    if action == "kept":
        assert files["tls.crt"] == old.tls_crt
        assert _read_secret(api)["metadata"]["resourceVersion"] == before
        return
    assert leaf.not_valid_before_utc > datetime.datetime.now(datetime.UTC) - datetime.timedelta(
        days=1
    )
    assert "left" in result.reason
    # Pods serve the old certificate until the kubelet refreshes the mounted Secret, so the
    # bundle trusts the old CA too until then.
    assert files["ca.crt"].startswith(
        x509.load_pem_x509_certificates(files["ca.crt"])[0].public_bytes(serialization.Encoding.PEM)
    )
    assert files["ca.crt"].endswith(old.ca_crt)


def test_ensure_renews_when_the_requested_names_change(api: client.ApiClient) -> None:
    _create_config(api)
    _ensure(api)

    result = _ensure(api, ips=[ipaddress.ip_address("10.0.0.7")])

    assert result.action == "renewed"
    assert result.reason == "names changed (+10.0.0.7)"
    leaf = _assert_consistent(_secret_files(_read_secret(api)))
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.7"]


def test_ensure_replaces_a_secret_whose_key_does_not_match(api: client.ApiClient) -> None:
    first, second = issue(service=SERVICE, namespace=NS), issue(service=SERVICE, namespace=NS)
    _put_secret(api, {"ca.crt": first.ca_crt, "tls.crt": first.tls_crt, "tls.key": second.tls_key})

    result = _ensure(api, webhook_config=None)

    assert result.action == "renewed"
    assert result.injected is None
    _assert_consistent(_secret_files(_read_secret(api)))


def test_ensure_refuses_to_overwrite_a_secret_of_another_type(api: client.ApiClient) -> None:
    _put_secret(api, {"password": b"hunter2"}, kind="Opaque")

    with pytest.raises(CertsError, match="has type 'Opaque'"):
        _ensure(api)

    assert _secret_files(_read_secret(api)) == {"password": b"hunter2"}


def test_ensure_rereads_after_losing_a_create_race(standin: Any, api: client.ApiClient) -> None:
    _create_config(api)
    standin.fail(
        "create", "secrets", status=409, message='secrets "perch-webhook-tls" already exists'
    )

    result = _ensure(api)

    assert result.action == "issued"
    creates = [c.status for c in standin.writes() if c.verb == "create" and c.resource == "secrets"]
    assert creates == [409, 201]
    _assert_consistent(_secret_files(_read_secret(api)))


def test_ensure_with_a_missing_configuration_says_the_secret_was_written(
    api: client.ApiClient,
) -> None:
    with pytest.raises(CertsError) as caught:
        _ensure(api, webhook_config="absent")

    assert str(caught.value).startswith(f"issued Secret {NS}/{SECRET}, but ")
    assert "MutatingWebhookConfiguration 'absent' not found" in str(caught.value)
    _assert_consistent(_secret_files(_read_secret(api)))


def test_cli_ensure_without_credentials_says_what_it_tried(tmp_path: Path) -> None:
    env = {
        k: v for k, v in os.environ.items() if k not in {"KUBECONFIG", "KUBERNETES_SERVICE_HOST"}
    }
    env["HOME"] = str(tmp_path)
    script = Path(sys.executable).with_name("perch-certs")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "certs"]
    result = subprocess.run(
        [*command, "ensure", "--secret", f"{NS}/{SECRET}", "--service", SERVICE, "--namespace", NS],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "KUBECONFIG (not set)" in result.stderr
    assert "in-cluster service account" in result.stderr
    assert f"{tmp_path}/.kube/config (no such file)" in result.stderr


# --- perch.kube ----------------------------------------------------------------------------------


@pytest.fixture
def no_ambient_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


def _reaches_standin(api_client: client.ApiClient) -> None:
    with api_client:
        with pytest.raises(ApiException) as caught:
            client.CoreV1Api(api_client).read_namespaced_secret("absent", NS)
        assert is_not_found(caught.value)


def test_load_api_client_explicit_path(
    standin: Any, tmp_path: Path, no_ambient_credentials: Path
) -> None:
    standin.kubeconfig(tmp_path / "explicit")
    _reaches_standin(load_api_client(str(tmp_path / "explicit")))


def test_load_api_client_kubeconfig_env_skips_missing_entries(
    standin: Any, tmp_path: Path, no_ambient_credentials: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    standin.kubeconfig(tmp_path / "real")
    monkeypatch.setenv(
        "KUBECONFIG", os.pathsep.join([str(tmp_path / "missing"), str(tmp_path / "real")])
    )
    _reaches_standin(load_api_client())


def test_load_api_client_falls_back_to_home(standin: Any, no_ambient_credentials: Path) -> None:
    (no_ambient_credentials / ".kube").mkdir()
    standin.kubeconfig(no_ambient_credentials / ".kube" / "config")
    _reaches_standin(load_api_client())


@pytest.fixture
def in_cluster(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """What the kubelet gives a pod: the service env and the mounted service account."""
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text("pod-token")
    (account / "ca.crt").write_bytes(issue(service=SERVICE, namespace=NS).ca_crt)
    monkeypatch.setattr(perch.kube, "SERVICE_ACCOUNT_TOKEN", account / "token")
    monkeypatch.setattr(perch.kube, "SERVICE_ACCOUNT_CA", account / "ca.crt")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")


def test_load_api_client_in_cluster_comes_before_the_home_kubeconfig(
    standin: Any, no_ambient_credentials: Path, in_cluster: None
) -> None:
    (no_ambient_credentials / ".kube").mkdir()
    standin.kubeconfig(no_ambient_credentials / ".kube" / "config")
    with load_api_client() as api_client:
        assert api_client.configuration.host == "https://10.96.0.1:443"
        assert api_client.configuration.api_key["BearerToken"] == "bearer pod-token"


def test_load_api_client_kubeconfig_env_and_context_come_before_in_cluster(
    standin: Any,
    tmp_path: Path,
    no_ambient_credentials: Path,
    in_cluster: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    standin.kubeconfig(tmp_path / "env")
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "env"))
    _reaches_standin(load_api_client())
    monkeypatch.delenv("KUBECONFIG")
    (no_ambient_credentials / ".kube").mkdir()
    standin.kubeconfig(no_ambient_credentials / ".kube" / "config")
    # A context names a kubeconfig entry, so asking for one skips the service account.
    _reaches_standin(load_api_client(context="standin"))


def test_load_api_client_names_every_source_it_tried(no_ambient_credentials: Path) -> None:
    with pytest.raises(KubeConfigError) as caught:
        load_api_client()
    message = str(caught.value)
    assert "KUBECONFIG (not set)" in message
    assert "in-cluster service account (KUBERNETES_SERVICE_HOST not set)" in message
    assert f"{no_ambient_credentials}/.kube/config (no such file)" in message


def test_load_api_client_reports_a_broken_source_instead_of_falling_through(
    standin: Any, tmp_path: Path, no_ambient_credentials: Path
) -> None:
    with pytest.raises(KubeConfigError, match=r"kubeconfig .*/nope: no such file"):
        load_api_client(str(tmp_path / "nope"))
    standin.kubeconfig(tmp_path / "cfg")
    with pytest.raises(KubeConfigError, match="no-such-context"):
        load_api_client(str(tmp_path / "cfg"), context="no-such-context")


def test_retry_on_conflict_gives_up_after_the_attempts(api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    _put_secret(api, {"n": b"0"})
    stale = _read_secret(api)["metadata"]["resourceVersion"]
    core.patch_namespaced_secret(SECRET, NS, {"data": {"n": "MQ=="}}, _content_type=MERGE_PATCH)
    calls = 0

    def always_stale() -> None:
        nonlocal calls
        calls += 1
        core.patch_namespaced_secret(
            SECRET,
            NS,
            {"metadata": {"resourceVersion": stale}, "data": {}},
            _content_type=MERGE_PATCH,
        )

    with pytest.raises(ApiException) as caught:
        retry_on_conflict(always_stale, attempts=3)
    assert is_conflict(caught.value)
    assert calls == 3
