"""One analysis tick of one canary, and what it needs from the rest of the service.

`Analyzer.tick(namespace, name)` is the APScheduler job: read (from the watch cache), observe,
decide with the pure `step()`, act, and write the status last with a resourceVersion
precondition, so that a tick is all or nothing and a restarted analyzer continues where the last
one stopped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import requests
from kubernetes.client.exceptions import ApiException

from analyzer.act import Actor, StaleRead, TickContext
from analyzer.events import EventRecorder
from analyzer.gates import post_event, run_gates
from analyzer.metrics.judge import judge
from analyzer.metrics.prometheus import Measurement, PrometheusProvider
from analyzer.metrics.queries import QuerySetName, query_set_for
from analyzer.metrics.resolver import TemplateResolver
from analyzer.model import Event, GateResult, MetricResult, Observations
from analyzer.notify import Notifications
from analyzer.observe import control_action, route_analysing, route_weights, workload
from analyzer.routes import RouteCache, Routes
from analyzer.step import needs, step
from analyzer.telemetry import Telemetry
from perch.names import (
    ANNOTATION_CANARY_REVISION,
    ANNOTATION_REVISION,
    ANNOTATION_SPEC,
    CANARY_SUFFIX,
    canary_name,
    is_opted_in,
)
from perch.objects import canary_deployment
from perch.resources import CANARIES, DEPLOYMENTS, HPAS, Kube, resource_version
from perch.revision import template_revision
from perch.routers import RouteTarget, router_for
from perch.spec import CanarySpec, Metric, SpecError, WebhookType
from perch.speccache import cached_parse_spec
from perch.status import CanaryStatus, Phase, entered, wire_holds_slot

log = logging.getLogger("perch.analyzer")

# Phases in which nothing moves: no routes, metrics or gates are read for them. (Failed is not
# one: a canary that failed while the primary had no ready pods still serves, and hands traffic
# back once the primary is ready.)
IDLE_PHASES: frozenset[Phase] = frozenset({"Initialized", "Succeeded", "Terminated"})


def spec_of(primary: Mapping[str, Any]) -> CanarySpec | None:
    annotations = (primary.get("metadata") or {}).get("annotations") or {}
    if not is_opted_in(annotations):
        return None
    try:
        return cached_parse_spec(annotations.get(ANNOTATION_SPEC))
    except SpecError:
        # The webhook refuses invalid specs; one can only be here if it was stored around it.
        return None


# How long after the webhook recorded a revision the primary may take to carry it: the API server
# stores an admitted update within its request timeout (60 s at most).
ORPHAN_GRACE_SECONDS = 120.0


def is_orphan(
    status: CanaryStatus,
    primary: Mapping[str, Any],
    *,
    now: datetime,
    grace_seconds: float = ORPHAN_GRACE_SECONDS,
) -> bool:
    """A canary whose release never landed: admission answered, then a later admission plugin (or
    a failed write) refused the update, so the primary never recorded the revision held back."""
    if not status.active or not status.canary_revision or not status.phase_entered_at:
        return False
    annotations = (primary.get("metadata") or {}).get("annotations") or {}
    requested = {annotations.get(ANNOTATION_CANARY_REVISION), annotations.get(ANNOTATION_REVISION)}
    if status.canary_revision in requested:
        return False
    try:
        entered = datetime.fromisoformat(status.phase_entered_at.replace("Z", "+00:00"))
    except ValueError:
        return False
    return (now - entered).total_seconds() > grace_seconds


class MetricBatcher:
    """One PromQL query per metric and namespace serves every canary in it.

    The first canary of a namespace to need a builtin metric queries it for all canaries there
    that use the same metric (same name, histogram and window); the others reuse the measurement
    while it is younger than half their interval. What is shared is the measured value, not the
    verdict: each canary's value is judged against its own thresholdRange. Ticks that need the
    same measurement while it is being queried wait for that answer rather than send the query
    again (with a hundred canaries in a namespace, several are due during one query).

    A metric with ``primary`` (a comparative check) is also judged against the primary over the
    same window through :meth:`PrometheusProvider.compare` (one query for a builtin); with a
    thresholdRange too, both are judged and :meth:`combine` makes them one result, so that step()
    still sees one result per metric name.

    A ``templateRef`` metric is resolved first (``templates``, analyzer.metrics.resolver): its
    MetricTemplate's query is sent to the template's server (its own provider, with the Secret's
    credentials); a template that cannot be used is that metric's failed result. Without
    ``templates`` every templateRef metric fails, saying so.
    """

    def __init__(
        self,
        provider: PrometheusProvider,
        *,
        canaries: Callable[[str], list[str]],
        templates: TemplateResolver | None = None,
    ):
        self.provider = provider
        self.templates = templates
        self._canaries = canaries
        self._lock = threading.Lock()
        self._measured: dict[tuple[Any, ...], tuple[float, dict[str, Measurement]]] = {}
        # One lock per measurement: held while it is queried, so that it is queried once.
        self._querying: dict[tuple[Any, ...], threading.Lock] = {}

    def evaluate(
        self,
        namespace: str,
        spec: CanarySpec,
        metric: Metric,
        *,
        target: str,
        primary: str | None = None,
        at: datetime | None = None,
    ) -> MetricResult:
        """The metric's result for the canary Deployment ``target``.

        ``primary`` is the primary Deployment's name (by default ``target`` without its
        ``-canary`` suffix), used only by comparative checks. ``at`` judges a past instant
        (replay, deterministic tests); such answers are neither taken from nor put in the cache,
        which holds answers about "now".
        """
        query_set = query_set_for(spec.provider)
        provider, template = self.provider, None
        if metric.template_ref is not None:
            if self.templates is None:
                return MetricResult(
                    name=metric.name,
                    outcome="error",
                    value=None,
                    message=f"metric {metric.name}: this analyzer reads no MetricTemplates",
                )
            resolved = self.templates.resolve(namespace, metric)
            if isinstance(resolved, MetricResult):
                return resolved
            provider, template = resolved.provider, resolved.template.query
        absolute: MetricResult | None = None
        if metric.threshold_range.has_bounds:
            absolute = self._absolute(
                namespace, spec, metric, target=target, at=at, provider=provider, template=template
            )
        if metric.primary is None:
            if absolute is None:
                # The spec refuses such a metric; never read "nothing to judge" as a pass.
                return MetricResult(
                    name=metric.name,
                    outcome="error",
                    value=None,
                    message=f"metric {metric.name} has neither thresholdRange nor primary",
                )
            return absolute
        relative = provider.compare(
            namespace,
            metric,
            canary=target,
            primary=primary if primary is not None else target.removesuffix(CANARY_SUFFIX),
            max_delta=metric.primary.max_delta,
            max_ratio=metric.primary.max_ratio,
            at=at,
            query_set=query_set,
            template=template,
        )
        return relative if absolute is None else self.combine(absolute, relative)

    def _absolute(
        self,
        namespace: str,
        spec: CanarySpec,
        metric: Metric,
        *,
        target: str,
        at: datetime | None,
        provider: PrometheusProvider | None = None,
        template: str | None = None,
    ) -> MetricResult:
        """The thresholdRange check, batched over the namespace's canaries for a builtin."""
        query_set = query_set_for(spec.provider)
        if metric.builtin is None:
            return (provider or self.provider).evaluate_one(
                namespace, metric, target, at=at, query_set=query_set, template=template
            )
        key = (namespace, metric.builtin, metric.histogram_unit, metric.interval, query_set)
        max_age = max(spec.analysis.interval_seconds / 2, 0.2)
        value: Measurement | None = None
        if at is None:
            value = self._fresh(key, target, max_age)
            if value is None:
                with self._lock:
                    querying = self._querying.setdefault(key, threading.Lock())
                with querying:
                    # Another tick may have measured it while this one waited.
                    value = self._fresh(key, target, max_age)
                    if value is None:
                        value = self._measure(namespace, metric, target, key, query_set)
        else:
            targets = sorted({target, *self._canaries(namespace)})
            measured = self.provider.measure(namespace, metric, targets, at=at, query_set=query_set)
            value = measured.get(target)
        if value is None:
            return MetricResult(
                name=metric.name, outcome="error", value=None, message="no result for " + target
            )
        if isinstance(value, MetricResult):
            # No data or a failed query; named after the metric that asked, as judge() does.
            return replace(value, name=metric.name)
        return judge(metric, value)

    def _fresh(self, key: tuple[Any, ...], target: str, max_age: float) -> Measurement | None:
        with self._lock:
            cached = self._measured.get(key)
            if cached and time.monotonic() - cached[0] < max_age:
                return cached[1].get(target)
        return None

    def _measure(
        self,
        namespace: str,
        metric: Metric,
        target: str,
        key: tuple[Any, ...],
        query_set: QuerySetName,
    ) -> Measurement | None:
        targets = sorted({target, *self._canaries(namespace)})
        measured = self.provider.measure(namespace, metric, targets, query_set=query_set)
        with self._lock:
            self._measured[key] = (time.monotonic(), measured)
        return measured.get(target)

    @staticmethod
    def combine(absolute: MetricResult, relative: MetricResult) -> MetricResult:
        """One result from the thresholdRange check and the comparison with the primary.

        It passes only when both pass. Otherwise its outcome is the worst of the two ("fail",
        then "error", then "no-data": a verdict on measured data says the most), and its message
        is the message of each check that did not pass, the thresholdRange check's first, joined
        by "; " and without repeats (a Prometheus outage reads once). Passing, both messages.
        """
        results = (absolute, relative)
        failing = [result for result in results if result.outcome != "pass"]
        shown = failing or list(results)
        messages = list(dict.fromkeys(result.message for result in shown if result.message))
        outcome = absolute.outcome
        for candidate in ("fail", "error", "no-data"):
            if any(result.outcome == candidate for result in failing):
                outcome = candidate
                break
        return MetricResult(
            name=absolute.name,
            outcome=outcome,
            value=absolute.value if absolute.value is not None else relative.value,
            message="; ".join(messages),
        )


class GateRunner:
    """Gates the step waits for (run now, results judged) and those it only fires."""

    def __init__(self) -> None:
        self.session = requests.Session()

    def run(
        self,
        spec: CanarySpec,
        types: Sequence[WebhookType],
        *,
        name: str,
        namespace: str,
        status: CanaryStatus,
    ) -> tuple[GateResult, ...]:
        hooks = spec.analysis.webhooks_of(*types)
        return run_gates(
            hooks,
            name=name,
            namespace=namespace,
            phase=status.phase,
            checksum=status.canary_revision,
            session=self.session,
        )

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
        hooks = spec.analysis.webhooks_of(type_)
        if not hooks:
            return
        thread = threading.Thread(
            target=run_gates,
            args=(hooks,),
            kwargs={
                "name": name,
                "namespace": namespace,
                "phase": phase,
                "checksum": checksum,
                "session": self.session,
            },
            name=f"gates-{type_}-{namespace}-{name}",
            daemon=True,
        )
        thread.start()

    def event(
        self,
        spec: CanarySpec,
        *,
        name: str,
        namespace: str,
        status: CanaryStatus,
        message: str,
        event_type: str,
    ) -> None:
        for hook in spec.analysis.webhooks_of("event"):
            post_event(
                hook,
                name=name,
                namespace=namespace,
                phase=status.phase,
                checksum=status.canary_revision,
                message=message,
                event_type="Warning" if event_type == "Warning" else "Normal",
                session=self.session,
            )


class Analyzer:
    def __init__(
        self,
        *,
        kube: Kube,
        cache: Any,
        provider: PrometheusProvider,
        notifications: Notifications,
        telemetry: Telemetry,
        max_active: int = 0,
        orphan_grace: float = ORPHAN_GRACE_SECONDS,
        gates: GateRunner | None = None,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        templates: TemplateResolver | None = None,
        routes: RouteCache | None = None,
    ) -> None:
        self.kube = kube
        self.cache = cache
        self.telemetry = telemetry
        self.max_active = max_active
        self.orphan_grace = orphan_grace
        self.gates = gates or GateRunner()
        self.notifications = notifications
        self.now = now
        self.metrics = MetricBatcher(provider, canaries=self._active_targets, templates=templates)
        self.provider = provider
        # Route objects from the watch of Perch's routes (None: a GET each time they are read).
        self.routes = Routes(kube, routes)
        self.actor = Actor(
            kube,
            events=EventRecorder(kube),
            gates=self.gates,
            notifier=notifications,
            routes=self.routes,
        )

    # What the scheduler asks

    def _peek(self, namespace: str, name: str, *, kind: str) -> Mapping[str, Any] | None:
        """A cached object to read, not to edit: no copy (WatchCache.peek) where the cache has
        one. The scheduler asks interval_for at every change of a Canary or its Deployment."""
        peek = getattr(self.cache, "peek", None) or self.cache.get
        found: Mapping[str, Any] | None = peek(namespace, name, kind=kind)
        return found

    def interval_for(self, canary: Mapping[str, Any]) -> float | None:
        meta = canary.get("metadata") or {}
        primary = self._peek(meta.get("namespace", ""), meta.get("name", ""), kind="Deployment")
        if primary is None:
            return None
        spec = spec_of(primary)
        if spec is None:
            return None
        # Idle canaries get no job (their next change, a new revision or a perch.dev/action on
        # the Deployment, reschedules them); the rest tick at their interval.
        if self._idle(canary, primary):
            return None
        return spec.analysis.interval_seconds

    def waits_for_rollout(self, canary: Mapping[str, Any]) -> bool:
        """Whether the canary's next step is due the moment a rollout it waits for is done (only
        then, so the rollout's many status writes cost no ticks):

        - a promotion waits for the primary's rollout;
        - a new revision, not yet at its first step, waits for its canary's pods to be ready: its
          first weight comes as soon as they are, not up to an interval later.
        """
        status = canary.get("status") or {}
        meta = canary.get("metadata") or {}
        namespace, name = str(meta.get("namespace", "")), str(meta.get("name", ""))
        phase = status.get("phase")
        if phase == "Promoting":
            primary = self._peek(namespace, name, kind="Deployment")
            return primary is not None and workload(primary).rolled_out
        if (
            phase == "Progressing"
            and not status.get("canaryWeight")
            and not status.get("iterations")
        ):
            copy = self._peek(namespace, canary_name(name), kind="Deployment")
            return copy is not None and workload(copy).rolled_out
        return False

    def _idle(self, canary: Mapping[str, Any], primary: Mapping[str, Any]) -> bool:
        """Nothing to do until something changes: an idle phase, no control asked for, and no
        canary pods left running (a tick cut short after committing Succeeded leaves them)."""
        phase = (canary.get("status") or {}).get("phase")
        if phase not in IDLE_PHASES or control_action(primary) is not None:
            return False
        meta = canary.get("metadata") or {}
        canary_dep = self._peek(
            meta.get("namespace", ""), canary_name(str(meta.get("name", ""))), kind="Deployment"
        )
        return canary_dep is None or workload(canary_dep).desired == 0

    def _active_targets(self, namespace: str) -> list[str]:
        def pick(obj: Mapping[str, Any]) -> str | None:
            meta = obj.get("metadata") or {}
            if meta.get("namespace") != namespace:
                return None
            if (obj.get("status") or {}).get("phase") in IDLE_PHASES:
                return None
            return canary_name(str(meta.get("name")))

        return list(self.cache.select(pick))

    def _progressing(self, namespace: str, name: str) -> int:
        """Other canaries holding a slot of the global cap."""

        def pick(obj: Mapping[str, Any]) -> bool | None:
            meta = obj.get("metadata") or {}
            if (meta.get("namespace"), meta.get("name")) == (namespace, name):
                return None
            return wire_holds_slot(obj.get("status")) or None

        return len(self.cache.select(pick))

    def _admission(self, namespace: str, name: str, status: CanaryStatus) -> dict[str, Any]:
        if self.max_active <= 0 or status.holds_slot:
            return {"admitted": True}
        holding = self._progressing(namespace, name)
        return {"admitted": holding < self.max_active, "progressing": holding}

    # The tick

    def tick(self, namespace: str, name: str) -> None:
        started = time.monotonic()
        outcome = "error"
        try:
            outcome = self._tick(namespace, name)
        finally:
            self.telemetry.ticks.labels(outcome).inc()
            self.telemetry.duration.labels(name, namespace).observe(time.monotonic() - started)

    def _tick(self, namespace: str, name: str) -> str:
        canary = self.cache.get(namespace, name)
        primary = self.cache.get(namespace, name, kind="Deployment")
        if canary is None or primary is None:
            return "skipped"
        spec = spec_of(primary)
        if spec is None:
            return "skipped"
        status = CanaryStatus.from_wire(canary.get("status"))
        self.telemetry.record_canary(
            name=name,
            namespace=namespace,
            phase=status.phase,
            weight=status.canary_weight,
            failed=status.failed_checks,
        )
        if self._idle(canary, primary):
            return "idle"
        now = self.now()
        if is_orphan(status, primary, now=now, grace_seconds=self.orphan_grace):
            self._drop_orphan(canary, primary, spec=spec, status=status, now=now)
            return "orphan"
        need = needs(spec, status, now=now)
        cname = canary_name(name)
        canary_dep = self.cache.get(namespace, cname, kind="Deployment")
        if canary_dep is None and status.active:
            canary_dep = self._recreate_canary(canary, primary)
        metrics: tuple[MetricResult, ...] = ()
        if need.metrics:
            metrics = tuple(
                self.metrics.evaluate(namespace, spec, m, target=cname, primary=name)
                for m in spec.analysis.metrics
            )
        gates: tuple[GateResult, ...] = ()
        if need.gates:
            gates = self.gates.run(spec, need.gates, name=name, namespace=namespace, status=status)
        routes = self._read_routes(namespace, name, spec)
        obs = Observations(
            now=now,
            canary=workload(canary_dep, canary=True),
            primary=workload(primary),
            route_weights=route_weights(
                list(routes.values()), name=name, namespace=namespace, spec=spec
            ),
            route_analysing=route_analysing(
                list(routes.values()), name=name, namespace=namespace, spec=spec
            ),
            metrics=metrics,
            gates=gates,
            control=control_action(primary),
            **self._admission(namespace, name, status),
        )
        new_status, actions = step(spec, status, obs, name=name, namespace=namespace)
        if new_status == status and not actions:
            return "unchanged"
        ctx = TickContext(
            namespace=namespace,
            name=name,
            spec=spec,
            canary=canary,
            primary=primary,
            status=new_status,
            routes=routes,
        )
        try:
            self.actor.perform(ctx, actions, commit=self._commit)
        except StaleRead as stale:
            # Someone (the webhook, a new revision, a user) wrote first: the next tick decides
            # from what they wrote. Nothing after the refused write was done.
            log.info(
                "%s.%s changed during the tick (%s); the next tick goes on", name, namespace, stale
            )
            return "conflict"
        self._fire_event_hooks(spec, ctx, actions)
        self.telemetry.record_canary(
            name=name,
            namespace=namespace,
            phase=new_status.phase,
            weight=new_status.canary_weight,
            failed=new_status.failed_checks,
        )
        return "advanced"

    def _commit(self, ctx: TickContext) -> None:
        """The tick's status, conditional on the Canary as read at its start (or as the tick's
        own SaveStableTemplate left it)."""
        body = {
            "metadata": {"resourceVersion": resource_version(ctx.canary)},
            "status": ctx.status.to_wire(),
        }
        try:
            ctx.canary = self.kube.merge_patch(
                CANARIES, ctx.namespace, ctx.name, body, subresource="status"
            )
        except ApiException as exc:
            if exc.status == 409:
                raise StaleRead("the Canary's status was written by someone else") from exc
            raise

    def _drop_orphan(
        self,
        canary: dict[str, Any],
        primary: dict[str, Any],
        *,
        spec: CanarySpec,
        status: CanaryStatus,
        now: datetime,
    ) -> None:
        namespace, name = str(canary["metadata"]["namespace"]), str(canary["metadata"]["name"])
        ctx = TickContext(
            namespace=namespace, name=name, spec=spec, canary=canary, primary=primary, status=status
        )
        self.actor.set_weights(ctx, canary=0)
        for res in (DEPLOYMENTS, HPAS):
            self.kube.delete(res, namespace, canary_name(name))
        message = (
            f"Revision {status.canary_revision} of {name}.{namespace} was never applied (the "
            "update was refused after Perch admitted it); canary removed"
        )
        self.actor.events.record(canary, reason="Orphaned", message=message, type_="Warning")
        runs = template_revision(((primary.get("spec") or {}).get("template")) or {})
        reset = entered(
            replace(
                status,
                canary_revision="",
                canary_weight=0,
                failed_checks=0,
                gates_done=(),
                handoff_revision="",
                last_applied_revision=runs,
            ),
            # Back to "nothing to analyse", with the revision the primary runs.
            "Initialized",
            at=now,
            message=message,
        )
        body = {
            "metadata": {"resourceVersion": resource_version(canary)},
            "status": reset.to_wire(),
        }
        self.kube.merge_patch(CANARIES, namespace, name, body, subresource="status")

    def _fire_event_hooks(self, spec: CanarySpec, ctx: TickContext, actions: Sequence[Any]) -> None:
        for action in actions:
            if isinstance(action, Event):
                self.gates.event(
                    spec,
                    name=ctx.name,
                    namespace=ctx.namespace,
                    status=ctx.status,
                    message=action.message,
                    event_type=action.type,
                )

    def _read_routes(
        self, namespace: str, name: str, spec: CanarySpec
    ) -> dict[str, Mapping[str, Any]]:
        """The route object that carries the weights (the first the router makes), by name; from
        the watch of Perch's routes, not a GET (analyzer.routes)."""
        target = RouteTarget(name=name, namespace=namespace)
        routes: dict[str, Mapping[str, Any]] = {}
        for ref in router_for(spec.provider).refs(target, spec)[:1]:
            obj = self.routes.read(ref, namespace)
            if obj is not None:
                routes[ref.name] = obj
        return routes

    def _recreate_canary(
        self, canary: Mapping[str, Any], primary: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        """A canary under analysis whose Deployment is gone: recreate it from the Canary object."""
        cspec = canary.get("spec") or {}
        template, revision = cspec.get("template"), str(cspec.get("revision") or "")
        if not isinstance(template, dict) or not revision:
            return None
        meta = primary.get("metadata") or {}
        desired = canary_deployment(primary, template=template, revision=revision)
        try:
            created = self.kube.create(DEPLOYMENTS, str(meta.get("namespace")), desired)
        except ApiException as exc:
            if exc.status != 409:
                raise
            return None
        log.info("recreated missing canary Deployment %s", desired["metadata"]["name"])
        return created
