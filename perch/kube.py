"""Kubernetes client helpers shared by the webhook, the analyzer and certs.

The pure core never imports this module (an import-linter contract says so); the services' I/O
shells do.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, TypeVar

import urllib3
import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

__all__ = [
    "JSON_PATCH",
    "MERGE_PATCH",
    "ApiException",
    "KubeConfigError",
    "describe_api_error",
    "is_conflict",
    "is_not_found",
    "load_api_client",
    "response_json",
    "retry_on_conflict",
]

# The client picks json-patch for every PATCH unless told otherwise, whatever the body's shape,
# so each call site names the patch type it means.
JSON_PATCH = "application/json-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"
MERGE_PATCH = "application/merge-patch+json"

SERVICE_ACCOUNT_TOKEN = Path(config.incluster_config.SERVICE_TOKEN_FILENAME)
SERVICE_ACCOUNT_CA = Path(config.incluster_config.SERVICE_CERT_FILENAME)
DEFAULT_KUBECONFIG = "~/.kube/config"

T = TypeVar("T")


class KubeConfigError(Exception):
    """No usable credentials for the Kubernetes API; the message names every source tried."""


def load_api_client(
    kubeconfig: str | None = None, *, context: str | None = None
) -> client.ApiClient:
    """An ApiClient for the cluster the caller means, resolved in this order:

    1. ``kubeconfig``, the explicit path (a ``--kubeconfig`` flag);
    2. the ``KUBECONFIG`` environment variable (a path list, merged as kubectl merges it);
    3. the pod's service account (in-cluster), unless a ``context`` was asked for;
    4. ``~/.kube/config``.

    ``KUBECONFIG`` comes before in-cluster because setting it inside a pod is deliberate, while the
    service account is ambient (the order of controller-runtime's ``GetConfig``). A source that
    exists but is broken is an error, not a reason to fall through to the next one: kubectl does not
    silently talk to another cluster either. The global ``client.Configuration`` is never touched,
    so several clients can coexist in one process.
    """
    if kubeconfig:
        if not Path(kubeconfig).expanduser().is_file():
            raise KubeConfigError(f"kubeconfig {kubeconfig}: no such file")
        return _from_kubeconfig(kubeconfig, context=context, source=f"kubeconfig {kubeconfig}")

    tried: list[str] = []
    env = os.environ.get("KUBECONFIG", "")
    paths = [p for p in env.split(os.pathsep) if p]
    existing = [p for p in paths if Path(p).expanduser().is_file()]
    if existing:
        return _from_kubeconfig(
            os.pathsep.join(existing), context=context, source=f"KUBECONFIG={env}"
        )
    tried.append(f"KUBECONFIG={env} (no such file)" if paths else "KUBECONFIG (not set)")

    in_cluster, why_not = _in_cluster_possible()
    if in_cluster and context is None:
        return _in_cluster()
    tried.append(
        f"in-cluster service account ({why_not})"
        if context is None
        else f"in-cluster service account (skipped: --context {context} names a kubeconfig entry)"
    )

    home = Path(DEFAULT_KUBECONFIG).expanduser()
    if home.is_file():
        return _from_kubeconfig(str(home), context=context, source=str(home))
    tried.append(f"{home} (no such file)")

    raise KubeConfigError(
        "no Kubernetes credentials found; tried "
        + ", ".join(tried)
        + "; pass --kubeconfig or set KUBECONFIG"
    )


# Connections kept open to the API server per process. The client library's default (5 per CPU)
# is fewer than a webhook worker uses at once: each of its threads reads up to seven objects in
# parallel, and every connection beyond the pool is a new TLS handshake that is then thrown away.
CONNECTION_POOL_SIZE: Final = 32


def _api_client(configuration: client.Configuration) -> client.ApiClient:
    configuration.connection_pool_maxsize = max(
        configuration.connection_pool_maxsize or 0, CONNECTION_POOL_SIZE
    )
    return client.ApiClient(configuration=configuration)


def _from_kubeconfig(path: str, *, context: str | None, source: str) -> client.ApiClient:
    configuration = client.Configuration()
    try:
        # persist_config=False: refreshing a token must not rewrite the user's kubeconfig.
        config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=path,
            context=context,
            client_configuration=configuration,
            persist_config=False,
        )
    except (config.ConfigException, OSError, yaml.YAMLError, KeyError, TypeError) as exc:
        raise KubeConfigError(f"{source}: {_one_line(exc)}") from exc
    return _api_client(configuration)


def _in_cluster_possible() -> tuple[bool, str]:
    if not os.environ.get("KUBERNETES_SERVICE_HOST"):
        return False, "KUBERNETES_SERVICE_HOST not set"
    if not SERVICE_ACCOUNT_TOKEN.is_file():
        return False, f"{SERVICE_ACCOUNT_TOKEN} missing"
    return True, ""


def _in_cluster() -> client.ApiClient:
    configuration = client.Configuration()
    try:
        # try_refresh_token: bound service account tokens rotate; the loader re-reads the file.
        config.incluster_config.InClusterConfigLoader(  # type: ignore[no-untyped-call]
            token_filename=str(SERVICE_ACCOUNT_TOKEN),
            cert_filename=str(SERVICE_ACCOUNT_CA),
            try_refresh_token=True,
        ).load_and_set(configuration)
    except (config.ConfigException, OSError) as exc:
        raise KubeConfigError(f"in-cluster service account: {_one_line(exc)}") from exc
    return _api_client(configuration)


def is_not_found(exc: BaseException) -> bool:
    return isinstance(exc, ApiException) and exc.status == 404


def is_conflict(exc: BaseException) -> bool:
    """A 409: a stale resourceVersion, or a create that lost a race (AlreadyExists)."""
    return isinstance(exc, ApiException) and exc.status == 409


def retry_on_conflict(fn: Callable[[], T], *, attempts: int = 5) -> T:
    """Run ``fn`` again while the API answers 409; ``fn`` must re-read what it writes.

    After ``attempts`` conflicts the last ApiException propagates.
    """
    if attempts < 1:
        raise ValueError("attempts must be at least 1")
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except ApiException as exc:
            if not is_conflict(exc) or attempt == attempts:
                raise
        # Jitter, so that two writers who collided do not collide again in lockstep.
        time.sleep(random.uniform(0, 0.02 * attempt))  # noqa: S311 - not a secret
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises


def response_json(response: Any) -> dict[str, Any]:
    """The wire-format object of a response fetched with ``_preload_content=False``.

    Reading raw JSON instead of client models keeps fields the client does not know (newer API
    versions) and base64 fields as the API sends them, so a read-modify-write loses nothing.
    """
    try:
        raw: bytes = response.data
    finally:
        response.release_conn()
    decoded = json.loads(raw)
    if not isinstance(decoded, dict):
        raise ValueError(f"expected a JSON object from the Kubernetes API, got {type(decoded)}")
    return decoded


def describe_api_error(exc: BaseException) -> str:
    """One line for a human: the API's own message, or why the API was unreachable."""
    if isinstance(exc, ApiException):
        message = ""
        if exc.body:
            try:
                status = json.loads(exc.body)
                message = str(status.get("message", "")) if isinstance(status, dict) else ""
            except ValueError:
                message = str(exc.body)
        head = f"Kubernetes API answered {exc.status} {exc.reason or ''}".rstrip()
        return _one_line(f"{head}: {message}" if message else head)
    if isinstance(exc, urllib3.exceptions.MaxRetryError):
        # The reason names host and port; exc.url is only the path.
        return _one_line(f"cannot reach the Kubernetes API: {exc.reason}")
    return _one_line(f"cannot reach the Kubernetes API: {exc}")


def _one_line(value: object) -> str:
    return " ".join(str(value).split())
