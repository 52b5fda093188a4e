"""perch-certs on a real API server, run as the chart's certs Jobs run it.

Each test renders the chart for a release of its own (own namespace), applies its ServiceAccounts
and RBAC, and runs the `perch-certs` containers of the chart's Jobs (pre-install, post-install) and
renewal CronJob as processes: their command and args as rendered, with a TokenRequest token of the
Job's ServiceAccount, so the real authorizer judges every call by the chart's rules. One flag is
added to the rendered args: `--ip` with the address the API server reaches the webhook at (a URL
clientConfig to a process on this host; in a cluster it would use the Service's DNS name, which the
certificate carries anyway).

What only a real API server shows, and is shown here:

- the Secret `ensure` creates is accepted as `kubernetes.io/tls`, the CA bundle it injects is the
  one the API server then verifies the webhook's certificate with (a Perch denial comes back),
  running it again writes nothing (resourceVersions unchanged), and a re-created configuration
  gets its bundle back;
- replicas that race (processes started together; two that both read "no Secret" first) settle
  on one certificate: the real server refuses the second create (409 AlreadyExists);
- a merge patch built from a stale read of the webhook configuration is refused (409) by the
  server, and `inject` re-reads and keeps every other field, including another writer's change;
- rotation: past two thirds of its lifetime the certificate is renewed and re-injected, and the
  API server keeps calling the webhook both while it still serves the old certificate and after
  it reloaded the new files (through new TLS connections, forced by a relay);
- the audit log: every request of the Jobs was granted by the chart's RBAC, none got 403, and
  every rule the chart grants them was needed.

This module runs on a control plane of its own (tests/support/controlplane.py), not the
session's: the session registers a Perch webhook for opted-in Deployments in every namespace,
whose denial could pass for this module's webhook's, and these tests create and delete the
chart's cluster-wide webhook configuration `zz-perch.perch.dev`.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from certs.ensure import EnsureResult, ensure
from certs.inject import inject_ca_bundle
from certs.issue import issue
from perch.kube import JSON_PATCH, load_api_client
from tests.support import controlplane
from tests.support.certs_job import (
    CertsRelease,
    Relay,
    Tap,
    bundles,
    certs_release,
    free_port,
    requests_by,
    secret_files,
    start_webhook,
    uses_by,
    wait_called,
    write_cert_files,
)
from tests.support.kubelet import wait_for
from tests.support.webhook_server import Server
from webhook.registration import registration

pytestmark = pytest.mark.cluster

# Where the API server reaches the webhook process: this host, unless the cluster runs elsewhere
# (kind: the Docker bridge's address), as in tests/cluster/conftest.py.
HOST = os.environ.get("PERCH_TEST_WEBHOOK_HOST", "127.0.0.1")
LISTEN = "127.0.0.1" if HOST == "127.0.0.1" else "0.0.0.0"
# 127.0.0.1 too: the tests' own TLS clients reach the webhook there.
EXTRA_IPS = ("127.0.0.1", HOST)
TLS = "kubernetes.io/tls"


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[controlplane.ControlPlane]:
    session = controlplane.start(tmp_path_factory.mktemp("certs-kube"))
    try:
        yield session.plane
    finally:
        session.stop()


@pytest.fixture(scope="module")
def admin(plane: controlplane.ControlPlane) -> client.ApiClient:
    return load_api_client(str(plane.kubeconfig))


@pytest.fixture
def chart(
    plane: controlplane.ControlPlane, admin: client.ApiClient, tmp_path: Path
) -> Iterator[CertsRelease]:
    with certs_release(plane, admin, tmp_path, extra_ips=EXTRA_IPS) as made:
        webhooks = client.AdmissionregistrationV1Api(admin)
        try:
            webhooks.read_mutating_webhook_configuration(made.webhook_config)
        except ApiException as exc:
            if exc.status != 404:
                raise
        else:
            pytest.skip(
                f"MutatingWebhookConfiguration {made.webhook_config} already exists on this "
                "cluster (a Perch installed there?); these tests create and delete it"
            )
        try:
            yield made
        finally:
            try:
                webhooks.delete_mutating_webhook_configuration(made.webhook_config)
            except ApiException as exc:
                if exc.status != 404:
                    raise


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for server in started:
        server.terminate()


def create_config(chart: CertsRelease, *, port: int, ca_bundle: bytes | None = None) -> None:
    """The chart's webhook configuration as helm applies it (no caBundle: perch-certs writes it),
    with a URL to this host and two webhooks, so that "every webhook" means something."""
    config = registration(
        namespace=chart.namespace,
        url=f"https://{HOST}:{port}/mutate",
        ca_bundle=base64.b64encode(ca_bundle).decode() if ca_bundle else "",
        name=chart.webhook_config,
        timeout_seconds=10,
    )
    second = {**config["webhooks"][0], "name": "second.perch.dev"}
    config["webhooks"].append(second)
    client.AdmissionregistrationV1Api(chart.admin).create_mutating_webhook_configuration(config)


def assert_serves(files: dict[str, bytes]) -> x509.Certificate:
    """A pair a webhook can serve, signed by the first CA of the bundle, for the Service's names
    and the webhook's address."""
    leaf = x509.load_pem_x509_certificate(files["tls.crt"])
    leaf.verify_directly_issued_by(x509.load_pem_x509_certificates(files["ca.crt"])[0])
    key = serialization.load_pem_private_key(files["tls.key"], password=None)
    assert key.public_key() == leaf.public_key()
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == set(EXTRA_IPS)
    return leaf


def resource_versions(chart: CertsRelease) -> tuple[str, str]:
    return (
        chart.read_secret()["metadata"]["resourceVersion"],
        chart.read_config()["metadata"]["resourceVersion"],
    )


# --- ensure -------------------------------------------------------------------------------------


def test_ensure_issues_the_secret_and_the_api_server_calls_the_webhook_with_its_ca(
    chart: CertsRelease, servers: list[Server], tmp_path: Path
) -> None:
    port = free_port(LISTEN)
    create_config(chart, port=port)
    post = chart.job("certs-post")
    namespace, name = chart.secret

    first = chart.run(post)

    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith(f"issued Secret {namespace}/{name} (no Secret yet;")
    assert (
        f"injected CA bundle into 2 of 2 webhooks of MutatingWebhookConfiguration "
        f"{chart.webhook_config}" in first.stdout
    )
    secret = chart.read_secret()
    assert secret["type"] == TLS
    assert secret["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "perch"
    files = secret_files(secret)
    assert sorted(files) == ["ca.crt", "tls.crt", "tls.key"]
    assert_serves(files)
    assert bundles(chart.read_config()) == [files["ca.crt"], files["ca.crt"]]

    # The webhook serves what the Secret holds, as a pod mounting it would.
    certs = write_cert_files(files, tmp_path / "mounted")
    servers.append(
        start_webhook(
            tmp_path,
            certs,
            port=port,
            listen=LISTEN,
            kubeconfig=chart.kubeconfigs[f"{chart.release.name}-webhook"],
        )
    )
    wait_called(chart.admin, servers[0], label="issued")

    before = resource_versions(chart)
    again = chart.run(post)

    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith(f"kept Secret {namespace}/{name} (certificate valid until ")
    assert "CA bundle already current in all 2 webhooks" in again.stdout
    assert resource_versions(chart) == before

    # An upgrade that replaces the configuration (no caBundle in the chart's): the next Job run
    # keeps the Secret and gives the new configuration its bundle back.
    client.AdmissionregistrationV1Api(chart.admin).delete_mutating_webhook_configuration(
        chart.webhook_config
    )
    create_config(chart, port=port)
    third = chart.run(post)

    assert third.returncode == 0, third.stderr
    assert third.stdout.startswith(f"kept Secret {namespace}/{name} ")
    assert "injected CA bundle into 2 of 2 webhooks" in third.stdout
    assert secret_files(chart.read_secret()) == files
    wait_called(chart.admin, servers[0], label="recreated")


def test_ensure_processes_started_together_settle_on_one_certificate(
    chart: CertsRelease,
) -> None:
    """Three Job pods starting at once (a pre-upgrade Job and a CronJob run, say). They reach the
    API server through a relay that lets their connections through together, so that their
    start-up times do not space them out."""
    create_config(chart, port=free_port(LISTEN))
    post = chart.job("certs-post")
    api_server = urlsplit(controlplane.server_of(chart.plane.kubeconfig))
    assert api_server.hostname is not None and api_server.port is not None
    gate = Relay("127.0.0.1", api_server.port, upstream=api_server.hostname, gather=3)
    try:
        processes = [chart.start(post, server=gate.url(api_server.hostname)) for _ in range(3)]
        outputs = [process.communicate(timeout=60) for process in processes]
    finally:
        gate.close()

    assert [p.returncode for p in processes] == [0, 0, 0], [err for _, err in outputs]
    actions = sorted(out.split(" ", 1)[0] for out, _ in outputs)
    assert actions == ["issued", "kept", "kept"], outputs
    files = secret_files(chart.read_secret())
    assert_serves(files)
    # The certificate in the Secret is the one whose CA every webhook trusts.
    assert bundles(chart.read_config()) == [files["ca.crt"], files["ca.crt"]]
    if chart.plane.audit_log is not None:
        # They did race: more than one found no Secret, and the server refused the later creates.
        creates = sorted(
            code
            for use, code in requests_by(chart.plane, post.username)
            if (use.resource, use.verb) == ("secrets", "create")
        )
        assert creates[0] == 201 and 409 in creates, creates


def test_a_replica_that_loses_the_create_race_keeps_the_winners_certificate(
    chart: CertsRelease,
) -> None:
    """Both replicas read "no Secret" before either creates one (a barrier after that read):
    the real server refuses the second create with 409, and the loser re-reads and keeps."""
    create_config(chart, port=free_port(LISTEN))
    post = chart.job("certs-post")
    namespace, name = chart.secret
    both_read = threading.Barrier(2, timeout=30)
    results: dict[int, EnsureResult] = {}
    errors: list[BaseException] = []
    taps: list[Tap] = []

    def replica(index: int) -> None:
        api = chart.api_as(post.service_account)
        taps.append(Tap(api, method="GET", path_suffix=f"/secrets/{name}", then=both_read.wait))
        try:
            results[index] = ensure(
                api,
                secret_namespace=namespace,
                secret_name=name,
                service=chart.service,
                namespace=chart.namespace,
                webhook_config=chart.webhook_config,
                ips=[ipaddress.ip_address(ip) for ip in dict.fromkeys(EXTRA_IPS)],
            )
        except BaseException as exc:  # asserted on below
            errors.append(exc)

    threads = [threading.Thread(target=replica, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert errors == []
    assert sorted(r.action for r in results.values()) == ["issued", "kept"]
    creates = sorted(s for tap in taps for s in tap.statuses("POST", "/secrets"))
    assert creates == [201, 409]
    files = secret_files(chart.read_secret())
    assert_serves(files)
    assert bundles(chart.read_config()) == [files["ca.crt"], files["ca.crt"]]
    winner = next(r for r in results.values() if r.action == "issued")
    assert all(r.not_after == winner.not_after for r in results.values())


# --- inject -------------------------------------------------------------------------------------


def _without_bundles(config: dict[str, Any]) -> dict[str, Any]:
    """The configuration apart from what a write changes by itself and the caBundles."""
    meta = {
        k: v
        for k, v in config["metadata"].items()
        if k not in ("resourceVersion", "generation", "managedFields")
    }
    webhooks = []
    for hook in config["webhooks"]:
        client_config = {k: v for k, v in hook["clientConfig"].items() if k != "caBundle"}
        webhooks.append({**hook, "clientConfig": client_config})
    return {**config, "metadata": meta, "webhooks": webhooks}


def test_inject_from_a_stale_read_is_refused_and_retried_keeping_every_other_field(
    chart: CertsRelease,
) -> None:
    """Another writer (a `helm upgrade`, say) removes a webhook between inject's read and its
    patch. The patch, which carries the whole list as read, would bring it back: the server
    refuses it (409, resourceVersion precondition) and inject re-reads and patches again."""
    create_config(chart, port=free_port(LISTEN))
    webhooks = client.AdmissionregistrationV1Api(chart.admin)
    webhooks.patch_mutating_webhook_configuration(
        chart.webhook_config,
        [{"op": "add", "path": "/metadata/annotations", "value": {"team": "platform"}}],
        _content_type=JSON_PATCH,
    )
    concurrent: dict[str, Any] = {}

    def another_writer() -> None:
        webhooks.patch_mutating_webhook_configuration(
            chart.webhook_config,
            [{"op": "remove", "path": "/webhooks/1"}],
            _content_type=JSON_PATCH,
        )
        concurrent.update(chart.read_config())

    post = chart.job("certs-post")
    api = chart.api_as(post.service_account)
    config_path = f"/mutatingwebhookconfigurations/{chart.webhook_config}"
    tap = Tap(api, method="GET", path_suffix=config_path, then=another_writer)
    ca = issue(service=chart.service, namespace=chart.namespace).ca_crt

    result = inject_ca_bundle(api, webhook_config=chart.webhook_config, ca_bundle=ca)

    assert tap.statuses("PATCH", config_path) == [409, 200]
    assert (result.webhooks, result.updated) == (1, 1)
    after = chart.read_config()
    assert [hook["name"] for hook in after["webhooks"]] == ["deployments.perch.dev"]
    assert bundles(after) == [ca]
    # Every other field is as the other writer left it: names, rules, selectors, CEL match
    # conditions, policies, timeouts, labels and annotations.
    assert _without_bundles(after) == _without_bundles(concurrent)


# --- rotation -----------------------------------------------------------------------------------


def test_past_two_thirds_ensure_renews_and_the_api_server_keeps_calling_the_webhook(
    chart: CertsRelease, servers: list[Server], tmp_path: Path
) -> None:
    renewal = chart.job("certs-renewal")
    days = int(next(a for a in renewal.args if a.startswith("--days=")).split("=")[1])
    namespace, name = chart.secret
    # A certificate issued by an earlier run, 250 of its 365 days ago: less than a third left.
    issued_at = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=days * 250 / 365)
    old = issue(
        service=chart.service,
        namespace=chart.namespace,
        ips=[ipaddress.ip_address(ip) for ip in dict.fromkeys(EXTRA_IPS)],
        days=days,
        now=issued_at,
    )
    old_files = {"ca.crt": old.ca_crt, "tls.crt": old.tls_crt, "tls.key": old.tls_key}
    client.CoreV1Api(chart.admin).create_namespaced_secret(
        namespace,
        {
            "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "perch"}},
            "type": TLS,
            "data": {k: base64.b64encode(v).decode() for k, v in old_files.items()},
        },
    )
    mounted = tmp_path / "mounted"
    certs = write_cert_files(old_files, mounted)
    webhook_port = free_port(LISTEN)
    server = start_webhook(
        tmp_path,
        certs,
        port=webhook_port,
        listen=LISTEN,
        kubeconfig=chart.kubeconfigs[f"{chart.release.name}-webhook"],
    )
    servers.append(server)
    relay = Relay(LISTEN, webhook_port)
    try:
        create_config(chart, port=relay.port, ca_bundle=old.ca_crt)
        wait_called(chart.admin, server, label="old")

        renewed = chart.run(renewal)

        assert renewed.returncode == 0, renewed.stderr
        assert renewed.stdout.startswith(
            f"renewed Secret {namespace}/{name} (old certificate: only "
        )
        assert f"of its {days}d left; new one valid until " in renewed.stdout
        assert "injected CA bundle into 2 of 2 webhooks" in renewed.stdout
        files = secret_files(chart.read_secret())
        leaf = assert_serves(files)
        assert files["tls.crt"] != old.tls_crt
        assert leaf.not_valid_after_utc - datetime.datetime.now(datetime.UTC) > datetime.timedelta(
            days=days - 1
        )
        # Until the pods see the new Secret they serve the old certificate: its CA stays trusted.
        assert files["ca.crt"].endswith(old.ca_crt)
        assert bundles(chart.read_config()) == [files["ca.crt"], files["ca.crt"]]

        # Still the old certificate, checked by the API server on a new connection against the
        # bundle just injected.
        accepted = relay.accepted
        relay.cut()
        wait_called(chart.admin, server, label="renewed-not-reloaded")
        assert relay.accepted > accepted, "the API server did not open a new connection"

        # The Secret volume updates; the webhook reloads the files.
        write_cert_files(files, mounted)
        new_serial = leaf.serial_number
        wait_for(
            lambda: server.serial_of_new_connection() == new_serial,
            what="the webhook to serve the renewed certificate",
        )
        accepted = relay.accepted
        relay.cut()
        wait_called(chart.admin, server, label="reloaded")
        assert relay.accepted > accepted, "the API server did not open a new connection"
    finally:
        relay.close()


# --- RBAC -----------------------------------------------------------------------------------------


def test_the_certs_jobs_make_only_requests_the_chart_grants_them(
    chart: CertsRelease,
) -> None:
    """helm install runs the pre-install Job (Secret only), applies the webhook configuration,
    runs the post-install Job (the bundle); the CronJob later renews an old certificate."""
    pre, post, renewal = (
        chart.job("certs-pre"),
        chart.job("certs-post"),
        chart.job("certs-renewal"),
    )
    assert not any(a.startswith("--webhook-config") for a in pre.args)

    first = chart.run(pre)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("issued Secret ")
    assert "CA bundle" not in first.stdout

    create_config(chart, port=free_port(LISTEN))
    second = chart.run(post)
    assert second.returncode == 0, second.stderr
    assert second.stdout.startswith("kept Secret ")
    assert "injected CA bundle into 2 of 2 webhooks" in second.stdout

    namespace, name = chart.secret
    old = issue(
        service=chart.service,
        namespace=chart.namespace,
        ips=[ipaddress.ip_address(ip) for ip in dict.fromkeys(EXTRA_IPS)],
        now=datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=300),
    )
    old_files = {"ca.crt": old.ca_crt, "tls.crt": old.tls_crt, "tls.key": old.tls_key}
    client.CoreV1Api(chart.admin).patch_namespaced_secret(
        name, namespace, {"data": {k: base64.b64encode(v).decode() for k, v in old_files.items()}}
    )
    third = chart.run(renewal)
    assert third.returncode == 0, third.stderr
    assert third.stdout.startswith("renewed Secret ")

    if chart.plane.audit_log is None:
        pytest.skip(
            "the cluster was not started by this session (PERCH_TEST_KUBECONFIG): no audit log "
            "to read; the Jobs ran with the chart's RBAC without error"
        )
    used: list[tuple[str, str, str]] = []
    granted: set[tuple[str, str, str]] = set()
    for job in (pre, renewal):  # pre and post share one ServiceAccount
        access = chart.access(job.service_account)
        uses, codes = uses_by(chart.plane, job.username)
        assert uses, f"the audit log has no request by {job.username}"
        assert codes[403] == 0, f"{job.username} was refused: {codes}"
        denied = sorted({u for u in uses if not access.allows(u)})
        assert denied == [], f"{job.username} made requests the chart does not grant: {denied}"
        used += [u.permission for u in uses]
        granted |= access.permissions()
    # Between them the Jobs needed every permission the chart gives them.
    assert granted - set(used) == set()
