"""`kubectl perch`: promote, abort, retry, pause or resume a canary, and show canaries.

Installed as the console script `kubectl-perch`, which kubectl finds on PATH as a plugin. It only
sets the `perch.dev/action` annotation on the Deployment (the analyzer acts and clears it), so git
keeps owning the spec.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from perch.kube import KubeConfigError, describe_api_error, load_api_client
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kubectl perch", description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--namespace", default="default")
    parser.add_argument("-A", "--all-namespaces", action="store_true")
    parser.add_argument("--kubeconfig")
    sub = parser.add_subparsers(dest="command", required=True)
    status = sub.add_parser("status", help="show canaries (all of a namespace, or one)")
    status.add_argument("name", nargs="?")
    for action in ACTIONS:
        p = sub.add_parser(action, help=f"ask the analyzer to {action} the canary of a Deployment")
        p.add_argument("name")
    args = parser.parse_args(argv)
    try:
        kube = Kube(load_api_client(args.kubeconfig), timeout=10)
        if args.command == "status":
            if args.name:
                found = kube.get(CANARIES, args.namespace, args.name)
                if found is None:
                    raise LookupError(f"canary {args.namespace}/{args.name} not found")
                canaries = [found]
            else:
                canaries = kube.list_objects(
                    CANARIES, None if args.all_namespaces else args.namespace
                )
            if not canaries:
                print("No canaries found.")
                return 0
            print(_table(status_rows(canaries)))
            return 0
        request_action(kube, namespace=args.namespace, name=args.name, action=args.command)
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
