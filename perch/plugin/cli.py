"""The command line of `kubectl perch`: flags as kubectl takes them, and each subcommand's shell."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import yaml
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from perch.kube import (
    DEFAULT_KUBECONFIG,
    SERVICE_ACCOUNT_TOKEN,
    KubeConfigError,
    describe_api_error,
    load_api_client,
)
from perch.names import ANNOTATION_ACTION, CANARY_PLURAL, GROUP, is_opted_in
from perch.plugin import glance as glance_view
from perch.plugin import validate as checks
from perch.plugin.render import Style, colour_wanted, dump
from perch.plugin.status import Gone, Screen, follow, phase_of, status_table
from perch.resources import CANARIES, DEPLOYMENTS, Kube

DESCRIPTION = (
    "Show Perch's canary releases, follow one live, check perch.dev/spec offline, and promote, "
    "abort, retry, pause or resume a release."
)
ACTIONS = ("promote", "abort", "retry", "pause", "resume")
OUTPUTS = ("json", "yaml")
# A watch is closed by the server after this long and resumed; the read allows for its delay.
WATCH_SECONDS = 300


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


def _output_flag(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("-o", "--output", choices=OUTPUTS, help=f"print {what} for scripts")


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


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="kubectl perch", description=DESCRIPTION, parents=[_global_flags()]
    )
    sub = top.add_subparsers(dest="command", required=True)
    flags = [_global_flags()]
    status = sub.add_parser(
        "status",
        help="the canaries of a namespace (or -A), or one release at a glance",
        description="Without NAME: the table of canaries. With NAME: the release at a glance "
        "(phase, revisions, step plan, failed checks, last metric values, gates).",
        parents=flags,
    )
    status.add_argument("name", nargs="?")
    status.add_argument(
        "-w",
        "--watch",
        action="store_true",
        help="follow the release until it ends; exit 0 when Succeeded, 1 when Failed",
    )
    _output_flag(status, "the Canary object (a List without NAME)")
    validate = sub.add_parser(
        "validate",
        help="check the perch.dev/spec of Deployment manifests offline, as the webhook does",
        description="Check every Deployment's perch.dev/spec in the manifests with the webhook's "
        "own checks. Exit 1 if a spec is invalid, 2 if a file cannot be read or parsed.",
        parents=flags,
    )
    validate.add_argument(
        "-f",
        "--filename",
        action="append",
        required=True,
        metavar="FILE",
        help="a manifest file, a directory of them, or - for stdin; may be repeated",
    )
    validate.add_argument(
        "-R", "--recursive", action="store_true", help="read directories given to -f recursively"
    )
    _output_flag(validate, "a result per Deployment")
    for action in ACTIONS:
        p = sub.add_parser(
            action,
            help=f"ask the analyzer to {action} the canary of a Deployment",
            parents=flags,
        )
        p.add_argument("name")
    return top


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        return 130


def _main(argv: Sequence[str] | None) -> int:
    top = parser()
    args = top.parse_args(argv)
    all_namespaces: bool = getattr(args, "all_namespaces", False)
    kubeconfig: str | None = getattr(args, "kubeconfig", None)
    name: str | None = getattr(args, "name", None)
    if all_namespaces and args.command != "status":
        top.error(f"-A/--all-namespaces only applies to status, not to {args.command}")
    if all_namespaces and name:
        # kubectl's rule too: a name means one object, which lives in one namespace.
        top.error("-A/--all-namespaces lists every canary; give -n NAMESPACE with a name")
    if getattr(args, "watch", False) and not name:
        top.error("-w/--watch follows one release: give its NAME")
    if args.command == "validate":
        if args.filename.count(checks.STDIN) > 1:
            top.error("-f - (stdin) may be given once")
        return _validate(args.filename, recursive=args.recursive, output=args.output)
    namespace: str = args.namespace if "namespace" in args else context_namespace(kubeconfig)
    try:
        api = load_api_client(kubeconfig)
        kube = Kube(api, timeout=10, field_manager="kubectl-perch")
        if args.command == "status":
            if name:
                return _status_of(kube, api, namespace, name, watch=args.watch, output=args.output)
            return _status_table(kube, None if all_namespaces else namespace, output=args.output)
        request_action(kube, namespace=namespace, name=args.name, action=args.command)
        print(
            f"deployment.apps/{args.name} annotated {ANNOTATION_ACTION}={args.command}; "
            "the analyzer acts at its next tick"
        )
        return 0
    except (KubeConfigError, LookupError) as exc:
        _error(str(exc.args[0] if exc.args else exc))
        return 1
    except (ApiException, HTTPError, OSError) as exc:
        _error(describe_api_error(exc))
        return 1


def _error(message: str) -> None:
    print(f"kubectl perch: error: {message}", file=sys.stderr)


def _style() -> Style:
    return Style(colour=colour_wanted(sys.stdout, os.environ))


def _validate(paths: Sequence[str], *, recursive: bool, output: str | None) -> int:
    sources = list(checks.read_sources(paths, stdin=sys.stdin, recursive=recursive))
    report = checks.validate(sources)
    for finding in report.findings:
        if finding.result == "error":
            print(checks.render_error(finding), file=sys.stderr)
    if output is not None:
        print(_dump([f.to_wire() for f in report.findings], output))
        return report.exit_code
    style = _style()
    shown = [f for f in report.findings if f.result != "error"]
    for finding in shown:
        print(checks.render_finding(finding, style))
    if not report.findings:
        print(f"No Deployments found in {', '.join('stdin' if p == '-' else p for p in paths)}.")
    return report.exit_code


def _dump(data: Any, output: str) -> str:
    fmt: Literal["json", "yaml"] = "json" if output == "json" else "yaml"
    return dump(data, fmt).rstrip("\n")


def _status_table(kube: Kube, namespace: str | None, *, output: str | None) -> int:
    canaries = kube.list_objects(CANARIES, namespace)
    if output is not None:
        print(_dump({"apiVersion": "v1", "kind": "List", "items": canaries}, output))
        return 0
    if not canaries:
        print("No canaries found.")
        return 0
    print(status_table(canaries, _style()))
    return 0


def _view(kube: Kube, canary: Mapping[str, Any], namespace: str, name: str) -> str:
    try:
        deployment = kube.get(DEPLOYMENTS, namespace, name)
        problem = "" if deployment is not None else f"deployment {namespace}/{name} not found"
    except (ApiException, HTTPError) as exc:
        deployment, problem = None, f"cannot read deployment {namespace}/{name}: "
        problem += describe_api_error(exc)
    view = glance_view.glance(canary, deployment, problem=problem)
    return glance_view.render(view, now=datetime.now(UTC), style=_style())


def _status_of(
    kube: Kube,
    api: client.ApiClient,
    namespace: str,
    name: str,
    *,
    watch: bool,
    output: str | None,
) -> int:
    canary = kube.get(CANARIES, namespace, name)
    if canary is None:
        raise LookupError(f"canary {namespace}/{name} not found")
    terminal = sys.stdout.isatty()
    screen = Screen(sys.stdout, terminal=terminal and output is None)
    if terminal:
        screen.columns = shutil.get_terminal_size().columns

    printed = 0

    def show(obj: Mapping[str, Any]) -> None:
        nonlocal printed
        if output is not None:
            separator = "---\n" if output == "yaml" and printed else ""
            print(separator + _dump(obj, output), flush=True)
        else:
            screen.show(_view(kube, obj, namespace, name))
        printed += 1

    show(canary)
    if not watch:
        return 0
    try:
        last = follow(
            canary,
            watch=lambda version: _watch_events(api, namespace, name, version),
            reread=lambda: kube.get(CANARIES, namespace, name),
            changed=show,
        )
    except Gone:
        _error(f"canary {namespace}/{name} was deleted")
        return 1
    return 0 if phase_of(last) == "Succeeded" else 1


def _watch_events(
    api: client.ApiClient, namespace: str, name: str, version: str
) -> Iterator[Mapping[str, Any]]:
    custom = client.CustomObjectsApi(api)
    stream = watch.Watch().stream(  # type: ignore[no-untyped-call]
        custom.list_namespaced_custom_object,
        GROUP,
        CANARIES.version,
        namespace,
        CANARY_PLURAL,
        field_selector=f"metadata.name={name}",
        resource_version=version,
        allow_watch_bookmarks=True,
        timeout_seconds=WATCH_SECONDS,
        _request_timeout=(10, WATCH_SECONDS + 30),
    )
    for event in stream:
        yield {"type": event.get("type"), "object": event.get("raw_object") or {}}
