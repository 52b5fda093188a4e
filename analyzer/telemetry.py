"""The analyzer's own metrics and JSON log lines.

Metric names follow Flagger's (flagger_canary_*) with the perch_ prefix, so dashboards port over.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

# Flagger's encoding of perch_canary_status: 0 running, 1 successful, 2 failed.
STATUS_VALUES = {"Succeeded": 1, "Failed": 2}


class Telemetry:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.status = Gauge(
            "perch_canary_status",
            "Canary status: 0 running, 1 successful, 2 failed",
            ["name", "namespace"],
            registry=r,
        )
        self.weight = Gauge(
            "perch_canary_weight",
            "Traffic weight of the primary and the canary",
            ["name", "namespace", "track"],
            registry=r,
        )
        self.failed_checks = Gauge(
            "perch_canary_failed_checks",
            "Failed checks of the current analysis",
            ["name", "namespace"],
            registry=r,
        )
        self.duration = Histogram(
            "perch_canary_duration_seconds",
            "Seconds spent performing one analysis tick",
            ["name", "namespace"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.ticks = Counter(
            "perch_analyzer_ticks_total", "Analysis ticks run", ["outcome"], registry=r
        )
        self.leader = Gauge(
            "perch_analyzer_leader", "1 while this replica holds the lease", registry=r
        )

    def count_calls(
        self,
        *,
        kubernetes: Callable[[], Mapping[str, int]],
        prometheus: Callable[[], int],
    ) -> None:
        """Export call counters kept by the clients themselves, read at scrape time."""
        self.registry.register(_CallTotals(kubernetes, prometheus))

    def watch_canaries(self, canaries: Callable[[], Sequence[Mapping[str, Any]]]) -> None:
        """Export perch_canary_total{namespace} from the watch cache at scrape time."""
        self.registry.register(_CanaryTotals(canaries))

    def watch_lags(self, lags: Callable[[], list[float]]) -> None:
        """Export the scheduler's recent tick lags (start minus scheduled time) as quantiles."""
        self.registry.register(_TickLags(lags))

    def watch_dropped_ticks(self, dropped: Callable[[], Mapping[str, int]]) -> None:
        """Export perch_analyzer_ticks_dropped_total{reason} from the scheduler's own counts.

        The sign of an analyzer that cannot keep up (too many canaries progressing at once for
        the API server it writes to, docs/operations.md "Capacity"): ticks that ran (the
        ticks_total counter) and the ticks that did not, side by side.
        """
        self.registry.register(_DroppedTicks(dropped))

    def record_canary(
        self, *, name: str, namespace: str, phase: str, weight: int, failed: int
    ) -> None:
        self.status.labels(name, namespace).set(STATUS_VALUES.get(phase, 0))
        self.weight.labels(name, namespace, "canary").set(weight)
        self.weight.labels(name, namespace, "primary").set(100 - weight)
        self.failed_checks.labels(name, namespace).set(failed)

    def forget_canary(self, *, name: str, namespace: str) -> None:
        for gauge, labels in (
            (self.status, (name, namespace)),
            (self.failed_checks, (name, namespace)),
            (self.weight, (name, namespace, "canary")),
            (self.weight, (name, namespace, "primary")),
        ):
            with contextlib.suppress(KeyError):
                gauge.remove(*labels)


class _CallTotals(Collector):
    def __init__(self, kubernetes: Callable[[], Mapping[str, int]], prometheus: Callable[[], int]):
        self._kubernetes = kubernetes
        self._prometheus = prometheus

    def collect(self) -> Iterator[CounterMetricFamily]:
        api = CounterMetricFamily(
            "perch_analyzer_kubernetes_api_calls",
            "Calls the analyzer made to the Kubernetes API, by source",
            labels=["source"],
        )
        for source, count in sorted(self._kubernetes().items()):
            api.add_metric([source], count)
        yield api
        yield CounterMetricFamily(
            "perch_analyzer_prometheus_queries",
            "Queries the analyzer sent to Prometheus",
            value=self._prometheus(),
        )


class _CanaryTotals(Collector):
    def __init__(self, canaries: Callable[[], Sequence[Mapping[str, Any]]]):
        self._canaries = canaries

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "perch_canary_total", "Canaries known to the analyzer", labels=["namespace"]
        )
        counts: dict[str, int] = {}
        for obj in self._canaries():
            namespace = str((obj.get("metadata") or {}).get("namespace") or "")
            counts[namespace] = counts.get(namespace, 0) + 1
        for namespace, count in sorted(counts.items()):
            family.add_metric([namespace], count)
        yield family


class _DroppedTicks(Collector):
    def __init__(self, dropped: Callable[[], Mapping[str, int]]):
        self._dropped = dropped

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "perch_analyzer_ticks_dropped",
            "Ticks not run: late (a worker was free only after the misfire grace, and the next "
            "tick is due) or overlapping (the canary's previous tick was still running)",
            labels=["reason"],
        )
        for reason, count in sorted(self._dropped().items()):
            family.add_metric([reason], count)
        yield family


class _TickLags(Collector):
    def __init__(self, lags: Callable[[], list[float]]):
        self._lags = lags

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "perch_analyzer_tick_lag_seconds",
            "How late recent ticks started after their scheduled time",
            labels=["quantile"],
        )
        samples = sorted(self._lags())
        if samples:
            for q in (0.5, 0.9, 0.99, 1.0):
                index = min(len(samples) - 1, int(q * len(samples)))
                family.add_metric([str(q)], samples[index])
        yield family


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg and any `fields` passed in `extra`."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # APScheduler logs every job run at INFO: thousands of lines a minute with many canaries.
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    # At DEBUG urllib3 logs each request line, and a notifier's path is its credential (a Slack
    # or Teams webhook's token): never below INFO, whatever the level asked for.
    logging.getLogger("urllib3").setLevel(max(root.level, logging.INFO))
