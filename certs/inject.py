"""Write the CA bundle into every webhook of a MutatingWebhookConfiguration."""

from __future__ import annotations

import base64
import copy
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from kubernetes import client

from certs.errors import CertsError
from perch.kube import MERGE_PATCH, ApiException, is_not_found, response_json, retry_on_conflict


@dataclass(frozen=True)
class InjectResult:
    webhook_config: str
    webhooks: int
    # Webhooks whose caBundle differed and was written; 0 when everything was already current.
    updated: int

    def describe(self) -> str:
        where = f"MutatingWebhookConfiguration {self.webhook_config}"
        if self.updated == 0:
            return f"CA bundle already current in all {self.webhooks} webhooks of {where}"
        return f"injected CA bundle into {self.updated} of {self.webhooks} webhooks of {where}"


def check_ca_bundle(pem: bytes, *, source: str) -> None:
    """Refuse anything but PEM CA certificates: a wrong bundle breaks every admission call."""
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise CertsError(f"{source}: no PEM certificate found") from None
    for cert in certs:
        try:
            is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise CertsError(
                f"{source}: {cert.subject.rfc4514_string()} is not a CA certificate "
                "(pass the CA, ca.crt, not the serving certificate)"
            )


def ca_bundle_patch(configuration: dict[str, Any], *, ca_bundle: bytes) -> dict[str, Any] | None:
    """The merge patch that sets caBundle in every webhook; None when all already have it.

    A merge patch replaces the whole webhooks list, so it is built from the raw object as read
    (fields this code does not know survive) and guarded by its resourceVersion: any change since
    the read makes the API server answer 409, and the caller re-reads. (A JSON patch by index
    would fail with 422, not 409, when the list shrank meanwhile.)
    """
    wanted = base64.b64encode(ca_bundle).decode("ascii")
    webhooks = copy.deepcopy(configuration.get("webhooks") or [])
    if all(_bundle_of(webhook) == wanted for webhook in webhooks):
        return None
    for webhook in webhooks:
        webhook.setdefault("clientConfig", {})["caBundle"] = wanted
    return {
        "metadata": {"resourceVersion": configuration["metadata"]["resourceVersion"]},
        "webhooks": webhooks,
    }


def inject_ca_bundle(
    api_client: client.ApiClient, *, webhook_config: str, ca_bundle: bytes
) -> InjectResult:
    check_ca_bundle(ca_bundle, source="CA bundle")
    api = client.AdmissionregistrationV1Api(api_client)

    def attempt() -> InjectResult:
        try:
            configuration = response_json(
                api.read_mutating_webhook_configuration(webhook_config, _preload_content=False)
            )
        except ApiException as exc:
            if is_not_found(exc):
                raise CertsError(
                    f"MutatingWebhookConfiguration {webhook_config!r} not found; "
                    "install the chart (or create it) before injecting the CA bundle"
                ) from None
            raise
        webhooks = len(configuration.get("webhooks") or [])
        if webhooks == 0:
            raise CertsError(
                f"MutatingWebhookConfiguration {webhook_config!r} has no webhooks to inject into"
            )
        wanted = base64.b64encode(ca_bundle).decode("ascii")
        stale = sum(_bundle_of(webhook) != wanted for webhook in configuration["webhooks"])
        patch = ca_bundle_patch(configuration, ca_bundle=ca_bundle)
        if patch is not None:
            response_json(
                api.patch_mutating_webhook_configuration(
                    webhook_config, patch, _content_type=MERGE_PATCH, _preload_content=False
                )
            )
        return InjectResult(webhook_config=webhook_config, webhooks=webhooks, updated=stale)

    return retry_on_conflict(attempt)


def _bundle_of(webhook: dict[str, Any]) -> Any:
    return (webhook.get("clientConfig") or {}).get("caBundle")
