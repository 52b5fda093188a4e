"""The global cap (--max-active) counts, from the watch cache, the canaries that hold a slot.

A queued canary asks at each of its ticks how many others hold a slot; the answer comes from the
analyzer's watch cache of Canary objects (perch.status.wire_holds_slot on each cached status),
here filled by a real list+watch from the API stand-in. The state machine's side of the cap
(admitted or not for a given count) is tested in tests/unit/test_step.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kubernetes import client

from analyzer.cache import WatchCache
from analyzer.metrics.prometheus import PrometheusProvider
from analyzer.notify import Notifications
from analyzer.service import Analyzer
from analyzer.telemetry import Telemetry
from perch.resources import CANARIES, Kube
from perch.status import CanaryStatus, canary_object
from tests.standin import StandIn

NS = "cap"
TAKEN_UP = {"phase": "Progressing", "canaryRevision": "v1-a", "analysedRevision": "v1-a"}
QUEUED = {"phase": "Waiting", "canaryRevision": "v1-a", "analysedRevision": ""}


@pytest.fixture
def world() -> Iterator[tuple[Kube, WatchCache, Analyzer]]:
    with StandIn() as standin:
        client.CoreV1Api(standin.api_client()).create_namespace({"metadata": {"name": NS}})
        kube = Kube(standin.api_client())
        cache = WatchCache(standin.api_client(), namespaces=[NS])
        analyzer = Analyzer(
            kube=kube,
            cache=cache,
            # Never asked: counting slots reads no metric.
            provider=PrometheusProvider("http://127.0.0.1:9"),
            notifications=Notifications.from_env({}),
            telemetry=Telemetry(),
            max_active=2,
        )
        cache.start()
        assert cache.wait_synced(timeout=10)
        try:
            yield kube, cache, analyzer
        finally:
            cache.stop()


def put_canary(kube: Kube, name: str, status: dict[str, Any]) -> None:
    body = canary_object(name=name, namespace=NS, provider="istio", owner_references=[])
    kube.create(CANARIES, NS, body)
    kube.merge_patch(CANARIES, NS, name, {"status": status}, subresource="status")


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_queued_canary_waits_while_the_cap_is_full_and_is_let_in_when_a_slot_frees(
    world: tuple[Kube, WatchCache, Analyzer],
) -> None:
    kube, cache, analyzer = world
    put_canary(kube, "first", TAKEN_UP)
    put_canary(kube, "second", TAKEN_UP)
    put_canary(kube, "done", {**TAKEN_UP, "phase": "Succeeded"})
    put_canary(kube, "other-queued", QUEUED)
    put_canary(kube, "queued", QUEUED)
    wait_until(lambda: len(cache.items()) == 5 and all(c.get("status") for c in cache.items()))
    queued = CanaryStatus.from_wire(QUEUED)

    # Two hold a slot; the finished one and the other queued one do not.
    assert analyzer._admission(NS, "queued", queued) == {"admitted": False, "progressing": 2}
    # A canary that holds a slot is never counted against itself, nor turned away.
    assert analyzer._admission(NS, "first", CanaryStatus.from_wire(TAKEN_UP)) == {"admitted": True}

    kube.merge_patch(
        CANARIES, NS, "first", {"status": {"phase": "Succeeded"}}, subresource="status"
    )
    wait_until(lambda: analyzer._admission(NS, "queued", queued)["admitted"])
    assert analyzer._admission(NS, "queued", queued) == {"admitted": True, "progressing": 1}
