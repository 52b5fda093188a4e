"""Performs the actions step() decided, against the Kubernetes API and the outside world.

The actions come in the order of the commit protocol (analyzer.step): the Canary object's saved
template, the status (``CommitStatus``, which the shell writes through the ``commit`` callback),
then the writes to the cluster, the records, and the control annotation. Every write converges on
a desired state (weights, replicas, a template), so the next tick can finish one cut short.
The writes that follow a read carry its resourceVersion (the saved template, the primary's
template), so a write based on a stale read is refused rather than applied.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from kubernetes.client.exceptions import ApiException

from analyzer import faults
from analyzer.cache import clone
from analyzer.events import EventRecorder
from analyzer.model import (
    Action,
    CallGates,
    ClearControl,
    CommitStatus,
    Event,
    Notify,
    PromoteTemplate,
    RestorePrimary,
    SaveStableTemplate,
    ScaleCanary,
    SetWeights,
)
from analyzer.notify import Notifications, spec_context
from analyzer.routes import Routes
from analyzer.step import route_revision
from perch.fields import applied_configuration, applier_of
from perch.names import (
    ANNOTATION_ACTION,
    ANNOTATION_PROMOTED_REVISION,
    LABEL_MANAGED_BY,
    MANAGED_BY_VALUE,
    canary_name,
    json_pointer,
)
from perch.objects import owner_reference
from perch.resources import CANARIES, DEPLOYMENTS, Kube, Resource, resource_version
from perch.revision import template_revision
from perch.routers import RouteTarget, router_for
from perch.spec import CanarySpec, WebhookType
from perch.status import CanaryStatus

log = logging.getLogger("perch.analyzer")


class GateCaller(Protocol):
    def fire(
        self,
        spec: CanarySpec,
        *,
        type_: WebhookType,
        name: str,
        namespace: str,
        phase: str,
        checksum: str,
    ) -> None:
        """Call the spec's gates of this type without waiting for or judging the answer."""
        ...


@dataclass
class TickContext:
    namespace: str
    name: str
    spec: CanarySpec
    canary: dict[str, Any]  # the Canary object as read at the start of the tick
    primary: dict[str, Any]  # the primary Deployment as read at the start of the tick
    status: CanaryStatus  # the status after the step
    # Route objects already read this tick, by name: the weights are set without reading again.
    # Read only: they may be the watch cache's own.
    routes: dict[str, Mapping[str, Any]] = field(default_factory=dict)


class Actor:
    def __init__(
        self,
        kube: Kube,
        *,
        events: EventRecorder,
        gates: GateCaller,
        notifier: Notifications,
        routes: Routes | None = None,
    ) -> None:
        self.kube = kube
        self.events = events
        self.gates = gates
        self.notifier = notifier
        self.routes = routes if routes is not None else Routes(kube)

    def perform(
        self,
        ctx: TickContext,
        actions: tuple[Action, ...],
        *,
        commit: Callable[[TickContext], None],
    ) -> None:
        """Performs the actions in order; ``commit`` writes the status at CommitStatus (and
        raises when the write is refused, which ends the tick there)."""
        for action in actions:
            match action:
                case SaveStableTemplate():
                    self.save_stable(ctx, revision=action.revision)
                case CommitStatus():
                    commit(ctx)
                case SetWeights():
                    # The route's shape follows the status committed just before (the commit
                    # protocol), so a route re-issued by a later tick has the same shape.
                    self.set_weights(ctx, canary=action.canary, revision=route_revision(ctx.status))
                case ScaleCanary():
                    self.scale_canary(ctx, replicas=action.replicas)
                case PromoteTemplate():
                    self.promote(ctx, revision=action.revision)
                case RestorePrimary():
                    self.restore(ctx, revision=action.revision)
                case CallGates():
                    self.gates.fire(
                        ctx.spec,
                        type_=action.type,
                        name=ctx.name,
                        namespace=ctx.namespace,
                        phase=action.phase,
                        checksum=ctx.status.canary_revision,
                    )
                case Event():
                    self.events.record(
                        ctx.canary, reason=action.reason, message=action.message, type_=action.type
                    )
                case Notify():
                    context = spec_context(ctx.spec)
                    context["canary"] = ctx.name
                    context["namespace"] = ctx.namespace
                    context["revision"] = ctx.status.canary_revision
                    context["phase"] = ctx.status.phase
                    context["weight"] = ctx.status.canary_weight
                    context["failed_checks"] = ctx.status.failed_checks
                    self.notifier.send(
                        action.kind,
                        action.message,
                        alerts=ctx.spec.analysis.alerts,
                        on_unresolved=self._alert_not_sent(ctx.canary),
                        **context,
                    )
                case ClearControl():
                    self.clear_control(ctx)
            faults.after(action, phase=ctx.status.phase)

    def _alert_not_sent(self, canary: dict[str, Any]) -> Callable[[str], None]:
        """A Warning event on the Canary for an alert whose provider could not be used (called
        from the notifications' thread, after the tick)."""

        def record(message: str) -> None:
            self.events.record(canary, reason="AlertNotSent", message=message, type_="Warning")

        return record

    def set_weights(self, ctx: TickContext, *, canary: int, revision: str = "") -> None:
        """The route objects at `canary` percent; with `revision` (the canary revision under
        analysis) also what the analysis adds, without it the plain weighted split."""
        target = RouteTarget(
            name=ctx.name,
            namespace=ctx.namespace,
            owner_references=tuple(owner_reference(ctx.primary)),
        )
        router = router_for(ctx.spec.provider)
        refs = {(r.kind, r.name): r for r in router.refs(target, ctx.spec)}
        for desired in router.build(target, ctx.spec, canary_weight=canary, revision=revision):
            ref = refs[(desired["kind"], desired["metadata"]["name"])]
            res = Resource(ref.group, ref.version, ref.plural)
            existing = ctx.routes.pop(ref.name, None) or self.routes.read(ref, ctx.namespace)
            if existing is None:
                self.routes.wrote(ref, ctx.namespace, self.kube.create(res, ctx.namespace, desired))
                continue
            labels = (existing.get("metadata") or {}).get("labels") or {}
            if labels.get(LABEL_MANAGED_BY) != MANAGED_BY_VALUE:
                raise RouteNotOurs(f"{ref.kind} {ctx.namespace}/{ref.name} is not managed by Perch")
            if existing.get("spec") == desired["spec"]:
                continue
            body = clone(existing)
            body.pop("status", None)
            # Left out, the API server keeps them as they are; sent, it decodes and checks them
            # on every write of the weights.
            body.get("metadata", {}).pop("managedFields", None)
            body["spec"] = desired["spec"]
            self.routes.wrote(
                ref, ctx.namespace, self.kube.replace(res, ctx.namespace, ref.name, body)
            )

    def scale_canary(self, ctx: TickContext, *, replicas: int | None) -> None:
        if replicas is None:
            replicas = int((ctx.primary.get("spec") or {}).get("replicas") or 1)
        cname = canary_name(ctx.name)
        if self.kube.get(DEPLOYMENTS, ctx.namespace, cname) is None:
            return
        self.kube.merge_patch(DEPLOYMENTS, ctx.namespace, cname, {"spec": {"replicas": replicas}})

    def save_stable(self, ctx: TickContext, *, revision: str) -> None:
        """The primary's template, the last good one, kept in the Canary object for a restore."""
        primary_template = (ctx.primary.get("spec") or {}).get("template") or {}
        if template_revision(primary_template) != revision:
            raise PromotionError(
                f"the primary {ctx.namespace}/{ctx.name} no longer runs revision {revision}"
            )
        spec = ctx.canary.get("spec") or {}
        if (
            spec.get("stableTemplate") == primary_template
            and spec.get("stableRevision") == revision
        ):
            return
        # Conditional on the Canary read at the start of the tick, like the status write that
        # follows; its answer carries the resourceVersion that write needs.
        try:
            ctx.canary = self.kube.merge_patch(
                CANARIES,
                ctx.namespace,
                ctx.name,
                {
                    "metadata": {"resourceVersion": resource_version(ctx.canary)},
                    "spec": {"stableTemplate": primary_template, "stableRevision": revision},
                },
            )
        except ApiException as exc:
            if _refused(exc):
                raise StaleRead("the Canary object was written by someone else") from exc
            raise

    def promote(self, ctx: TickContext, *, revision: str) -> None:
        template = (ctx.canary.get("spec") or {}).get("template")
        if not isinstance(template, dict):
            raise PromotionError(
                f"the Canary {ctx.namespace}/{ctx.name} holds no template to promote"
            )
        self._replace_primary_template(ctx, template=template, mark=revision)

    def restore(self, ctx: TickContext, *, revision: str) -> None:
        spec = ctx.canary.get("spec") or {}
        stable = spec.get("stableTemplate")
        if not isinstance(stable, dict) or spec.get("stableRevision") != revision:
            raise PromotionError(
                f"no saved template of revision {revision} to restore for "
                f"{ctx.namespace}/{ctx.name}"
            )
        self._replace_primary_template(ctx, template=stable, mark=revision)

    def _replace_primary_template(
        self, ctx: TickContext, *, template: Mapping[str, Any], mark: str
    ) -> None:
        """The template into the primary with the mark, conditional on the primary as read.

        A template a tool server-side applied (Helm 4, Argo CD, Flux) is written as that tool,
        through its own apply configuration (perch.fields): an Update by Perch would take the
        fields over, and the tool's next apply would conflict with Perch. Anything else gets a
        JSON patch: not a merge patch, which would keep map keys the new template dropped.
        """
        applier = applier_of(ctx.primary, "spec", "template")
        try:
            if applier is not None:
                self._apply_as(ctx, applier, template=template, mark=mark)
                return
            ops = [
                # The generation, not the resourceVersion: the Deployment controller's status
                # writes change the latter all through a rollout, and are no reason to refuse.
                _test_generation(ctx.primary),
                {"op": "replace", "path": "/spec/template", "value": dict(template)},
            ]
            if (ctx.primary.get("metadata") or {}).get("annotations") is None:
                ops.append({"op": "add", "path": "/metadata/annotations", "value": {}})
            ops.append(
                {
                    "op": "add",
                    "path": json_pointer("metadata", "annotations", ANNOTATION_PROMOTED_REVISION),
                    "value": mark,
                }
            )
            self.kube.json_patch(DEPLOYMENTS, ctx.namespace, ctx.name, ops)
        except ApiException as exc:
            if _refused(exc):
                raise StaleRead(f"the primary changed since it was read: {exc.reason}") from exc
            raise

    def _apply_as(
        self, ctx: TickContext, applier: str, *, template: Mapping[str, Any], mark: str
    ) -> None:
        """The template applied as `applier`, with Perch's mark written before as Perch's own:
        the tool's next apply then leaves the mark alone and git and the live object agree. The
        mark changes no template, so the webhook is not asked for it."""
        annotations = (ctx.primary.get("metadata") or {}).get("annotations") or {}
        ops: list[dict[str, Any]] = [_test_generation(ctx.primary)]
        if annotations.get(ANNOTATION_PROMOTED_REVISION) != mark:
            if not annotations:
                ops.append({"op": "add", "path": "/metadata/annotations", "value": {}})
            ops.append(
                {
                    "op": "add",
                    "path": json_pointer("metadata", "annotations", ANNOTATION_PROMOTED_REVISION),
                    "value": mark,
                }
            )
        current = self.kube.json_patch(DEPLOYMENTS, ctx.namespace, ctx.name, ops)
        config = applied_configuration(ctx.primary, applier)
        config["metadata"].get("annotations", {}).pop(ANNOTATION_PROMOTED_REVISION, None)
        config.setdefault("spec", {})["template"] = dict(template)
        for _ in range(_APPLY_ATTEMPTS):
            config["metadata"]["resourceVersion"] = resource_version(current)
            try:
                self.kube.apply(DEPLOYMENTS, ctx.namespace, ctx.name, config, field_manager=applier)
                return
            except ApiException as exc:
                if exc.status != 409:
                    raise
            # Refused because the object changed since: go on only if nothing but its status
            # did (same generation), else it is someone's update and the next tick decides.
            fresh = self.kube.get(DEPLOYMENTS, ctx.namespace, ctx.name) or {}
            if (fresh.get("metadata") or {}).get("generation") != current["metadata"].get(
                "generation"
            ):
                raise StaleRead("the primary was updated while the promotion was written")
            current = fresh
        raise StaleRead("the primary kept changing while the promotion was written")

    def clear_control(self, ctx: TickContext) -> None:
        body = {"metadata": {"annotations": {ANNOTATION_ACTION: None}}}
        self.kube.merge_patch(DEPLOYMENTS, ctx.namespace, ctx.name, body)


_APPLY_ATTEMPTS = 5


def _test_generation(obj: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON patch precondition: the object's spec and annotations are as read."""
    return {
        "op": "test",
        "path": "/metadata/generation",
        "value": (obj.get("metadata") or {}).get("generation"),
    }


class StaleRead(Exception):
    """A conditional write was refused: what the tick read has changed since."""


def _refused(exc: ApiException) -> bool:
    # 409: a resourceVersion precondition failed; 422: a JSON patch "test" op failed.
    return exc.status in (409, 422)


class RouteNotOurs(Exception):
    """A route under Perch's name was made by someone else; Perch does not overwrite it."""


class PromotionError(Exception):
    """What a promotion needs is missing from the Canary object."""
