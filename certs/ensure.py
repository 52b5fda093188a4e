"""Keep the webhook's TLS Secret current and its CA bundle injected; safe to run on every start.

Replicas may run this at the same moment: every write carries a resourceVersion precondition (or is
a create), and a 409 re-reads and decides again, so the loser keeps what the winner wrote.
"""

from __future__ import annotations

import base64
import binascii
import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from kubernetes import client

from certs.errors import CertsError
from certs.inject import InjectResult, inject_ca_bundle
from certs.issue import (
    CA_FILE,
    CERT_FILE,
    DEFAULT_DAYS,
    KEY_FILE,
    IPAddress,
    issue,
    service_dns_names,
)
from perch import names
from perch.kube import MERGE_PATCH, ApiException, is_not_found, response_json, retry_on_conflict

SECRET_TYPE_TLS = "kubernetes.io/tls"  # noqa: S105 - a type name, not a password
Action = Literal["kept", "issued", "renewed"]


@dataclass(frozen=True)
class Assessment:
    """What to do with the Secret as found. ``previous_ca`` is the CA of a leaf that may still be
    served until the pods see the new Secret; it stays in the bundle so that window has no errors.
    """

    keep: bool
    reason: str
    not_after: datetime.datetime | None = None
    previous_ca: bytes | None = None


@dataclass(frozen=True)
class EnsureResult:
    action: Action
    reason: str
    secret: str
    not_after: datetime.datetime
    injected: InjectResult | None

    def describe(self) -> str:
        until = self.not_after.strftime("%Y-%m-%dT%H:%M:%SZ")
        if self.action == "kept":
            detail = f"certificate valid until {until}, {self.reason}"
        elif self.action == "renewed":
            detail = f"old certificate: {self.reason}; new one valid until {until}"
        else:
            detail = f"{self.reason}; certificate valid until {until}"
        line = f"{self.action} Secret {self.secret} ({detail})"
        if self.injected is not None:
            line += f"; {self.injected.describe()}"
        return line


def assess(
    secret: dict[str, Any] | None,
    *,
    dns_names: Sequence[str],
    ips: Sequence[IPAddress],
    now: datetime.datetime,
) -> Assessment:
    """Keep the Secret while its leaf matches the wanted SANs and has over a third of its life left.

    Renewing at two thirds (as cert-manager does) leaves time for a failed renewal to be retried
    long before the API server starts rejecting the webhook.
    """
    if secret is None:
        return Assessment(keep=False, reason="no Secret yet")
    secret_type = secret.get("type")
    if secret_type != SECRET_TYPE_TLS:
        # Someone else's Secret under this name: overwriting it could break them, so refuse.
        raise CertsError(
            f"Secret {_secret_name(secret)} has type {secret_type!r}, not {SECRET_TYPE_TLS!r}; "
            "delete it or choose another --secret"
        )
    data = secret.get("data") or {}
    missing = [key for key in (CA_FILE, CERT_FILE, KEY_FILE) if not data.get(key)]
    if missing:
        return Assessment(keep=False, reason=f"Secret lacks {', '.join(missing)}")
    try:
        cas = x509.load_pem_x509_certificates(base64.b64decode(data[CA_FILE]))
        leaf = x509.load_pem_x509_certificate(base64.b64decode(data[CERT_FILE]))
        key = serialization.load_pem_private_key(base64.b64decode(data[KEY_FILE]), password=None)
    except (ValueError, TypeError, binascii.Error) as exc:
        return Assessment(keep=False, reason=f"Secret unreadable ({' '.join(str(exc).split())})")

    issuer = _issuing_ca(leaf, cas)
    start, end = leaf.not_valid_before_utc, leaf.not_valid_after_utc
    previous_ca = (
        issuer.public_bytes(serialization.Encoding.PEM)
        if issuer is not None and start <= now < end and issuer.not_valid_after_utc > now
        else None
    )

    def renew(reason: str) -> Assessment:
        return Assessment(keep=False, reason=reason, not_after=end, previous_ca=previous_ca)

    if issuer is None:
        return renew(f"{CERT_FILE} is not signed by {CA_FILE}")
    if key.public_key().public_bytes(*_SPKI) != leaf.public_key().public_bytes(*_SPKI):
        return renew(f"{KEY_FILE} does not belong to {CERT_FILE}")
    have, want = set(_sans(leaf)), {*dns_names, *(str(ip) for ip in ips)}
    if have != want:
        changes = [f"+{n}" for n in sorted(want - have)] + [f"-{n}" for n in sorted(have - want)]
        return renew(f"names changed ({' '.join(changes)})")
    left = end - now
    if left <= (end - start) / 3:
        return renew(f"only {_days(left)} of its {_days(end - start)} left")
    return Assessment(
        keep=True, reason=f"{_days(left)} of its {_days(end - start)} left", not_after=end
    )


def ensure(
    api_client: client.ApiClient,
    *,
    secret_namespace: str,
    secret_name: str,
    service: str,
    namespace: str,
    webhook_config: str | None = None,
    days: int = DEFAULT_DAYS,
    ips: Sequence[IPAddress] = (),
    now: datetime.datetime | None = None,
) -> EnsureResult:
    """Make sure the TLS Secret holds a good certificate; then inject its CA bundle, if asked.

    The bundle is injected even when the Secret was kept, so a re-created webhook configuration
    (a ``helm upgrade`` that replaced it, say) gets its bundle back.
    """
    dns_names = service_dns_names(service, namespace)
    core = client.CoreV1Api(api_client)
    qualified = f"{secret_namespace}/{secret_name}"

    def attempt() -> tuple[Action, str, datetime.datetime, bytes]:
        moment = now or datetime.datetime.now(datetime.UTC)
        secret = _read_secret(core, namespace=secret_namespace, name=secret_name)
        verdict = assess(secret, dns_names=dns_names, ips=ips, now=moment)
        if verdict.keep and secret is not None and verdict.not_after is not None:
            bundle = base64.b64decode(secret["data"][CA_FILE])
            return "kept", verdict.reason, verdict.not_after, bundle

        issued = issue(service=service, namespace=namespace, ips=ips, days=days, now=now)
        bundle = issued.ca_crt + (verdict.previous_ca or b"")
        data: dict[str, bytes | str] = {
            CA_FILE: _b64(bundle),
            CERT_FILE: _b64(issued.tls_crt),
            KEY_FILE: _b64(issued.tls_key),
        }
        if secret is None:
            response_json(
                core.create_namespaced_secret(
                    secret_namespace,
                    client.V1Secret(
                        api_version="v1",
                        kind="Secret",
                        metadata=client.V1ObjectMeta(
                            name=secret_name,
                            namespace=secret_namespace,
                            labels={names.LABEL_MANAGED_BY: names.MANAGED_BY_VALUE},
                        ),
                        type=SECRET_TYPE_TLS,
                        data=data,
                    ),
                    _preload_content=False,
                )
            )
            action: Action = "issued"
        else:
            # A merge patch touches only our three keys; the resourceVersion makes it a
            # compare-and-swap, so a Secret renewed meanwhile by another replica is not clobbered.
            guard = {"resourceVersion": secret["metadata"]["resourceVersion"]}
            response_json(
                core.patch_namespaced_secret(
                    secret_name,
                    secret_namespace,
                    {"metadata": guard, "data": data},
                    _content_type=MERGE_PATCH,
                    _preload_content=False,
                )
            )
            action = "renewed"
        not_after = x509.load_pem_x509_certificate(issued.tls_crt).not_valid_after_utc
        return action, verdict.reason, not_after, bundle

    action, reason, not_after, bundle = retry_on_conflict(attempt)
    injected = None
    if webhook_config:
        try:
            injected = inject_ca_bundle(api_client, webhook_config=webhook_config, ca_bundle=bundle)
        except CertsError as exc:
            # Say the Secret half succeeded: the operator should not go looking for it.
            raise CertsError(f"{action} Secret {qualified}, but {exc}") from exc
    return EnsureResult(
        action=action, reason=reason, secret=qualified, not_after=not_after, injected=injected
    )


def parse_secret_ref(text: str, *, default_namespace: str) -> tuple[str, str]:
    """``NS/NAME``, or ``NAME`` in the default namespace."""
    namespace, _, name = text.rpartition("/")
    namespace = namespace or default_namespace
    if not name or "/" in namespace:
        raise CertsError(f"--secret {text!r}: expected NAMESPACE/NAME")
    return namespace, name


_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _read_secret(core: client.CoreV1Api, *, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        return response_json(core.read_namespaced_secret(name, namespace, _preload_content=False))
    except ApiException as exc:
        if is_not_found(exc):
            return None
        raise


def _issuing_ca(leaf: x509.Certificate, cas: Sequence[x509.Certificate]) -> x509.Certificate | None:
    for ca in cas:
        try:
            leaf.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return ca
    return None


def _sans(cert: x509.Certificate) -> list[str]:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    ips = [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]
    return [*sans.get_values_for_type(x509.DNSName), *ips]


def _days(delta: datetime.timedelta) -> str:
    if delta >= datetime.timedelta(days=1):
        return f"{delta.total_seconds() / 86400:.0f}d"
    return f"{max(delta.total_seconds(), 0) / 3600:.1f}h"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _secret_name(secret: dict[str, Any]) -> str:
    metadata = secret.get("metadata") or {}
    return f"{metadata.get('namespace', '?')}/{metadata.get('name', '?')}"
