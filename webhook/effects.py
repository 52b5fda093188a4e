"""Performs what an admission decision asks for, against the Kubernetes API.

One RequestEffects per admission request: it reads what review() needs (observe), then performs the
decision's actions in order. Writes to the Canary object carry the resourceVersion read before the
decision, so two racing updates cannot both win: the loser gets Conflict and is decided again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, Final

from kubernetes.client.exceptions import ApiException

from perch.names import (
    ANNOTATION_REVISION,
    ANNOTATION_SPEC,
    LABEL_MANAGED_BY,
    MANAGED_BY_VALUE,
    canary_name,
)
from perch.objects import canary_deployment, canary_hpa, canary_service, owner_reference
from perch.resources import CANARIES, DEPLOYMENTS, HPAS, SERVICES, Kube, Resource, resource_version
from perch.routers import RouteRef, RouteTarget, router_for
from perch.spec import CanarySpec, SpecError
from perch.speccache import cached_parse_spec as parse_spec
from perch.status import CanaryStatus, canary_object, terminated
from webhook.admission import AdmissionRequest
from webhook.review import (
    Action,
    AdoptWhenCreated,
    CanaryRecord,
    Decision,
    EnsureCanaryService,
    EnsureCanaryWorkload,
    EnsureRoutes,
    HandBack,
    Observed,
    WriteCanaryObject,
)

log = logging.getLogger("perch.webhook")


class Conflict(Exception):
    """The Canary object changed between observing and writing; decide again."""


def is_ours(obj: Mapping[str, Any] | None) -> bool:
    labels = ((obj or {}).get("metadata") or {}).get("labels") or {}
    return bool(labels.get(LABEL_MANAGED_BY) == MANAGED_BY_VALUE)


def _resource(ref: RouteRef) -> Resource:
    return Resource(ref.group, ref.version, ref.plural)


def _keep_metadata(existing: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any]:
    """Metadata for a PUT: the server's identity fields kept, Perch's labels and owners applied."""
    meta = {k: v for k, v in (existing.get("metadata") or {}).items() if k != "managedFields"}
    new = desired.get("metadata") or {}
    meta["labels"] = {**(meta.get("labels") or {}), **(new.get("labels") or {})}
    if new.get("annotations"):
        meta["annotations"] = {**(meta.get("annotations") or {}), **new["annotations"]}
    if new.get("ownerReferences"):
        meta["ownerReferences"] = new["ownerReferences"]
    return meta


class RequestEffects:
    def __init__(
        self, kube: Kube, req: AdmissionRequest, spec: CanarySpec | None, *, adopt_timeout: float
    ):
        self.kube = kube
        self.req = req
        self.spec = spec
        self.adopt_timeout = adopt_timeout
        self.warnings: list[str] = []
        self._cache: dict[tuple[Resource, str], dict[str, Any] | None] = {}
        self._pending: list[Future[None]] = []
        primary = req.object or {}
        self.owners = owner_reference(primary)
        self.target = RouteTarget(
            name=req.name, namespace=req.namespace, owner_references=tuple(self.owners)
        )

    # Reading

    def _get(self, res: Resource, name: str) -> dict[str, Any] | None:
        key = (res, name)
        if key not in self._cache:
            self._cache[key] = self.kube.get(res, self.req.namespace, name)
        return self._cache[key]

    def _remember(self, res: Resource, name: str, obj: dict[str, Any] | None) -> None:
        self._cache[(res, name)] = obj

    def _route_refs(self, spec: CanarySpec) -> tuple[RouteRef, ...]:
        return router_for(spec.provider).refs(self.target, spec)

    def _prefetch(self, keys: list[tuple[Resource, str]]) -> None:
        """Reads the objects at once, each on its own connection: one round trip, not one each.

        A spawn reads up to seven objects before deciding and writing; in series their round
        trips were most of its latency through a busy API server (benchmarks/README.md).
        """
        missing = [key for key in dict.fromkeys(keys) if key not in self._cache]
        if len(missing) <= 1:
            for res, name in missing:
                self._get(res, name)
            return
        ns = self.req.namespace
        futures = [(key, _calls().submit(self.kube.get, key[0], ns, key[1])) for key in missing]
        for key, future in futures:
            self._cache[key] = future.result()

    def observe(self) -> Observed:
        assert self.spec is not None
        cname = canary_name(self.req.name)
        reads: list[tuple[Resource, str]] = [(CANARIES, self.req.name)]
        reads += [(_resource(ref), ref.name) for ref in self._route_refs(self.spec)]
        reads += [(DEPLOYMENTS, cname), (SERVICES, cname)]
        ref = self.spec.autoscaler_ref
        if ref is not None and ref.kind == "HorizontalPodAutoscaler":
            # Read now as well: a release that spawns the canary copies the primary's HPA.
            reads += [(HPAS, ref.name), (HPAS, cname)]
        self._prefetch(reads)
        raw = self._get(CANARIES, self.req.name)
        record = None
        if raw is not None:
            record = CanaryRecord(
                revision=str((raw.get("spec") or {}).get("revision") or ""),
                status=CanaryStatus.from_wire(raw.get("status")),
                resource_version=resource_version(raw),
            )
        foreign: list[str] = []
        named: list[tuple[Resource, str, str]] = [
            (_resource(ref), ref.kind, ref.name) for ref in self._route_refs(self.spec)
        ]
        named += [(DEPLOYMENTS, "Deployment", cname), (SERVICES, "Service", cname)]
        for res, kind, name in named:
            obj = self._get(res, name)
            if obj is not None and not is_ours(obj):
                foreign.append(f"{kind} {self.req.namespace}/{name}")
        return Observed(canary=record, foreign_objects=tuple(foreign))

    # Writing

    def perform(self, decision: Decision) -> list[str]:
        # Every action converges on a desired state, so after any 409 (a racing admission, the
        # analyzer writing) the whole request is observed and decided again, not patched up.
        failure: BaseException | None = None
        try:
            for action in decision.actions:
                self._perform(action)
        except BaseException as exc:  # re-raised below, once the writes in flight have ended
            failure = exc
        # Writes made side by side (the Canary object's status, the canary's HPA) end before the
        # answer, whatever happened meanwhile: nothing is left running for a request answered.
        for pending in self._pending:
            try:
                pending.result()
            except BaseException as exc:
                failure = failure or exc
        if failure is None:
            return self.warnings
        if isinstance(failure, ApiException) and failure.status == 409:
            raise Conflict(str(failure.reason)) from failure
        raise failure

    def _perform(self, action: Action) -> None:
        match action:
            case WriteCanaryObject():
                self._write_canary_object(action)
            case EnsureCanaryService():
                self._ensure_canary_service()
            case EnsureCanaryWorkload():
                self._ensure_workload(action)
            case EnsureRoutes():
                self._ensure_routes(reset=action.reset)
            case HandBack():
                self._hand_back()
            case AdoptWhenCreated():
                self._start_adopter()

    def _write_canary_object(self, action: WriteCanaryObject) -> None:
        assert self.spec is not None
        ns, name = self.req.namespace, self.req.name
        body = canary_object(
            name=name,
            namespace=ns,
            provider=self.spec.provider,
            owner_references=self.owners,
            revision=action.revision,
            template=action.template,
        )
        if action.expected_resource_version is None:
            written = self.kube.create(CANARIES, ns, body)
        else:
            existing = self._get(CANARIES, name) or {}
            body["metadata"] = _keep_metadata(existing, body)
            body["metadata"]["resourceVersion"] = action.expected_resource_version
            written = self.kube.replace(CANARIES, ns, name, body)
        status_body = {
            "metadata": {"resourceVersion": resource_version(written)},
            "status": action.status.to_wire(),
        }
        # The spec write above is the decision's compare-and-swap (a racing admission gets 409
        # there and decides again); once it holds, the status and the objects that follow it
        # depend on nothing but the decision, so they are written side by side: one round trip
        # instead of one each.
        self._pending.append(_calls().submit(self._write_status, status_body))

    def _write_status(self, body: dict[str, Any]) -> None:
        ns, name = self.req.namespace, self.req.name
        self._remember(
            CANARIES, name, self.kube.merge_patch(CANARIES, ns, name, body, subresource="status")
        )

    def _ensure_canary_service(self) -> None:
        assert self.spec is not None
        primary = self.req.object or {}
        desired = canary_service(primary, spec=self.spec)
        name = desired["metadata"]["name"]
        existing = self._get(SERVICES, name)
        if existing is None:
            self._remember(SERVICES, name, self.kube.create(SERVICES, self.req.namespace, desired))
            return
        current = existing.get("spec") or {}
        if current.get("selector") == desired["spec"]["selector"] and _ports_match(
            current.get("ports"), desired["spec"]["ports"]
        ):
            self._adopt(SERVICES, name, existing)
            return
        patch: dict[str, Any] = {
            "metadata": {"resourceVersion": resource_version(existing)},
            "spec": {"selector": desired["spec"]["selector"], "ports": desired["spec"]["ports"]},
        }
        if self.owners:
            patch["metadata"]["ownerReferences"] = self.owners
        self._remember(
            SERVICES, name, self.kube.merge_patch(SERVICES, self.req.namespace, name, patch)
        )

    def _adopt(self, res: Resource, name: str, existing: dict[str, Any]) -> None:
        """Give an object made during a CREATE (no uid then) its owner, if the adopter has not."""
        metadata = existing.get("metadata") or {}
        if not self.owners or metadata.get("ownerReferences") or not is_ours(existing):
            return
        body = {
            "metadata": {
                "ownerReferences": self.owners,
                "resourceVersion": resource_version(existing),
            }
        }
        self._remember(res, name, self.kube.merge_patch(res, self.req.namespace, name, body))

    def _ensure_workload(self, action: EnsureCanaryWorkload) -> None:
        assert self.spec is not None
        ns = self.req.namespace
        primary = self.req.object or {}
        desired = canary_deployment(primary, template=action.template, revision=action.revision)
        name = desired["metadata"]["name"]
        existing = self._get(DEPLOYMENTS, name)
        # The canary's HPA does not need its Deployment to exist: both are written at once.
        self._pending.append(_calls().submit(self._ensure_hpa))
        if existing is None:
            self._remember(DEPLOYMENTS, name, self.kube.create(DEPLOYMENTS, ns, desired))
        else:
            annotations = (existing.get("metadata") or {}).get("annotations") or {}
            if annotations.get(ANNOTATION_REVISION) != action.revision:
                desired["metadata"] = _keep_metadata(existing, desired)
                if self.spec.autoscaler_ref is not None:
                    # The canary's HPA owns its replica count; a PUT must not reset it.
                    desired["spec"]["replicas"] = (existing.get("spec") or {}).get(
                        "replicas", desired["spec"]["replicas"]
                    )
                self._remember(DEPLOYMENTS, name, self.kube.replace(DEPLOYMENTS, ns, name, desired))

    def _ensure_hpa(self) -> None:
        assert self.spec is not None
        ref = self.spec.autoscaler_ref
        if ref is None or ref.kind != "HorizontalPodAutoscaler":
            return
        ns = self.req.namespace
        primary_hpa = self._get(HPAS, ref.name)
        if primary_hpa is None:
            self.warnings.append(
                f"perch: autoscalerRef names HorizontalPodAutoscaler {ns}/{ref.name}, which does "
                "not exist; the canary runs without one"
            )
            return
        desired = canary_hpa(self.req.object or {}, primary_hpa=primary_hpa)
        name = desired["metadata"]["name"]
        existing = self._get(HPAS, name)
        if existing is None:
            self._remember(HPAS, name, self.kube.create(HPAS, ns, desired))
        elif is_ours(existing) and existing.get("spec") != desired["spec"]:
            desired["metadata"] = _keep_metadata(existing, desired)
            self._remember(HPAS, name, self.kube.replace(HPAS, ns, name, desired))

    def _ensure_routes(self, *, reset: bool, spec: CanarySpec | None = None) -> None:
        spec = spec or self.spec
        assert spec is not None
        ns = self.req.namespace
        refs = {(r.kind, r.name): r for r in self._route_refs(spec)}
        for desired in router_for(spec.provider).build(self.target, spec, canary_weight=0):
            ref = refs[(desired["kind"], desired["metadata"]["name"])]
            res = _resource(ref)
            existing = self._get(res, ref.name)
            if existing is None:
                self._remember(res, ref.name, self.kube.create(res, ns, desired))
            elif is_ours(existing) and reset and existing.get("spec") != desired["spec"]:
                desired["metadata"] = _keep_metadata(existing, desired)
                self._remember(res, ref.name, self.kube.replace(res, ns, ref.name, desired))
            else:
                self._adopt(res, ref.name, existing)

    def _hand_back(self) -> None:
        ns, name = self.req.namespace, self.req.name
        old_annotations = ((self.req.old_object or {}).get("metadata") or {}).get(
            "annotations"
        ) or {}
        try:
            old_spec = parse_spec(old_annotations.get(ANNOTATION_SPEC))
        except SpecError:
            old_spec = None
        if old_spec is not None:
            self._ensure_routes(reset=True, spec=old_spec)
        cname = canary_name(name)
        for res in (DEPLOYMENTS, SERVICES, HPAS):
            if is_ours(self._get(res, cname)):
                self.kube.delete(res, ns, cname)
        canary = self._get(CANARIES, name)
        if canary is not None:
            status = terminated(CanaryStatus.from_wire(canary.get("status")), at=_now())
            body = {
                "metadata": {"resourceVersion": resource_version(canary)},
                "status": status.to_wire(),
            }
            try:
                self.kube.merge_patch(CANARIES, ns, name, body, subresource="status")
            except ApiException as exc:
                if exc.status != 409:
                    raise
                # The analyzer wrote in between; its next tick sees the opt-out and stops.

    def _start_adopter(self) -> None:
        assert self.spec is not None
        owned: list[tuple[Resource, str]] = [(CANARIES, self.req.name)]
        owned += [(SERVICES, canary_name(self.req.name))]
        owned += [(_resource(ref), ref.name) for ref in self._route_refs(self.spec)]
        adopter = Adopter(self.kube, namespace=self.req.namespace, name=self.req.name, owned=owned)
        thread = threading.Thread(
            target=adopter.run,
            args=(self.adopt_timeout,),
            name=f"adopt-{self.req.name}",
            daemon=True,
        )
        thread.start()


# Shared by the requests of one worker process; made on first use, so after gunicorn's fork.
_CALLS: ThreadPoolExecutor | None = None
_CALLS_LOCK = threading.Lock()
CALL_THREADS: Final = 16


def _calls() -> ThreadPoolExecutor:
    global _CALLS  # noqa: PLW0603 -- one pool per process, made lazily (see above)
    with _CALLS_LOCK:
        if _CALLS is None:
            _CALLS = ThreadPoolExecutor(CALL_THREADS, thread_name_prefix="perch-call")
        return _CALLS


def _ports_match(current: Any, desired: list[dict[str, Any]]) -> bool:
    keys = ("name", "port", "targetPort", "protocol", "appProtocol")
    if not isinstance(current, list) or len(current) != len(desired):
        return False
    return all(
        {k: c.get(k) for k in keys if k in d} == {k: d[k] for k in keys if k in d}
        for c, d in zip(current, desired, strict=True)
    )


def _now() -> datetime:
    return datetime.now(UTC)


class Adopter:
    """Gives the objects made during a CREATE their ownerReference once the Deployment exists.

    At admission of a CREATE the Deployment has no uid yet, so nothing can name it as owner. If the
    Deployment never appears (a later admission plugin rejected it), the objects are removed.
    """

    def __init__(self, kube: Kube, *, namespace: str, name: str, owned: list[tuple[Resource, str]]):
        self.kube = kube
        self.namespace = namespace
        self.name = name
        self.owned = owned

    def run(self, timeout: float, poll: float = 0.25) -> bool:
        deadline = time.monotonic() + timeout
        try:
            while True:
                primary = self.kube.get(DEPLOYMENTS, self.namespace, self.name)
                owners = owner_reference(primary) if primary else []
                if owners:
                    self._adopt(owners)
                    return True
                if time.monotonic() >= deadline:
                    self._remove_orphans()
                    return False
                time.sleep(poll)
        except Exception:
            # A background thread has no one to report to but the log; the analyzer reconciles.
            log.exception("adopting objects of %s/%s failed", self.namespace, self.name)
            return False

    def _adopt(self, owners: list[dict[str, Any]]) -> None:
        for res, name in self.owned:
            obj = self.kube.get(res, self.namespace, name)
            if (
                obj is None
                or not is_ours(obj)
                or (obj.get("metadata") or {}).get("ownerReferences")
            ):
                continue
            body = {
                "metadata": {"ownerReferences": owners, "resourceVersion": resource_version(obj)}
            }
            try:
                self.kube.merge_patch(res, self.namespace, name, body)
            except ApiException as exc:
                if exc.status != 409:
                    raise
                log.info(
                    "object %s/%s changed while adopting; the analyzer will adopt it",
                    self.namespace,
                    name,
                )

    def _remove_orphans(self) -> None:
        # The Canary object goes last: while it exists, the rest is still findable through it.
        for res, name in reversed(self.owned):
            obj = self.kube.get(res, self.namespace, name)
            if (
                obj is not None
                and is_ours(obj)
                and not (obj.get("metadata") or {}).get("ownerReferences")
            ):
                self.kube.delete(res, self.namespace, name)
        log.info(
            "Deployment %s/%s was not created after admission; removed the objects made for it",
            self.namespace,
            self.name,
        )
