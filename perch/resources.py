"""Raw-JSON access to any Kubernetes resource through the `kubernetes` client's transport.

The typed client APIs turn objects into models and back, which drops fields the client does not
know and costs more than the request itself. Perch reads and writes objects as the API sends them,
with resourceVersion preconditions, through these few calls.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from perch.kube import APPLY_PATCH, JSON_PATCH, MERGE_PATCH, is_not_found

# Bounded, so that an admission answer never waits on a hung API call past the webhook's timeout.
DEFAULT_TIMEOUT_SECONDS = 2.0


@dataclass(frozen=True, slots=True)
class Resource:
    group: str
    version: str
    plural: str
    namespaced: bool = True

    def path(self, namespace: str | None, name: str | None = None, subresource: str = "") -> str:
        base = f"/api/{self.version}" if not self.group else f"/apis/{self.group}/{self.version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{quote(namespace, safe='')}"
        base += f"/{self.plural}"
        if name is not None:
            base += f"/{quote(name, safe='')}"
        if subresource:
            base += f"/{subresource}"
        return base


DEPLOYMENTS = Resource("apps", "v1", "deployments")
SERVICES = Resource("", "v1", "services")
SECRETS = Resource("", "v1", "secrets")
HPAS = Resource("autoscaling", "v2", "horizontalpodautoscalers")
CANARIES = Resource("perch.dev", "v1alpha1", "canaries")


class Kube:
    """GET, create, replace, merge/JSON patch and delete of raw objects."""

    def __init__(
        self,
        api_client: client.ApiClient,
        *,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        field_manager: str = "",
    ):
        self._api = api_client
        self._timeout = timeout
        # Named in managedFields for every write, so `kubectl get -o yaml --show-managed-fields`
        # says which part of Perch wrote what (the client library's default is its generator's).
        self._field_manager = field_manager
        self.calls = 0

    def _request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        content_type: str = "application/json",
        query: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        if method not in {"GET", "DELETE"} and self._field_manager:
            query = {"fieldManager": self._field_manager, **(query or {})}
        if query:
            path = f"{path}?{urlencode(query)}"
        _, url, headers, _, _ = self._api.param_serialize(
            method=method,
            resource_path=path,
            header_params=headers,
            auth_settings=["BearerToken"],
        )
        self.calls += 1
        response = self._api.call_api(
            method,
            url,
            header_params=headers,
            body=body,
            _request_timeout=self._timeout,
        )
        data: bytes = response.read()  # type: ignore[no-untyped-call]
        if not 200 <= response.status < 300:
            raise ApiException.from_response(
                http_resp=response, body=data.decode("utf-8", "replace") if data else "", data=None
            )
        if not data:
            return {}
        decoded = json.loads(data)
        return decoded if isinstance(decoded, dict) else {}

    def get(self, res: Resource, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._request("GET", res.path(namespace, name))
        except ApiException as exc:
            if is_not_found(exc):
                return None
            raise

    def list_objects(
        self, res: Resource, namespace: str | None, *, labels: str = ""
    ) -> list[dict[str, Any]]:
        query = {"labelSelector": labels} if labels else None
        items = self._request("GET", res.path(namespace), query=query).get("items") or []
        return [i for i in items if isinstance(i, dict)]

    def create(self, res: Resource, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return self._request("POST", res.path(namespace), body=body)

    def replace(
        self,
        res: Resource,
        namespace: str,
        name: str,
        body: Mapping[str, Any],
        *,
        subresource: str = "",
    ) -> dict[str, Any]:
        """PUT; the body's metadata.resourceVersion makes it conditional."""
        return self._request("PUT", res.path(namespace, name, subresource), body=body)

    def merge_patch(
        self,
        res: Resource,
        namespace: str,
        name: str,
        body: Mapping[str, Any],
        *,
        subresource: str = "",
    ) -> dict[str, Any]:
        return self._request(
            "PATCH", res.path(namespace, name, subresource), body=body, content_type=MERGE_PATCH
        )

    def json_patch(
        self,
        res: Resource,
        namespace: str,
        name: str,
        ops: list[dict[str, Any]],
        *,
        subresource: str = "",
    ) -> dict[str, Any]:
        return self._request(
            "PATCH", res.path(namespace, name, subresource), body=ops, content_type=JSON_PATCH
        )

    def apply(
        self,
        res: Resource,
        namespace: str,
        name: str,
        body: Mapping[str, Any],
        *,
        field_manager: str,
    ) -> dict[str, Any]:
        """Server-side apply of `body` as `field_manager`, forcing conflicts (the caller applies
        on that manager's behalf); the body's metadata.resourceVersion makes it conditional."""
        return self._request(
            "PATCH",
            res.path(namespace, name),
            body=body,
            content_type=APPLY_PATCH,
            query={"fieldManager": field_manager, "force": "true"},
        )

    def delete(self, res: Resource, namespace: str, name: str) -> bool:
        """True when it deleted something, False when there was nothing to delete."""
        try:
            self._request(
                "DELETE", res.path(namespace, name), body={"propagationPolicy": "Background"}
            )
        except ApiException as exc:
            if is_not_found(exc):
                return False
            raise
        return True

    def version(self) -> dict[str, Any]:
        return self._request("GET", "/version/")


def resource_version(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")
