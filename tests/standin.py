"""A stateful Kubernetes API stand-in for the integration tests.

kmock serves the discovery documents and renders them. Its object store is replaced here: it
has no resourceVersion or uid, no PUT, no 409 on a stale write, no label selectors, no status
subresource, and its URL parser fails on ``/api/v1/namespaces``. ``StandIn`` runs the server on
127.0.0.1 in a background thread, so that the synchronous ``kubernetes`` client can call it.

Where a real API server would answer differently, it is a bug of this module: the tests trust it.
Strategic merge patch and server-side apply are refused (415) rather than approximated.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import json
import math
import random
import re
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from http import HTTPStatus
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiohttp.web
import attrs
import jsonpatch
import kmock
import yaml
from kubernetes import client

JSON = dict[str, Any]
Key = tuple[str, str | None, str]  # (plural, namespace, name)


@dataclasses.dataclass(frozen=True)
class Resource:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    status: bool = True  # served with a status subresource
    # DELETE answers with the object rather than a Status, as the API server does for custom
    # resources, pods and services; the client's Pod and Service models refuse a Status.
    returns_deleted: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified(self) -> str:  # the name the API server uses in its messages
        return f"{self.plural}.{self.group}" if self.group else self.plural


RESOURCES: tuple[Resource, ...] = (
    Resource("", "v1", "namespaces", "Namespace", namespaced=False),
    Resource("", "v1", "services", "Service"),
    Resource("", "v1", "pods", "Pod"),
    Resource("", "v1", "secrets", "Secret", status=False, returns_deleted=False),
    Resource("", "v1", "configmaps", "ConfigMap", status=False, returns_deleted=False),
    Resource("", "v1", "events", "Event", status=False, returns_deleted=False),
    Resource("apps", "v1", "deployments", "Deployment", returns_deleted=False),
    Resource(
        "autoscaling",
        "v2",
        "horizontalpodautoscalers",
        "HorizontalPodAutoscaler",
        returns_deleted=False,
    ),
    Resource("coordination.k8s.io", "v1", "leases", "Lease", status=False, returns_deleted=False),
    Resource(
        "admissionregistration.k8s.io",
        "v1",
        "mutatingwebhookconfigurations",
        "MutatingWebhookConfiguration",
        namespaced=False,
        status=False,
        returns_deleted=False,
    ),
    Resource("perch.dev", "v1alpha1", "canaries", "Canary"),
    Resource("perch.dev", "v1alpha1", "metrictemplates", "MetricTemplate", status=False),
    Resource("perch.dev", "v1alpha1", "alertproviders", "AlertProvider", status=False),
    Resource("networking.istio.io", "v1", "virtualservices", "VirtualService"),
    Resource("networking.istio.io", "v1", "destinationrules", "DestinationRule"),
    Resource("networking.istio.io", "v1", "gateways", "Gateway"),
    Resource("gateway.networking.k8s.io", "v1", "httproutes", "HTTPRoute"),
)
# Namespaces every realistic setup has: the cluster's own, the chart's and the seed case's.
# Writes to any other namespace get the real server's 404 unless a test creates it first.
NAMESPACES = ("default", "kube-system", "perch", "test")
STREAM_HEADERS = {"Content-Type": "application/json"}
VERBS = ("create", "delete", "get", "list", "patch", "update", "watch")
NAMESPACE_MISMATCH = (
    "the namespace of the provided object does not match the namespace sent on the request"
)
SYSTEM_FIELDS = ("uid", "creationTimestamp", "deletionTimestamp", "generation", "namespace")
WRITE_VERBS = frozenset({"create", "update", "patch", "delete"})
# The API server's reasons where they differ from the HTTP phrase without spaces.
REASONS = {410: "Expired", 422: "Invalid", 500: "InternalError", 504: "Timeout"}


@dataclasses.dataclass
class Call:
    """One request to an object endpoint and the status it got (None until answered)."""

    verb: str  # get, list, watch, create, update, patch, delete; others are refused
    resource: str  # the plural, with "/status" for the subresource, as in RBAC rules
    namespace: str | None
    name: str | None
    status: int | None = None
    body: Any = dataclasses.field(default=None, repr=False, compare=False)
    dry_run: bool = False
    # time.monotonic() when the request arrived and when it was answered: which calls overlapped.
    arrived: float = dataclasses.field(default=0.0, repr=False, compare=False)
    answered: float = dataclasses.field(default=0.0, repr=False, compare=False)


@dataclasses.dataclass
class _Fault:
    verb: str
    resource: str
    name: str | None
    status: int
    message: str
    times: int | None  # None: until the test ends

    def matches(self, verb: str, resource: str, name: str | None) -> bool:
        return (
            self.verb in ("*", verb)
            and self.resource in ("*", resource)
            and self.name in (None, name)
            and self.times != 0
        )


@dataclasses.dataclass(frozen=True)
class _Change:
    rv: int
    plural: str
    type: str  # ADDED, MODIFIED, DELETED
    obj: JSON
    old: JSON | None


def _error(
    code: int,
    message: str,
    res: Resource | None = None,
    name: str | None = None,
    reason: str | None = None,
) -> kmock.KubernetesError:
    details = {"name": name, "group": res.group, "kind": res.plural} if res else {}
    reason = reason or REASONS.get(code) or HTTPStatus(code).phrase.replace(" ", "")
    return kmock.KubernetesError(code, reason, message, details)


def _status(exc: kmock.KubernetesError) -> JSON:
    return {
        "apiVersion": "v1",
        "kind": "Status",
        "metadata": {},
        "status": "Failure",
        "message": exc.message,
        "reason": exc.reason,
        "details": exc.details,
        "code": exc.status,
    }


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _merge_patch(target: Any, patch: Any) -> Any:
    # RFC 7386; kmock's own merge refuses to replace a dict with a scalar, which the RFC allows.
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge_patch(result.get(key), value)
    return result


_LABEL_REQUIREMENT = re.compile(
    r"\s*(?:!\s*(?P<absent>[\w./-]+)|(?P<key>[\w./-]+)\s*(?:(?P<op>==|!=|=)\s*(?P<value>[\w.-]*)"
    r"|\s+(?P<set>in|notin)\s*\((?P<values>[^)]*)\))?)\s*(?:,|$)"
)


def _label_selector(expr: str) -> Callable[[Mapping[str, str]], bool]:
    requirements: list[re.Match[str]] = []
    pos, expr = 0, expr.strip()
    while pos < len(expr):
        found = _LABEL_REQUIREMENT.match(expr, pos)
        if found is None or found.end() == pos:
            raise _error(400, f"unable to parse requirement: found {expr[pos:]!r}")
        requirements.append(found)
        pos = found.end()

    def holds(req: re.Match[str], labels: Mapping[str, str]) -> bool:
        if req["absent"]:
            return req["absent"] not in labels
        key = req["key"]
        if req["op"]:
            return (labels.get(key) == req["value"]) != (req["op"] == "!=")
        if req["set"]:
            inside = labels.get(key) in {v.strip() for v in req["values"].split(",")}
            return inside == (req["set"] == "in")
        return key in labels

    return lambda labels: all(holds(req, labels) for req in requirements)


def _field_selector(expr: str) -> Callable[[Mapping[str, Any]], bool]:
    checks: list[tuple[str, str, bool]] = []
    for part in filter(None, (p.strip() for p in expr.split(","))):
        found = re.fullmatch(r"metadata\.(name|namespace)\s*(==|=|!=)\s*(.*)", part)
        if found is None:  # the real server knows a few more per kind; the product needs these
            raise _error(400, f"field label not supported: {part}")
        checks.append((found[1], found[3], found[2] == "!="))
    return lambda meta: all((meta.get(f, "") == v) != negated for f, v, negated in checks)


def _route(path: str) -> tuple[str, str, str | None, str, str | None, str | None] | None:
    """(group, version, namespace, plural, name, subresource), or None for non-object paths."""
    segments = [s for s in path.split("/") if s]
    if len(segments) >= 3 and segments[0] == "api":
        group, version, rest = "", segments[1], segments[2:]
    elif len(segments) >= 4 and segments[0] == "apis":
        group, version, rest = segments[1], segments[2], segments[3:]
    else:
        return None  # discovery documents, /version, /openapi: kmock's
    namespace = None
    # /api/v1/namespaces/x/status is the namespace's own subresource, not a resource "status".
    if rest[0] == "namespaces" and len(rest) >= 3 and rest[2:] not in (["status"], ["finalize"]):
        namespace, rest = rest[1], rest[2:]
    if len(rest) > 3:
        return group, version, namespace, "", None, None  # no such endpoint: a 404 below
    name = rest[1] if len(rest) > 1 else None
    sub = rest[2] if len(rest) > 2 else None
    return group, version, namespace, rest[0], name, sub


def _verb(method: str, name: str | None, query: Mapping[str, str]) -> str:
    """The RBAC verb; the bare HTTP method, upper case, for what the stand-in does not serve."""
    if method == "GET":
        return "watch" if query.get("watch") in ("true", "1") else "get" if name else "list"
    if name is None:
        return {"POST": "create", "DELETE": "deletecollection"}.get(method, method)
    return {"PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(method, method)


@attrs.define(kw_only=True)
class Emulator(kmock.KubernetesScaffold):
    """The aiohttp handler; every method runs on the server's event loop."""

    kinds: dict[tuple[str, str, str], Resource] = attrs.field(factory=dict)
    version_info: JSON = attrs.field(factory=dict)
    lock: threading.Lock = attrs.field(factory=threading.Lock)  # tests read from their thread
    store: dict[Key, JSON] = attrs.field(factory=dict)  # stored dicts are never mutated in place
    changes: list[_Change] = attrs.field(factory=list)  # every write: watches resume from here
    calls: list[Call] = attrs.field(factory=list)
    faults: list[_Fault] = attrs.field(factory=list)
    # Seconds each request of a verb waits before it is served (a slow or distant API server).
    latency: dict[str, float] = attrs.field(factory=dict)
    crashes: list[BaseException] = attrs.field(factory=list)
    watchers: dict[asyncio.Queue[_Change | None], str] = attrs.field(factory=dict)
    rv: int = 0

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for res in self.kinds.values():
            self.resources[kmock.resource(res.group, res.version, res.plural)] = kmock.ResourceInfo(
                kind=res.kind,
                singular=res.kind.lower(),
                namespaced=res.namespaced,
                verbs=VERBS,
                subresources={"status"} if res.status else set(),
            )

    async def _serve_version(self, request: kmock.Request) -> kmock.Payload:
        document = await super()._serve_version(request)
        assert isinstance(document, dict)
        document["groupVersion"] = document["groupVersion"].lstrip("/")  # kmock says "/v1"
        return document

    async def __call__(self, raw: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        # kmock answers /version only; the client asks for /version/.
        if raw.path.rstrip("/") == "/version":
            return aiohttp.web.json_response(self.version_info)
        route = _route(raw.path)
        if route is None:
            return await super().__call__(raw)
        group, version, namespace, plural, name, sub = route
        res = self.kinds.get((group, version, plural))
        body_bytes = await raw.read()
        try:
            body = json.loads(body_bytes) if body_bytes else None
        except ValueError:
            body = ...  # refused as a bad request where a body matters
        call = Call(
            _verb(raw.method, name, raw.query),
            f"{plural}/{sub}" if sub else plural,
            namespace,
            name,
            body=body,
            dry_run=bool(raw.query.get("dryRun")),
            arrived=time.monotonic(),
        )
        with self.lock:
            self.calls.append(call)
            delay = self.latency.get(call.verb, 0.0)
            fault = next(
                (f for f in self.faults if f.matches(call.verb, call.resource, name)), None
            )
            if fault is not None and fault.times is not None:
                fault.times -= 1
        if delay:
            await asyncio.sleep(delay)
        try:
            if fault is not None and fault.status == 410 and call.verb == "watch":
                response = await self._expire(raw, call, _error(410, fault.message, res, name))
            elif fault is not None:
                raise _error(fault.status, fault.message, res, name)
            else:
                response = await self._serve(raw, res, sub, call)
        except kmock.KubernetesError as exc:
            response = aiohttp.web.json_response(_status(exc), status=exc.status)
        except Exception as exc:
            self.crashes.append(exc)
            message = f"stand-in crashed: {traceback.format_exc()}"
            response = aiohttp.web.json_response(_status(_error(500, message)), status=500)
        call.status = response.status
        call.answered = time.monotonic()
        return response

    async def _serve(
        self, raw: aiohttp.web.BaseRequest, res: Resource | None, sub: str | None, call: Call
    ) -> aiohttp.web.StreamResponse:
        verb, namespace, name, body = call.verb, call.namespace, call.name, call.body
        dry_run = call.dry_run
        if (
            res is None
            or sub not in (None, "status")
            or (sub and not res.status)
            or (namespace is not None and not res.namespaced)
            or (namespace is None and res.namespaced and verb not in ("list", "watch"))
        ):
            raise _error(404, "the server could not find the requested resource")
        if verb not in VERBS or (sub and verb not in ("get", "update", "patch")):
            raise _error(405, f"{raw.method} is not supported here", res, name)
        if verb == "watch":
            return await self._watch(raw, res, call)
        if verb in WRITE_VERBS and body is ...:
            raise _error(400, "the request body is not JSON", res, name)
        with self.lock:  # no awaits inside: the state changes atomically for every watcher
            if verb == "list":
                match = self._matcher(namespace, None, raw.query)
                items = [o for k, o in self._sorted(res) if match(o)]
                return aiohttp.web.json_response(
                    {
                        "apiVersion": res.api_version,
                        "kind": f"{res.kind}List",
                        "metadata": {"resourceVersion": str(self.rv)},
                        "items": items,
                    }
                )
            if verb == "create":
                return aiohttp.web.json_response(
                    self._create(res, namespace, body, dry_run), status=201
                )
            assert name is not None
            current = self.store.get((res.plural, namespace, name))
            if current is None:
                raise _error(404, f'{res.qualified} "{name}" not found', res, name)
            if verb == "get":
                return aiohttp.web.json_response(current)
            if verb == "delete":
                return aiohttp.web.json_response(self._delete(res, current, body or {}, dry_run))
            if verb == "update":
                new = copy.deepcopy(body)  # the body is also kept in calls()
            else:
                new = self._patch(res, current, body, raw.headers.get("Content-Type", ""))
            return aiohttp.web.json_response(self._update(res, current, new, sub, dry_run))

    def _create(self, res: Resource, namespace: str | None, body: Any, dry_run: bool) -> JSON:
        if not isinstance(body, dict) or not isinstance(body.get("metadata", {}), dict):
            raise _error(400, "the body is not a Kubernetes object", res)
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            suffix = random.choices("bcdfghjklmnpqrstvwxz2456789", k=5)
            meta["name"] = meta["generateName"] + "".join(suffix)
        name = meta.get("name")
        if not name:
            raise _error(422, "metadata.name: Required value: name or generateName is required")
        if not res.namespaced:
            meta.pop("namespace", None)  # cleared, as the API server does
        elif (meta.get("namespace") or namespace) != namespace:
            raise _error(400, NAMESPACE_MISMATCH, res, name)
        if meta.get("resourceVersion"):  # kubectl create of an exported object fails this way too
            raise _error(500, "resourceVersion should not be set on objects to be created")
        if namespace is not None and ("namespaces", None, namespace) not in self.store:
            raise _error(404, f'namespaces "{namespace}" not found', name=namespace)
        if (res.plural, namespace, name) in self.store:
            message = f'{res.qualified} "{name}" already exists'
            raise _error(409, message, res, name, "AlreadyExists")
        obj.update(apiVersion=res.api_version, kind=res.kind)
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1)
        meta.pop("deletionTimestamp", None)
        if namespace is not None:
            meta["namespace"] = namespace
        if res.status:  # the status subresource is the only way to write status
            obj.pop("status", None)
        if not dry_run:
            self._commit(res, "ADDED", None, obj)
        return obj

    def _patch(self, res: Resource, current: JSON, body: Any, content_type: str) -> Any:
        kind = content_type.split(";", maxsplit=1)[0].strip().lower()
        name = current["metadata"]["name"]
        if kind == "application/merge-patch+json":
            if not isinstance(body, dict):
                raise _error(400, "a merge patch must be a JSON object", res, name)
            return _merge_patch(copy.deepcopy(current), body)
        if kind == "application/json-patch+json":
            if not isinstance(body, list):
                message = "json: cannot unmarshal object into Go value of type jsonpatch.Patch"
                raise _error(400, message, res, name)
            try:
                return jsonpatch.apply_patch(copy.deepcopy(current), body)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                raise _error(422, str(exc), res, name) from exc
        raise _error(
            415,
            f"the stand-in does not emulate {kind or 'this'} patches: Perch uses "
            "merge patch and JSON patch only",
            res,
            name,
        )

    def _update(
        self, res: Resource, current: JSON, new: Any, sub: str | None, dry_run: bool
    ) -> JSON:
        old_meta, name = current["metadata"], current["metadata"]["name"]
        if not isinstance(new, dict) or not isinstance(new.get("metadata", {}), dict):
            raise _error(400, "the body is not a Kubernetes object", res, name)
        meta = dict(new.get("metadata") or {})
        if meta.get("name", name) != name:
            raise _error(
                400,
                f"the name of the object ({meta['name']}) does not match the name on "
                f"the URL ({name})",
                res,
                name,
            )
        if (meta.get("namespace") or old_meta.get("namespace")) != old_meta.get("namespace"):
            raise _error(400, NAMESPACE_MISMATCH, res, name)
        self._check_preconditions(res, current, meta.get("resourceVersion"), meta.get("uid"))
        if sub == "status":  # the status endpoint ignores everything but status, and vice versa
            obj = copy.deepcopy(current)
            obj.pop("status", None)
            if "status" in new:
                obj["status"] = new["status"]
        else:
            obj = {**new, "metadata": meta}
            if res.status:
                obj.pop("status", None)
                if "status" in current:
                    obj["status"] = current["status"]
            for field in SYSTEM_FIELDS:
                meta.pop(field, None)
                if field in old_meta:
                    meta[field] = old_meta[field]
            meta["name"] = name
        obj.update(apiVersion=res.api_version, kind=res.kind)
        ignored = ("metadata", "status") if res.status else ("metadata",)

        def spec(o: JSON) -> JSON:
            return {k: v for k, v in o.items() if k not in ignored}

        if spec(obj) != spec(current):
            obj["metadata"]["generation"] = old_meta.get("generation", 0) + 1
        if dry_run:
            return obj
        if obj["metadata"].get("deletionTimestamp") and not obj["metadata"].get("finalizers"):
            self._commit(res, "DELETED", current, obj)  # the last finalizer is gone
        else:
            self._commit(res, "MODIFIED", current, obj)
        return obj

    def _delete(self, res: Resource, current: JSON, options: Any, dry_run: bool) -> JSON:
        preconditions = (options.get("preconditions") or {}) if isinstance(options, dict) else {}
        self._check_preconditions(
            res, current, preconditions.get("resourceVersion"), preconditions.get("uid")
        )
        meta = current["metadata"]
        if meta.get("finalizers"):
            if meta.get("deletionTimestamp") or dry_run:
                return current
            obj = {**current, "metadata": {**meta, "deletionTimestamp": _now()}}
            self._commit(res, "MODIFIED", current, obj)
            return obj
        gone = copy.deepcopy(current)
        if not dry_run:
            self._commit(res, "DELETED", current, gone)
        if res.returns_deleted:
            return gone
        return {
            "apiVersion": "v1",
            "kind": "Status",
            "metadata": {},
            "status": "Success",
            "details": {
                "name": meta["name"],
                "group": res.group,
                "kind": res.plural,
                "uid": meta["uid"],
            },
        }

    def _check_preconditions(self, res: Resource, current: JSON, rv: Any, uid: Any) -> None:
        meta = current["metadata"]
        if uid and uid != meta["uid"]:
            message = (
                f"Precondition failed: UID in precondition: {uid}, UID in object: {meta['uid']}"
            )
            raise _error(409, message, res, meta["name"])
        if rv and rv != meta["resourceVersion"]:
            raise _error(
                409,
                f'Operation cannot be fulfilled on {res.qualified} "{meta["name"]}": '
                "the object has been modified; please apply your changes to the "
                "latest version and try again",
                res,
                meta["name"],
            )

    def _commit(self, res: Resource, type_: str, old: JSON | None, new: JSON) -> None:
        # Called with the lock held, on the loop's thread: watchers' queues are not thread-safe.
        self.rv += 1
        new["metadata"]["resourceVersion"] = str(self.rv)
        key = (res.plural, new["metadata"].get("namespace"), new["metadata"]["name"])
        if type_ == "DELETED":
            del self.store[key]
        else:
            self.store[key] = new
        change = _Change(self.rv, res.plural, type_, new, old)
        self.changes.append(change)
        for queue, plural in self.watchers.items():
            if plural == res.plural:
                queue.put_nowait(change)

    def _sorted(self, res: Resource) -> list[tuple[Key, JSON]]:
        # etcd lists in key order: by namespace, then name.
        found = [(k, o) for k, o in self.store.items() if k[0] == res.plural]
        return sorted(found, key=lambda item: (item[0][1] or "", item[0][2]))

    def _matcher(
        self, namespace: str | None, name: str | None, query: Mapping[str, str]
    ) -> Callable[[JSON], bool]:
        labels = _label_selector(query.get("labelSelector", ""))
        fields = _field_selector(query.get("fieldSelector", ""))

        def match(obj: JSON) -> bool:
            meta = obj["metadata"]
            return (
                namespace in (None, meta.get("namespace"))
                and name in (None, meta["name"])
                and labels(meta.get("labels") or {})
                and fields(meta)
            )

        return match

    async def _watch(
        self, raw: aiohttp.web.BaseRequest, res: Resource, call: Call
    ) -> aiohttp.web.StreamResponse:
        match, name = self._matcher(call.namespace, call.name, raw.query), call.name
        since = raw.query.get("resourceVersion", "")
        timeout = float(raw.query.get("timeoutSeconds") or math.inf)
        queue: asyncio.Queue[_Change | None] = asyncio.Queue()
        with self.lock:  # the backlog and the subscription are taken in one step: no gap
            if since in ("", "0"):
                backlog = [
                    _Change(self.rv, res.plural, "ADDED", o, None) for _, o in self._sorted(res)
                ]
            elif since.isdigit():
                backlog = [c for c in self.changes if c.rv > int(since) and c.plural == res.plural]
            else:
                raise _error(400, f"invalid resourceVersion {since!r}", res, name)
            self.watchers[queue] = res.plural
        for change in backlog:
            queue.put_nowait(change)
        deadline = asyncio.get_running_loop().time() + timeout
        response = aiohttp.web.StreamResponse(headers=STREAM_HEADERS)
        try:
            await self._open_stream(raw, response, call)
            while (left := deadline - asyncio.get_running_loop().time()) > 0:
                try:
                    latest = await asyncio.wait_for(queue.get(), min(left, 3600))
                except TimeoutError:
                    continue
                if latest is None:  # the server stops
                    break
                event = self._translate(latest, match)
                if event is not None:
                    await response.write(json.dumps(event).encode() + b"\n")
            await response.write_eof()
        except ConnectionError:
            pass  # the client went away; the real server does not mind either
        finally:
            with self.lock:
                self.watchers.pop(queue, None)
        return response

    @staticmethod
    async def _open_stream(
        raw: aiohttp.web.BaseRequest, response: aiohttp.web.StreamResponse, call: Call
    ) -> None:
        await response.prepare(raw)
        call.status = response.status  # a watch stays open: tests wait for it to be up

    async def _expire(
        self, raw: aiohttp.web.BaseRequest, call: Call, error: kmock.KubernetesError
    ) -> aiohttp.web.StreamResponse:
        # The API server reports an expired resourceVersion as an ERROR event in a 200 stream.
        response = aiohttp.web.StreamResponse(headers=STREAM_HEADERS)
        await self._open_stream(raw, response, call)
        event = {"type": "ERROR", "object": _status(error)}
        await response.write(json.dumps(event).encode() + b"\n")
        await response.write_eof()
        return response

    @staticmethod
    def _translate(change: _Change, match: Callable[[JSON], bool]) -> JSON | None:
        # A filtered watch sees an object enter or leave its selection as ADDED or DELETED.
        now, before = match(change.obj), change.old is not None and match(change.old)
        kind = change.type
        if kind == "MODIFIED" and now != before:
            kind = "ADDED" if now else "DELETED"
        return {"type": kind, "object": change.obj} if now or before else None

    def end_watches(self) -> None:
        with self.lock:
            for queue in self.watchers:
                queue.put_nowait(None)


class StandIn:
    """The stand-in on 127.0.0.1:<free port>, served from a background thread.

    Use it as a context manager, or through the ``standin`` fixture in tests/conftest.py.
    """

    def __init__(
        self,
        *,
        resources: Iterable[Resource] = RESOURCES,
        namespaces: Iterable[str] = NAMESPACES,
        version: tuple[int, int] = (1, 31),
    ) -> None:
        kinds = {(r.group, r.version, r.plural): r for r in resources}
        if len({r.plural for r in kinds.values()}) != len(kinds):
            raise ValueError("objects are keyed by plural: two resources share one")
        major, minor = version
        self.emulator = Emulator(
            kinds=kinds,
            version_info={
                "major": str(major),
                "minor": str(minor),
                "gitVersion": f"v{major}.{minor}.0",
                "gitCommit": "0" * 40,
                "gitTreeState": "clean",
                "buildDate": "2024-08-13T00:00:00Z",
                "goVersion": "go1.22.5",
                "compiler": "gc",
                "platform": "linux/amd64",
            },
        )
        for ns in namespaces:
            self.emulator._create(
                kinds["", "v1", "namespaces"], None, {"metadata": {"name": ns}}, dry_run=False
            )
        self.url = ""
        self._clients: list[client.ApiClient] = []
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._failure: list[BaseException] = []

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> Self:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self._thread.start()
        if not ready.wait(30) or self._failure:
            raise RuntimeError("the Kubernetes API stand-in did not start") from (
                self._failure[0] if self._failure else None
            )
        return self

    def _run(self, ready: threading.Event) -> None:
        try:
            asyncio.run(self._serve(ready))
        except BaseException as exc:
            self._failure.append(exc)
        finally:
            ready.set()

    async def _serve(self, ready: threading.Event) -> None:
        self._loop, self._stopping = asyncio.get_running_loop(), asyncio.Event()
        # No kmock.Server: it patches aiohttp's resolver process-wide for its own client.
        # handler_cancellation: a watch whose client hung up ends instead of waiting for events.
        server = aiohttp.web.Server(self.emulator, handler_cancellation=True)
        runner = aiohttp.web.ServerRunner(server, shutdown_timeout=1.0)
        async with self.emulator:
            await runner.setup()
            try:
                site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
                await site.start()
                self.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
                ready.set()
                await self._stopping.wait()
                self.emulator.end_watches()
                # kmock keeps the errors of discovery requests only while it is entered.
                self.emulator.crashes.extend(self._kmock_crashes())
            finally:
                await runner.cleanup()

    def stop(self) -> None:
        for api in self._clients:
            api.close()  # type: ignore[no-untyped-call]
        if self._loop is not None and self._stopping is not None and self._thread is not None:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                self._loop.call_soon_threadsafe(self._stopping.set)
            self._thread.join(30)
        if self._failure:
            raise RuntimeError("the Kubernetes API stand-in failed") from self._failure[0]

    def api_client(self) -> client.ApiClient:
        configuration = client.Configuration()
        configuration.host = self.url
        api = client.ApiClient(configuration)
        self._clients.append(api)
        return api

    def kubeconfig(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "current-context": "standin",
                    "clusters": [{"name": "standin", "cluster": {"server": self.url}}],
                    "users": [{"name": "standin", "user": {}}],
                    "contexts": [
                        {"name": "standin", "context": {"cluster": "standin", "user": "standin"}}
                    ],
                }
            )
        )
        return path

    def objects(self, resource: str | None = None) -> dict[Key, JSON]:
        """A deep copy of every stored object, keyed by (plural, namespace, name)."""
        with self.emulator.lock:
            return {
                k: copy.deepcopy(o)
                for k, o in self.emulator.store.items()
                if resource in (None, k[0])
            }

    def history(self, resource: str | None = None) -> list[tuple[str, JSON]]:
        """Every change so far, oldest first: (ADDED | MODIFIED | DELETED, the object after it)."""
        with self.emulator.lock:
            return [
                (c.type, copy.deepcopy(c.obj))
                for c in self.emulator.changes
                if resource in (None, c.plural)
            ]

    def calls(self) -> list[Call]:
        with self.emulator.lock:
            return list(self.emulator.calls)

    def writes(self) -> list[Call]:
        """Attempted creates, updates, patches and deletes, whatever they were answered."""
        return [c for c in self.calls() if c.verb in WRITE_VERBS]

    def fail(
        self,
        verb: str,
        resource: str,
        *,
        status: int = 500,
        times: int | None = 1,
        name: str | None = None,
        message: str = "injected by the test",
    ) -> None:
        """Answer the next ``times`` matching requests with a ``status`` Status; change nothing.

        ``verb`` is a Kubernetes verb or "*"; ``resource`` a plural, "plural/status", or "*".
        ``times=None`` fails every matching request until the test ends. A watch failed with 410
        gets what an expired resourceVersion gets: an ERROR event in a 200 stream.
        """
        with self.emulator.lock:
            self.emulator.faults.append(_Fault(verb, resource, name, status, message, times))

    def slow(self, verb: str, seconds: float) -> None:
        """Every later request of ``verb`` (get, create, …) waits ``seconds`` before it is served;
        requests wait side by side, as they would on a distant API server."""
        with self.emulator.lock:
            self.emulator.latency[verb] = seconds

    def crashes(self) -> list[BaseException]:
        """Exceptions of the stand-in itself (answered as 500): a bug here, not in Perch."""
        with self.emulator.lock:
            return [*self.emulator.crashes, *self._kmock_crashes()]

    def _kmock_crashes(self) -> list[BaseException]:
        errors = self.emulator.errors if self.emulator.active else []
        return [e for e in errors if not isinstance(e, kmock.KubernetesError)]
