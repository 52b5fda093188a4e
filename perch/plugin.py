"""`kubectl perch`: promote, abort, retry, pause or resume a canary, and show canaries.

Installed as the console script `kubectl-perch`, which kubectl finds on PATH as a plugin. It only
sets the `perch.dev/action` annotation on the Deployment (the analyzer acts and clears it), so git
keeps owning the spec.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from kubernetes import config
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from perch.kube import (
    DEFAULT_KUBECONFIG,
    SERVICE_ACCOUNT_TOKEN,
    KubeConfigError,
    describe_api_error,
    load_api_client,
)
from perch.names import ANNOTATION_ACTION, is_opted_in
from perch.resources import CANARIES, DEPLOYMENTS, Kube
from perch.status import CanaryStatus

ACTIONS = ("promote", "abort", "retry", "pause", "resume")
COLUMNS = (
    "NAMESPACE",
    "NAME",
    "STATUS",
    "WEIGHT",
    "FAILEDCHECKS",
    "REVISION",
    "LASTTRANSITIONTIME",
)


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def status_rows(canaries: Sequence[dict[str, Any]]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = [COLUMNS]
    for obj in sorted(canaries, key=lambda o: (o["metadata"]["namespace"], o["metadata"]["name"])):
        s = CanaryStatus.from_wire(obj.get("status"))
        rows.append(
            (
                obj["metadata"]["namespace"],
                obj["metadata"]["name"],
                s.phase + (" (paused)" if s.paused else ""),
                str(s.canary_weight),
                str(s.failed_checks),
                s.canary_revision or "-",
                s.last_transition_time or "-",
            )
        )
    return rows


def request_action(kube: Kube, *, namespace: str, name: str, action: str) -> None:
    deployment = kube.get(DEPLOYMENTS, namespace, name)
    if deployment is None:
        raise LookupError(f"deployment {namespace}/{name} not found")
    if not is_opted_in((deployment.get("metadata") or {}).get("annotations")):
        raise LookupError(f"deployment {namespace}/{name} is not opted in to Perch")
    kube.merge_patch(
        DEPLOYMENTS, namespace, name, {"metadata": {"annotations": {ANNOTATION_ACTION: action}}}
    )


def _global_flags() -> argparse.ArgumentParser:
    """-n, -A and --kubeconfig, accepted before and after the subcommand as kubectl accepts them.

    SUPPRESS as default: a subparser's defaults overwrite what the top-level parser stored, so
    only a flag actually given may set its value (the one after the subcommand wins).
    """
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument(
        "-n",
        "--namespace",
        default=argparse.SUPPRESS,
        help="the namespace (default: the kubeconfig context's, else default)",
    )
    flags.add_argument(
        "-A",
        "--all-namespaces",
        action="store_true",
        default=argparse.SUPPRESS,
        help="status: canaries of every namespace",
    )
    flags.add_argument("--kubeconfig", default=argparse.SUPPRESS, help="the kubeconfig file")
    return flags


def context_namespace(kubeconfig: str | None) -> str:
    """The namespace -n defaults to, as for kubectl: the current context's, else "default".

    The kubeconfig is found as load_api_client finds it; in a pod without one, the service
    account's namespace. Unreadable or missing configuration is not an error here: loading the
    client reports it, naming every source tried.
    """
    if kubeconfig:
        paths = [kubeconfig]
    else:
        env = [p for p in os.environ.get("KUBECONFIG", "").split(os.pathsep) if p]
        paths = [p for p in env if Path(p).expanduser().is_file()]
        if (
            not paths
            and os.environ.get("KUBERNETES_SERVICE_HOST")
            and SERVICE_ACCOUNT_TOKEN.is_file()
        ):
            try:
                return SERVICE_ACCOUNT_TOKEN.with_name("namespace").read_text().strip() or "default"
            except OSError:
                return "default"
        paths = paths or [str(Path(DEFAULT_KUBECONFIG).expanduser())]
    try:
        _, current = config.list_kube_config_contexts(  # type: ignore[no-untyped-call]
            config_file=os.pathsep.join(paths)
        )
        namespace = current["context"].get("namespace")
    except (
        config.ConfigException,
        OSError,
        yaml.YAMLError,
        LookupError,
        TypeError,
        AttributeError,
    ):
        return "default"
    return namespace if isinstance(namespace, str) and namespace else "default"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kubectl perch",
        description=__doc__.split("\n\n")[0],
        parents=[_global_flags()],
    )
    sub = parser.add_subparsers(dest="command", required=True)
    flags = [_global_flags()]
    status = sub.add_parser(
        "status", help="show canaries (all of a namespace, or one)", parents=flags
    )
    status.add_argument("name", nargs="?")
    for action in ACTIONS:
        p = sub.add_parser(
            action,
            help=f"ask the analyzer to {action} the canary of a Deployment",
            parents=flags,
        )
        p.add_argument("name")
    args = parser.parse_args(argv)
    all_namespaces: bool = getattr(args, "all_namespaces", False)
    kubeconfig: str | None = getattr(args, "kubeconfig", None)
    if all_namespaces and args.command != "status":
        parser.error(f"-A/--all-namespaces only applies to status, not to {args.command}")
    if all_namespaces and args.name:
        # kubectl's rule too: a name means one object, which lives in one namespace.
        parser.error("-A/--all-namespaces lists every canary; give -n NAMESPACE with a name")
    namespace: str = args.namespace if "namespace" in args else context_namespace(kubeconfig)
    try:
        kube = Kube(load_api_client(kubeconfig), timeout=10, field_manager="kubectl-perch")
        if args.command == "status":
            if args.name:
                found = kube.get(CANARIES, namespace, args.name)
                if found is None:
                    raise LookupError(f"canary {namespace}/{args.name} not found")
                canaries = [found]
            else:
                canaries = kube.list_objects(CANARIES, None if all_namespaces else namespace)
            if not canaries:
                print("No canaries found.")
                return 0
            print(_table(status_rows(canaries)))
            return 0
        request_action(kube, namespace=namespace, name=args.name, action=args.command)
        print(
            f"deployment.apps/{args.name} annotated {ANNOTATION_ACTION}={args.command}; "
            "the analyzer acts at its next tick"
        )
        return 0
    except (KubeConfigError, LookupError) as exc:
        print(f"kubectl perch: error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 1
    except (ApiException, HTTPError, OSError) as exc:
        print(f"kubectl perch: error: {describe_api_error(exc)}", file=sys.stderr)
        return 1
