"""The analyzer's metric batching: one query per metric and namespace serves every canary there,
also when many of their ticks need it at the same moment.

The provider here answers from memory (it stands in for the Prometheus server, whose queries
tests/integration/test_comparative_metrics.py runs for real) and counts what it is asked.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from analyzer.metrics.prometheus import Measurement, PrometheusProvider
from analyzer.metrics.queries import QuerySetName
from analyzer.service import MetricBatcher
from perch.spec import Metric, parse_spec

CANARIES = [f"app-{i:02d}-canary" for i in range(20)]
SPEC = parse_spec(
    json.dumps(
        {
            "service": {"port": 9898},
            "analysis": {
                "interval": "10s",
                "stepWeight": 1,
                "maxWeight": 50,
                "metrics": [{"name": "request-success-rate", "thresholdRange": {"min": 99}}],
            },
        }
    )
)


class SlowPrometheus(PrometheusProvider):
    """Answers 99.5 % for every target after `seconds`, counting the queries."""

    def __init__(self, seconds: float) -> None:
        super().__init__("http://prometheus.invalid:9090")
        self.seconds = seconds
        self.queries: list[tuple[str, ...]] = []
        self._count = threading.Lock()

    def measure(
        self,
        namespace: str,
        metric: Metric,
        targets: Sequence[str],
        *,
        at: datetime | None = None,
        query_set: QuerySetName = "istio",
        template: str | None = None,
    ) -> dict[str, Measurement]:
        with self._count:
            self.queries.append(tuple(targets))
        time.sleep(self.seconds)
        return dict.fromkeys(targets, 99.5)


def test_ticks_due_together_share_one_query() -> None:
    prometheus = SlowPrometheus(seconds=0.3)
    batcher = MetricBatcher(prometheus, canaries=lambda namespace: CANARIES)
    metric = SPEC.analysis.metrics[0]
    results: dict[str, Any] = {}
    start = threading.Barrier(len(CANARIES))

    def tick(target: str) -> None:
        start.wait()
        results[target] = batcher.evaluate("test", SPEC, metric, target=target)

    threads = [threading.Thread(target=tick, args=(target,)) for target in CANARIES]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    # Twenty ticks due in the same instant: one query, for all of them, each judged.
    assert prometheus.queries == [tuple(sorted(CANARIES))]
    assert {r.outcome for r in results.values()} == {"pass"}
    assert len(results) == len(CANARIES)
    # Within half an interval the answer is reused; another namespace is its own query.
    batcher.evaluate("test", SPEC, metric, target=CANARIES[0])
    batcher.evaluate("other", SPEC, metric, target=CANARIES[0])
    assert len(prometheus.queries) == 2
