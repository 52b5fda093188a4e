"""`perch-certs` run the way the chart's certs Jobs run it, against a real API server.

- :class:`CertsRelease` renders the chart for one release, applies its ServiceAccounts and RBAC
  (as tests/support/install.py does), mints a TokenRequest kubeconfig for each certs Job's
  ServiceAccount and runs the Jobs' containers (`command` + `args` from the rendered Job or CronJob)
  as processes with that kubeconfig. It waits until the authorizer grants each account what its
  bindings say, so that no first request races the RBAC cache into a 403.
- :func:`start_webhook` starts `perch-webhook` on certificate files the test wrote (from the Secret
  `perch-certs ensure` keeps), with the command line of tests/support/webhook_server.py.
- :func:`probe` asks the API server to admit an opted-in Deployment with an invalid
  `perch.dev/spec` (dry run): Perch denies it, so a 403 carrying Perch's message proves that the
  API server called the webhook over TLS and trusted its certificate.
- :class:`Relay` is a TCP relay. Between the API server and the webhook, cutting its connections
  makes the API server open new ones, i.e. verify the webhook's certificate again; in front of
  the API server it can hold several clients' connections and let them through together.
- :class:`Tap` runs something right after a given request of an ApiClient was answered (another
  writer's real write between perch-certs' read and its write) and records every status.
- :func:`requests_by` and :func:`uses_by` turn the audit log's events of one user into `Use`s
  (with response codes), as tests/cluster/test_least_privilege.py does.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import socket
import subprocess
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from certs.issue import IssuedCertificate, write_files
from perch.kube import load_api_client, response_json
from tests.support.chart import Access, Release, Use, render
from tests.support.controlplane import ControlPlane, repoint
from tests.support.install import apply, kubeconfig_for, opted_in_deployment
from tests.support.kubelet import wait_for
from tests.support.relay import splice
from tests.support.webhook_server import (
    NOT_READY_FILE_ENV,
    PERCH_APP,
    REPO,
    CertFiles,
    Server,
    certs_command,
    server_command,
    server_env,
)

RBAC_KINDS = ("ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")
CLI_TIMEOUT = 60.0
PROBE_NAMESPACE = "default"
AUTHORIZED_DEADLINE = 30.0
CALLED_DEADLINE = 30.0
GATHER_DEADLINE = 20.0


# --- the chart's certs Jobs ---------------------------------------------------------------------


@dataclass(frozen=True)
class CertsJob:
    """One container of the chart that runs perch-certs: a Job or the renewal CronJob."""

    kind: str
    name: str
    service_account: str
    namespace: str
    command: tuple[str, ...]
    args: tuple[str, ...]

    @property
    def username(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.service_account}"


def certs_jobs(release: Release) -> dict[str, CertsJob]:
    """Every Job and CronJob of the release whose container runs perch-certs, by name."""
    found: dict[str, CertsJob] = {}
    for owner, pod, container in release.containers():
        if container.get("command", [None])[0] != "perch-certs":
            continue
        meta = owner["metadata"]
        found[meta["name"]] = CertsJob(
            kind=owner["kind"],
            name=meta["name"],
            service_account=pod["serviceAccountName"],
            namespace=meta["namespace"],
            command=tuple(container["command"]),
            args=tuple(container["args"]),
        )
    return found


def arg(args: Sequence[str], flag: str) -> str:
    """The value of `--flag=value` among the rendered args."""
    values = [a.split("=", 1)[1] for a in args if a.startswith(f"{flag}=")]
    assert len(values) == 1, f"{flag} appears {len(values)} times in {list(args)}"
    return values[0]


@dataclass
class CertsRelease:
    """One release of the chart, its certs RBAC applied, with a kubeconfig per ServiceAccount."""

    plane: ControlPlane
    admin: client.ApiClient
    release: Release
    directory: Path
    # --ip flags perch-certs gets beyond the chart's args: the API server reaches the webhook by
    # URL at an IP address here, not through the Service's DNS name.
    extra_ips: tuple[str, ...]
    kubeconfigs: dict[str, Path] = field(default_factory=dict)

    @property
    def namespace(self) -> str:
        return self.release.namespace

    @property
    def jobs(self) -> dict[str, CertsJob]:
        return certs_jobs(self.release)

    def job(self, suffix: str) -> CertsJob:
        """The Job (or CronJob) named `<fullname>-<suffix>`, e.g. "certs-post"."""
        return self.jobs[f"{self.release.name}-{suffix}"]

    @property
    def secret(self) -> tuple[str, str]:
        namespace, _, name = arg(self.job("certs-post").args, "--secret").partition("/")
        return namespace, name

    @property
    def service(self) -> str:
        return arg(self.job("certs-post").args, "--service")

    @property
    def webhook_config(self) -> str:
        return arg(self.job("certs-post").args, "--webhook-config")

    def argv(self, job: CertsJob) -> list[str]:
        return [*job.args, *(f"--ip={ip}" for ip in self.extra_ips)]

    def env(self, job: CertsJob) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
        env["KUBECONFIG"] = str(self.kubeconfigs[job.service_account])
        return env

    def start(self, job: CertsJob, *, server: str | None = None) -> subprocess.Popen[str]:
        """The Job's container as a process: its command and args, its ServiceAccount's token;
        `server` sends it to another address of the API server (a relay)."""
        assert job.command == ("perch-certs",), job.command
        env = self.env(job)
        if server is not None:
            kubeconfig = self.directory / f"{job.service_account}-{uuid.uuid4().hex[:6]}.kubeconfig"
            shutil.copyfile(env["KUBECONFIG"], kubeconfig)
            repoint(kubeconfig, server=server)
            env["KUBECONFIG"] = str(kubeconfig)
        return subprocess.Popen(
            [*certs_command(), *self.argv(job)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def run(self, job: CertsJob) -> subprocess.CompletedProcess[str]:
        process = self.start(job)
        try:
            stdout, stderr = process.communicate(timeout=CLI_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)

    def api_as(self, service_account: str) -> client.ApiClient:
        return load_api_client(str(self.kubeconfigs[service_account]))

    def access(self, service_account: str) -> Access:
        return Access(self.release, service_account=service_account, namespace=self.namespace)

    # --- reading what perch-certs wrote, as admin ---

    def read_secret(self) -> dict[str, Any]:
        namespace, name = self.secret
        return response_json(
            client.CoreV1Api(self.admin).read_namespaced_secret(
                name, namespace, _preload_content=False
            )
        )

    def read_config(self) -> dict[str, Any]:
        return response_json(
            client.AdmissionregistrationV1Api(self.admin).read_mutating_webhook_configuration(
                self.webhook_config, _preload_content=False
            )
        )


def secret_files(secret: Mapping[str, Any]) -> dict[str, bytes]:
    return {key: base64.b64decode(value) for key, value in secret["data"].items()}


def bundles(config: Mapping[str, Any]) -> list[bytes | None]:
    """Each webhook's caBundle, decoded; None where it has none."""
    found: list[bytes | None] = []
    for hook in config["webhooks"]:
        bundle = (hook.get("clientConfig") or {}).get("caBundle")
        found.append(base64.b64decode(bundle) if bundle else None)
    return found


@contextlib.contextmanager
def certs_release(
    plane: ControlPlane,
    admin: client.ApiClient,
    directory: Path,
    *,
    extra_ips: Sequence[str],
    values: Mapping[str, Any] | None = None,
) -> Iterator[CertsRelease]:
    """A release of its own (name and namespace unique), its ServiceAccounts and RBAC applied."""
    suffix = uuid.uuid4().hex[:6]
    release = render(values or {}, name=f"perch-{suffix}", namespace=f"certs-{suffix}")
    core = client.CoreV1Api(admin)
    core.create_namespace({"metadata": {"name": release.namespace}})
    rbac = [o for o in release.objects if o["kind"] in RBAC_KINDS]
    made = CertsRelease(plane, admin, release, directory, tuple(dict.fromkeys(extra_ips)))
    try:
        apply(admin, rbac)
        accounts = {o["metadata"]["name"] for o in release.find("ServiceAccount")}
        for account in sorted(accounts):
            identity = kubeconfig_for(
                admin,
                plane.kubeconfig,
                service_account=account,
                namespace=release.namespace,
                out=directory / f"{account}.kubeconfig",
            )
            made.kubeconfigs[account] = identity.kubeconfig
        for job in made.jobs.values():
            wait_authorized(admin, made.access(job.service_account), job)
        yield made
    finally:
        with contextlib.suppress(ApiException):
            core.delete_namespace(release.namespace)
        rbac_api = client.RbacAuthorizationV1Api(admin)
        for obj in rbac:
            with contextlib.suppress(ApiException):
                if obj["kind"] == "ClusterRole":
                    rbac_api.delete_cluster_role(obj["metadata"]["name"])
                elif obj["kind"] == "ClusterRoleBinding":
                    rbac_api.delete_cluster_role_binding(obj["metadata"]["name"])


def wait_authorized(admin: client.ApiClient, access: Access, job: CertsJob) -> None:
    """Until the authorizer grants the account every rule of its bindings (the RBAC cache fills
    from a watch, so a binding just created may not count yet)."""
    authz = client.AuthorizationV1Api(admin)
    groups = ["system:serviceaccounts", f"system:serviceaccounts:{job.namespace}"]
    for grant in access.grants:
        attributes = {
            "group": grant.group,
            "resource": grant.resource,
            "verb": grant.verb,
            **({"namespace": grant.scope} if grant.scope != "*" else {}),
            **({"name": sorted(grant.names)[0]} if grant.names else {}),
        }
        review = {
            "spec": {"user": job.username, "groups": groups, "resourceAttributes": attributes}
        }

        def allowed(review: dict[str, Any] = review) -> bool:
            answer = authz.create_subject_access_review(review)
            return bool(answer.status.allowed)

        wait_for(
            allowed,
            what=f"RBAC to grant {job.username} {attributes}",
            deadline=AUTHORIZED_DEADLINE,
        )


# --- the webhook, serving what perch-certs issued ------------------------------------------------


def write_cert_files(files: Mapping[str, bytes], directory: Path) -> CertFiles:
    """The Secret's three keys as files, each replaced atomically (the product's own writer), the
    way a Secret volume updates them."""
    write_files(
        IssuedCertificate(
            ca_crt=files["ca.crt"], tls_crt=files["tls.crt"], tls_key=files["tls.key"]
        ),
        directory,
    )
    serial = x509.load_pem_x509_certificate(files["tls.crt"]).serial_number
    return CertFiles(
        ca=directory / "ca.crt",
        cert=directory / "tls.crt",
        key=directory / "tls.key",
        serial=serial,
    )


def free_port(listen: str) -> int:
    with socket.socket() as sock:
        sock.bind((listen, 0))
        return int(sock.getsockname()[1])


def start_webhook(
    directory: Path, certs: CertFiles, *, port: int, listen: str, kubeconfig: Path
) -> Server:
    """`perch-webhook` with the command line of webhook_server.start_server, on `certs`.

    One worker: a certificate reload is then one event, not one per worker."""
    log_path = directory / "server.log"
    log_file = log_path.open("wb")
    not_ready = directory / "not-ready"
    process = subprocess.Popen(
        [
            *server_command(),
            "--bind",
            f"{listen}:{port}",
            "--certfile",
            str(certs.cert),
            "--keyfile",
            str(certs.key),
            "--workers",
            "1",
            "--threads",
            "4",
            "--app",
            PERCH_APP,
        ],
        cwd=REPO,
        env=server_env({NOT_READY_FILE_ENV: str(not_ready), "KUBECONFIG": str(kubeconfig)}),
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    server = Server(
        certs=certs,
        port=port,
        process=process,
        log_path=log_path,
        not_ready_file=not_ready,
        _log_file=log_file,
    )
    try:
        server.wait_until_serving()
    except BaseException:
        server.terminate()
        raise
    return server


@dataclass(frozen=True)
class Answer:
    status: int  # 201: admitted (no webhook called); 403: denied; 500: the call failed
    message: str


def probe(admin: client.ApiClient, name: str) -> Answer:
    """A dry-run create of an opted-in Deployment whose perch.dev/spec does not parse."""
    try:
        client.AppsV1Api(admin).create_namespaced_deployment(
            PROBE_NAMESPACE, opted_in_deployment(name), dry_run="All", _request_timeout=30
        )
    except ApiException as exc:
        try:
            message = str(json.loads(exc.body)["message"])
        except (TypeError, ValueError, KeyError):
            message = str(exc.body or exc.reason)
        return Answer(exc.status, message)
    return Answer(201, "admitted")


def denied_by_perch(answer: Answer) -> bool:
    return answer.status == 403 and "perch: invalid" in answer.message


def wait_called(admin: client.ApiClient, server: Server, *, label: str) -> Answer:
    """Until the API server calls `server`: a probe is denied with Perch's message, and the
    webhook's own log has the review of that very probe. Returns the last answer; fails with
    the last failure (e.g. the API server's x509 error) when that never happens."""
    seen: list[Answer] = []
    count = 0

    def called() -> Answer | None:
        nonlocal count
        count += 1
        name = f"probe-{label}-{count}"
        answer = probe(admin, name)
        seen.append(answer)
        if denied_by_perch(answer) and reviewed(server, name):
            return answer
        return None

    try:
        return wait_for(
            called,
            what=f"the API server to call the webhook ({label})",
            deadline=CALLED_DEADLINE,
            every=0.2,
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last answers: {seen[-3:]}") from None


def reviewed(server: Server, name: str) -> bool:
    """The webhook logged its decision on the Deployment `name` (logged before it answers)."""
    return any(
        line.get("name") == name and line.get("decision") == "denied-spec"
        for line in server.log_lines()
    )


class Relay:
    """A TCP relay; TLS stays end to end.

    In front of the webhook, `cut()` closes every relayed connection, so that the API server's
    next call opens a new one and checks the certificate anew. In front of the API server,
    `gather=N` holds the first N connections (their TLS handshakes wait in the socket buffers)
    until all N have arrived, then lets them through at once: processes started together then
    reach the API server together, whatever their start-up times."""

    def __init__(
        self, listen: str, upstream_port: int, *, upstream: str = "127.0.0.1", gather: int = 0
    ) -> None:
        self.upstream = (upstream, upstream_port)
        self._server = socket.create_server((listen, 0))
        self.port: int = self._server.getsockname()[1]
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._held: list[tuple[socket.socket, socket.socket]] = []
        self._gather = gather
        self.accepted = 0
        self._closed = False
        threading.Thread(target=self._accept, name="relay", daemon=True).start()
        if gather:
            # Never hold for ever: a process that died before connecting must not hang the rest.
            release = threading.Timer(GATHER_DEADLINE, self._release)
            release.daemon = True
            release.start()

    def url(self, host: str = "127.0.0.1") -> str:
        return f"https://{host}:{self.port}"

    def cut(self) -> None:
        with self._lock:
            cut, self._open = self._open, set()
        for conn in cut:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def close(self) -> None:
        self._closed = True
        self._server.close()
        self.cut()

    def _accept(self) -> None:
        while not self._closed:
            try:
                down, _ = self._server.accept()
            except OSError:
                return
            try:
                up = socket.create_connection(self.upstream, timeout=5)
                up.settimeout(None)
            except OSError:
                down.close()
                continue
            with self._lock:
                self.accepted += 1
                self._open |= {down, up}
                held = bool(self._gather)
                if held:
                    self._held.append((down, up))
                complete = held and len(self._held) >= self._gather
            if complete:
                self._release()
            elif not held:
                self._start(down, up)

    def _release(self) -> None:
        with self._lock:
            held, self._held, self._gather = self._held, [], 0
        for down, up in held:
            self._start(down, up)

    def _start(self, down: socket.socket, up: socket.socket) -> None:
        splice(down, up, closed=self._closed_pair)

    def _closed_pair(self, pair: set[socket.socket]) -> None:
        with self._lock:
            self._open -= pair


# --- between a read and a write -------------------------------------------------------------------


class Tap:
    """Wraps an ApiClient's `call_api` (every typed API goes through it): requests go out
    unchanged; each answer's status is recorded as (verb, path, status), and `then` runs once,
    right after the first request with `method` whose path ends with `path_suffix` was answered
    (whether with success or an error)."""

    def __init__(
        self,
        api_client: client.ApiClient,
        *,
        method: str,
        path_suffix: str,
        then: Callable[[], None],
    ) -> None:
        self.calls: list[tuple[str, str, int]] = []
        self._lock = threading.Lock()
        self._fired = False
        send = api_client.call_api

        def call_api(verb: str, url: str, *args: Any, **kwargs: Any) -> Any:
            path = urlsplit(url).path
            matches = verb == method and path.endswith(path_suffix)
            try:
                answer = send(verb, url, *args, **kwargs)
            except ApiException as exc:
                self._record(verb, path, exc.status)
                if matches:
                    self._fire(then)
                raise
            # perch-certs reads raw responses (_preload_content=False): urllib3's, with a status.
            status = getattr(answer, "status", None)
            self._record(verb, path, status if isinstance(status, int) else 200)
            if matches:
                self._fire(then)
            return answer

        api_client.call_api = call_api  # type: ignore[method-assign]

    def _record(self, verb: str, path: str, status: int) -> None:
        with self._lock:
            self.calls.append((verb, path, status))

    def _fire(self, then: Callable[[], None]) -> None:
        with self._lock:
            if self._fired:
                return
            self._fired = True
        then()

    def statuses(self, method: str, path_suffix: str) -> list[int]:
        with self._lock:
            return [s for v, p, s in self.calls if v == method and p.endswith(path_suffix)]


# --- the audit log ------------------------------------------------------------------------------


def requests_by(plane: ControlPlane, username: str) -> list[tuple[Use, int]]:
    """Each resource request of `username` in the audit log, with its response code."""
    found: list[tuple[Use, int]] = []
    for event in plane.audit_events():
        ref = event.get("objectRef")
        if (event.get("user") or {}).get("username") != username or not ref:
            continue
        resource = ref["resource"] + (f"/{ref['subresource']}" if ref.get("subresource") else "")
        use = Use(
            ref.get("apiGroup", ""), resource, event["verb"], ref.get("namespace"), ref.get("name")
        )
        found.append((use, int((event.get("responseStatus") or {}).get("code") or 0)))
    return found


def uses_by(plane: ControlPlane, username: str) -> tuple[list[Use], Counter[int]]:
    """What `username` asked for, as tests/cluster/test_least_privilege.py reads it, and the
    response codes of all its requests (non-resource ones too)."""
    codes: Counter[int] = Counter(
        int((event.get("responseStatus") or {}).get("code") or 0)
        for event in plane.audit_events()
        if (event.get("user") or {}).get("username") == username
    )
    return [use for use, _ in requests_by(plane, username)], codes
