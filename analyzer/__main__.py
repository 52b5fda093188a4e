"""perch-analyzer: the long-running process that advances, promotes and rolls back canaries.

APScheduler is its clock; a coordination.k8s.io Lease makes one replica (of the sidecars in the
webhook's pods) the active one.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping, Sequence

from analyzer.alerts import AlertProviderResolver
from analyzer.cache import ROUTE_KINDS, WatchCache
from analyzer.http import liveness_problem, serve
from analyzer.leader import AlwaysLeader, LeaseElector
from analyzer.metrics.base import ProviderSettings
from analyzer.metrics.prometheus import PrometheusProvider
from analyzer.metrics.resolver import TemplateResolver
from analyzer.notify import Notifications
from analyzer.scheduler import CanaryScheduler
from analyzer.service import Analyzer
from analyzer.telemetry import Telemetry, configure_logging
from perch.kube import KubeConfigError, load_api_client
from perch.resources import Kube

log = logging.getLogger("perch.analyzer")

DEFAULT_PROMETHEUS = "http://prometheus.istio-system:9090"


def _env_bool(value: str | None, default: bool) -> bool:
    if value is None or value == "":
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


def parse_args(argv: Sequence[str] | None, env: Mapping[str, str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="perch-analyzer",
        description="Advance, judge, promote or roll back Perch canaries. "
        "Every flag can also be set as PERCH_<FLAG> (e.g. PERCH_PROMETHEUS_URL).",
    )
    parser.add_argument(
        "--prometheus-url", default=env.get("PERCH_PROMETHEUS_URL", DEFAULT_PROMETHEUS)
    )
    parser.add_argument(
        "--prometheus-timeout",
        type=float,
        default=float(env.get("PERCH_PROMETHEUS_TIMEOUT", "5")),
        help="seconds; a slower answer is a failed check, never a pass",
    )
    parser.add_argument(
        "--namespace",
        action="append",
        default=None,
        help="watch only this namespace (repeatable; default all, or PERCH_NAMESPACES=a,b)",
    )
    parser.add_argument("--metrics-bind", default=env.get("PERCH_METRICS_BIND", "0.0.0.0:8080"))
    parser.add_argument(
        "--max-active",
        type=int,
        default=int(env.get("PERCH_MAX_ACTIVE", "0")),
        help="canaries progressing at once; the rest queue (0: no limit)",
    )
    elect = _env_bool(env.get("PERCH_LEADER_ELECT"), True)
    parser.add_argument("--leader-elect", dest="leader_elect", action="store_true", default=elect)
    parser.add_argument("--no-leader-elect", dest="leader_elect", action="store_false")
    parser.add_argument(
        "--lease-namespace",
        default=env.get("PERCH_LEASE_NAMESPACE") or env.get("POD_NAMESPACE") or "perch",
    )
    parser.add_argument("--lease-name", default=env.get("PERCH_LEASE_NAME", "perch-analyzer"))
    parser.add_argument("--identity", default=env.get("PERCH_IDENTITY") or env.get("POD_NAME"))
    parser.add_argument("--kubeconfig", default=env.get("PERCH_KUBECONFIG"))
    parser.add_argument(
        "--resync-seconds", type=float, default=float(env.get("PERCH_RESYNC_SECONDS", "30"))
    )
    parser.add_argument(
        "--orphan-grace-seconds",
        type=float,
        default=float(env.get("PERCH_ORPHAN_GRACE_SECONDS", "120")),
        help="remove a canary whose revision no primary records after this long",
    )
    parser.add_argument("--log-level", default=env.get("PERCH_LOG_LEVEL", "info"))
    args = parser.parse_args(argv)
    if args.namespace is None and env.get("PERCH_NAMESPACES"):
        args.namespace = [n.strip() for n in env["PERCH_NAMESPACES"].split(",") if n.strip()]
    if args.max_active < 0:
        parser.error("--max-active must be 0 (no limit) or more")
    host, _, port = args.metrics_bind.rpartition(":")
    if not host or not port.isdigit():
        parser.error(f"--metrics-bind must be HOST:PORT, got {args.metrics_bind!r}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv, os.environ)
    configure_logging(args.log_level)
    try:
        api_client = load_api_client(args.kubeconfig)
    except KubeConfigError as exc:
        print(f"perch-analyzer: error: {exc}", file=sys.stderr)
        return 2

    telemetry = Telemetry()
    kube = Kube(api_client, timeout=5.0, field_manager="perch-analyzer")
    cache = WatchCache(api_client, namespaces=args.namespace)
    # MetricTemplates in a cache of their own: the scheduler follows only Canaries and
    # Deployments, and a missing MetricTemplate CRD must not hold the canaries' cache back.
    template_cache = WatchCache(api_client, namespaces=args.namespace, kinds=("MetricTemplate",))
    # Perch's routes, so that a tick reads its route's weights without a GET (analyzer.routes).
    route_cache = WatchCache(api_client, namespaces=args.namespace, kinds=ROUTE_KINDS)
    provider = PrometheusProvider(args.prometheus_url, timeout_seconds=args.prometheus_timeout)
    templates = TemplateResolver(
        templates=template_cache,
        secrets=kube,
        default=ProviderSettings(args.prometheus_url, timeout_seconds=args.prometheus_timeout),
    )
    # Its own client: AlertProvider and Secret reads run on the notifications' thread, and are
    # counted apart from the ticks' calls.
    alert_providers = AlertProviderResolver(
        Kube(api_client, timeout=5.0, field_manager="perch-analyzer")
    )
    notifications = Notifications.from_env(os.environ, resolver=alert_providers)
    analyzer = Analyzer(
        kube=kube,
        cache=cache,
        provider=provider,
        notifications=notifications,
        telemetry=telemetry,
        max_active=args.max_active,
        orphan_grace=args.orphan_grace_seconds,
        templates=templates,
        routes=route_cache,
    )
    telemetry.count_calls(
        kubernetes=lambda: {
            "ticks": kube.calls,
            "alert-providers": alert_providers.calls,
            **{f"cache-{k}": v for k, v in cache.api_calls().items()},
            **{f"templates-{k}": v for k, v in template_cache.api_calls().items()},
            **{f"routes-{k}": v for k, v in route_cache.api_calls().items()},
        },
        prometheus=lambda: provider.calls + templates.calls,
    )
    scheduler = CanaryScheduler(
        cache=cache,
        tick=analyzer.tick,
        interval_for=analyzer.interval_for,
        resync_seconds=args.resync_seconds,
        wake_on_rollout=analyzer.waits_for_rollout,
    )

    telemetry.watch_lags(scheduler.tick_lags)
    telemetry.watch_dropped_ticks(scheduler.dropped_ticks)
    # Read only (it counts them): the cached objects themselves, not a copy of each per scrape.
    telemetry.watch_canaries(lambda: cache.select(lambda canary: canary))

    # time.monotonic() when this replica last became the leader; None while it stands by.
    leading_since: float | None = None

    def started() -> None:
        nonlocal leading_since
        leading_since = time.monotonic()
        telemetry.leader.set(1)
        log.info("became the active analyzer")
        scheduler.start()

    def stopped() -> None:
        nonlocal leading_since
        leading_since = None
        telemetry.leader.set(0)
        log.info("no longer the active analyzer; all jobs stopped")
        scheduler.stop()

    elector: LeaseElector | AlwaysLeader
    if args.leader_elect:
        elector = LeaseElector(
            api_client,
            namespace=args.lease_namespace,
            name=args.lease_name,
            identity=args.identity,
            on_started_leading=started,
            on_stopped_leading=stopped,
        )
    else:
        elector = AlwaysLeader(on_started_leading=started, on_stopped_leading=stopped)

    host, _, port = args.metrics_bind.rpartition(":")

    def live() -> str | None:
        return liveness_problem(
            cache_alive=cache.alive() and template_cache.alive() and route_cache.alive(),
            leading_since=leading_since,
            last_resync=scheduler.last_resync(),
            resync_seconds=args.resync_seconds,
            now=time.monotonic(),
        )

    http = serve(
        host=host, port=int(port), registry=telemetry.registry, ready=cache.synced, live=live
    )
    done = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received signal %d, shutting down", signum)
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    cache.start()
    template_cache.start()
    route_cache.start()
    cache.wait_synced(timeout=60)
    # Before the first tick: a templateRef metric must not fail for a template not yet listed.
    template_cache.wait_synced(timeout=60)
    # Not needed for correctness (a route the cache does not hold yet is read by GET), but the
    # first ticks of a restart would otherwise GET every route.
    route_cache.wait_synced(timeout=60)
    elector.start()
    log.info(
        "perch-analyzer started",
        extra={
            "fields": {
                "prometheus": args.prometheus_url,
                "namespaces": args.namespace or "all",
                "leaderElect": args.leader_elect,
                "maxActive": args.max_active,
            }
        },
    )
    done.wait()
    elector.stop(release=True)
    scheduler.close()
    cache.stop()
    template_cache.stop()
    route_cache.stop()
    templates.close()
    notifications.close()
    http.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
