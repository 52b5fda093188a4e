"""perch-certs: issue, inject, ensure. Every failure is one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

import urllib3

from certs.ensure import ensure, parse_secret_ref
from certs.errors import CertsError
from certs.inject import check_ca_bundle, inject_ca_bundle
from certs.issue import (
    DEFAULT_DAYS,
    KEY_TYPES,
    IPAddress,
    issue,
    key_type_label,
    parse_ip,
    service_dns_names,
    write_files,
)
from perch.kube import ApiException, KubeConfigError, describe_api_error, load_api_client

EXIT_ERROR = 2


class _Parser(argparse.ArgumentParser):
    # argparse prints the whole usage block before its error; init containers and CI logs read
    # better with the one line that says what is wrong.
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _ip(text: str) -> IPAddress:
    try:
        return parse_ip(text)
    except CertsError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _days(text: str) -> int:
    try:
        days = int(text)
    except ValueError:
        days = 0
    if days < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of days of at least 1")
    return days


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="perch-certs", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def identity(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--service", required=True, help="the webhook's Service name")
        sub.add_argument("--namespace", required=True, help="the Service's namespace")
        sub.add_argument("--days", type=_days, default=DEFAULT_DAYS, help="serving cert validity")
        sub.add_argument(
            "--ip",
            type=_ip,
            action="append",
            default=[],
            metavar="ADDR",
            help="an extra IP address SAN (repeatable), e.g. for a webhook reached by IP",
        )

    def cluster(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--kubeconfig", help="kubeconfig file (default: KUBECONFIG, in-cluster, ~/.kube/config)"
        )
        sub.add_argument("--context", help="kubeconfig context (default: the current one)")

    sub = commands.add_parser("issue", help="write ca.crt, tls.crt and tls.key into a directory")
    identity(sub)
    sub.add_argument("--out-dir", required=True, type=Path)
    sub.add_argument("--key-type", choices=KEY_TYPES, default="ec")

    sub = commands.add_parser(
        "inject", help="write a CA bundle into a MutatingWebhookConfiguration"
    )
    sub.add_argument("--webhook-config", required=True, help="MutatingWebhookConfiguration name")
    sub.add_argument("--ca-file", required=True, type=Path, help="PEM CA bundle, e.g. ca.crt")
    cluster(sub)

    sub = commands.add_parser(
        "ensure", help="keep a TLS Secret current (idempotent) and inject its CA bundle"
    )
    sub.add_argument(
        "--secret", required=True, metavar="NS/NAME", help="the kubernetes.io/tls Secret"
    )
    identity(sub)
    sub.add_argument("--webhook-config", help="MutatingWebhookConfiguration to inject the CA into")
    cluster(sub)
    return parser


def _run(args: argparse.Namespace) -> str:
    if args.command == "issue":
        issued = issue(
            service=args.service,
            namespace=args.namespace,
            ips=args.ip,
            days=args.days,
            key_type=args.key_type,
        )
        paths = write_files(issued, args.out_dir)
        return (
            f"issued a CA and a serving certificate ({key_type_label(args.key_type)}) for "
            f"{service_dns_names(args.service, args.namespace)[2]}, valid {args.days} days: "
            + ", ".join(str(path) for path in paths)
        )
    if args.command == "inject":
        bundle = args.ca_file.read_bytes()
        check_ca_bundle(bundle, source=str(args.ca_file))
        with load_api_client(args.kubeconfig, context=args.context) as api_client:
            result = inject_ca_bundle(
                api_client, webhook_config=args.webhook_config, ca_bundle=bundle
            )
        return result.describe()
    secret_namespace, secret_name = parse_secret_ref(args.secret, default_namespace=args.namespace)
    # Validate names before connecting, so a typo is reported as such, not as an API error.
    service_dns_names(args.service, args.namespace)
    with load_api_client(args.kubeconfig, context=args.context) as api_client:
        outcome = ensure(
            api_client,
            secret_namespace=secret_namespace,
            secret_name=secret_name,
            service=args.service,
            namespace=args.namespace,
            webhook_config=args.webhook_config,
            days=args.days,
            ips=args.ip,
        )
    return outcome.describe()


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:
        # argparse exits for --help and usage errors; callers of main() get the code instead.
        return exc.code if isinstance(exc.code, int) else 0
    try:
        print(_run(args))
    except (CertsError, KubeConfigError) as exc:
        return _fail(str(exc))
    except (ApiException, urllib3.exceptions.HTTPError) as exc:
        return _fail(describe_api_error(exc))
    except OSError as exc:
        target = f"{exc.filename}: " if exc.filename else ""
        return _fail(f"{target}{exc.strerror or exc}")
    return 0


def _fail(message: str) -> int:
    print(f"perch-certs: error: {' '.join(message.split())}", file=sys.stderr)
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
