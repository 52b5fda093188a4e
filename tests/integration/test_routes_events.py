"""What a tick reads and records without calling the API more than a change needs, over HTTP on
the API stand-in: route objects from the watch of Perch's routes (analyzer.routes), and repeated
events counted on the first one (analyzer.events).

The cluster tier shows the same end to end on a real API server, from its audit log
(tests/cluster/test_release_loop.py: a step GETs nothing, a waiting canary calls nothing, a repeated
halt is one Event).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

import pytest

from analyzer.cache import ROUTE_KINDS, Kind, WatchCache
from analyzer.events import EVENTS, EventRecorder
from analyzer.routes import Routes
from perch.names import LABEL_MANAGED_BY, MANAGED_BY_VALUE
from perch.resources import Kube, Resource
from perch.routers.base import RouteRef
from tests.standin import StandIn

NS = "test"
VIRTUAL_SERVICES = Resource("networking.istio.io", "v1", "virtualservices")
DESTINATION_RULES = Resource("networking.istio.io", "v1", "destinationrules")


def ref(kind: str, name: str) -> RouteRef:
    plural = {"VirtualService": "virtualservices", "DestinationRule": "destinationrules"}[kind]
    return RouteRef("networking.istio.io", "v1", plural, kind, name)


def route(kind: str, name: str, *, ours: bool = True, weight: int = 0) -> dict[str, Any]:
    labels = {LABEL_MANAGED_BY: MANAGED_BY_VALUE} if ours else {"team": "mesh"}
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": kind,
        "metadata": {"name": name, "namespace": NS, "labels": labels},
        "spec": {"hosts": [name], "http": [{"route": [{"weight": 100 - weight}]}]},
    }


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture
def standin() -> Iterator[StandIn]:
    with StandIn() as server:
        yield server


def gets(standin: StandIn) -> list[tuple[str, str | None]]:
    return [(c.resource, c.name) for c in standin.calls() if c.verb == "get"]


def test_perchs_routes_are_read_from_the_watch_and_others_by_get(standin: StandIn) -> None:
    kube = Kube(standin.api_client())
    kube.create(VIRTUAL_SERVICES, NS, route("VirtualService", "podinfo"))
    kube.create(DESTINATION_RULES, NS, route("DestinationRule", "podinfo-canary"))
    # A route a user made under a canary's name: never Perch's to overwrite.
    kube.create(VIRTUAL_SERVICES, NS, route("VirtualService", "mine", ours=False))
    cache = WatchCache(standin.api_client(), namespaces=[NS], kinds=ROUTE_KINDS)
    cache.start()
    try:
        assert cache.wait_synced(timeout=10)
        for kind in ROUTE_KINDS:
            assert cache.holds(kind)
        # The API server selected Perch's: the user's route was never sent.
        listed = [c for c in standin.calls() if c.verb == "list"]
        assert {c.resource for c in listed} == {"virtualservices", "destinationrules", "httproutes"}
        assert cache.peek(NS, "mine", kind="VirtualService") is None
        routes = Routes(kube, cache)
        before = len(gets(standin))
        found = routes.read(ref("VirtualService", "podinfo"), NS)
        assert found is not None and found["metadata"]["name"] == "podinfo"
        rule = routes.read(ref("DestinationRule", "podinfo-canary"), NS)
        assert rule is not None and rule["kind"] == "DestinationRule"
        assert gets(standin)[before:] == []  # from the watch
        # Not Perch's, or not there: asked for, so that set_weights can refuse or create it.
        mine = routes.read(ref("VirtualService", "mine"), NS)
        assert mine is not None and mine["metadata"]["labels"] == {"team": "mesh"}
        assert routes.read(ref("VirtualService", "gone"), NS) is None
        assert gets(standin)[before:] == [("virtualservices", "mine"), ("virtualservices", "gone")]
        # A change by anyone reaches the copy through the watch.
        live = kube.get(VIRTUAL_SERVICES, NS, "podinfo")
        assert live is not None
        live["spec"]["http"][0]["route"][0]["weight"] = 42
        kube.replace(VIRTUAL_SERVICES, NS, "podinfo", live)
        wait_until(
            lambda: (
                (routes.read(ref("VirtualService", "podinfo"), NS) or {})["spec"]["http"][0][
                    "route"
                ][0]["weight"]
                == 42
            )
        )
    finally:
        cache.stop()


class LaggingCache:
    """A route cache whose copy is whatever the test says: a watch that has not delivered yet."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}

    def get(self, namespace: str, name: str, *, kind: Kind = "Canary") -> dict[str, Any] | None:
        return self.objects.get((kind, name))

    def peek(self, namespace: str, name: str, *, kind: Kind = "Canary") -> Mapping[str, Any] | None:
        return self.objects.get((kind, name))

    def holds(self, kind: Kind) -> bool:
        return True


def test_a_route_read_after_perchs_write_is_the_write_until_the_watch_has_it(
    standin: StandIn,
) -> None:
    """The next tick may come before the watch delivers the tick's own write: it must read the
    weights it wrote, not "restore" the older ones the cache still holds."""
    kube = Kube(standin.api_client())
    first = kube.create(VIRTUAL_SERVICES, NS, route("VirtualService", "podinfo", weight=10))
    cache = LaggingCache()
    cache.objects[("VirtualService", "podinfo")] = first
    routes = Routes(kube, cache)
    body = dict(first, spec=route("VirtualService", "podinfo", weight=20)["spec"])
    body["metadata"] = {**first["metadata"], "generation": first["metadata"].get("generation")}
    written = kube.replace(VIRTUAL_SERVICES, NS, "podinfo", body)
    if written["metadata"].get("generation") == first["metadata"].get("generation"):
        # The stand-in does not count generations: number them as an API server does.
        first["metadata"]["generation"], written["metadata"]["generation"] = 1, 2
    routes.wrote(ref("VirtualService", "podinfo"), NS, written)
    read = routes.read(ref("VirtualService", "podinfo"), NS)
    assert read is not None and read["spec"]["http"][0]["route"][0]["weight"] == 80
    # The watch delivers it: the cache is right again, and stays the source from then on.
    cache.objects[("VirtualService", "podinfo")] = written
    assert routes.read(ref("VirtualService", "podinfo"), NS) is written
    newer = dict(written, metadata={**written["metadata"], "generation": 3})
    newer["spec"] = route("VirtualService", "podinfo", weight=30)["spec"]
    cache.objects[("VirtualService", "podinfo")] = newer
    assert routes.read(ref("VirtualService", "podinfo"), NS) is newer
    # A write, then the object is deleted and made again by someone (another uid, generation
    # 1): the cache's, not the older write.
    routes.wrote(ref("VirtualService", "podinfo"), NS, dict(newer, metadata={**newer["metadata"]}))
    remade = dict(first, metadata={**first["metadata"], "uid": "another", "generation": 1})
    cache.objects[("VirtualService", "podinfo")] = remade
    assert routes.read(ref("VirtualService", "podinfo"), NS) is remade
    assert gets(standin) == []


def canary(uid: str = "u-1") -> dict[str, Any]:
    return {
        "apiVersion": "perch.dev/v1alpha1",
        "kind": "Canary",
        "metadata": {"name": "podinfo", "namespace": NS, "uid": uid, "resourceVersion": "7"},
    }


def event_objects(standin: StandIn) -> list[dict[str, Any]]:
    return [obj for key, obj in standin.objects("events").items() if key[1] == NS]


def test_a_repeated_event_counts_on_the_first_as_kubernetes_does(standin: StandIn) -> None:
    kube = Kube(standin.api_client())
    recorder = EventRecorder(kube)
    halt = "Halt advancement podinfo-canary.test waiting for rollout to finish"
    for second in range(3):
        recorder.record(
            canary(),
            reason="Waiting",
            message=halt,
            now=datetime(2026, 12, 3, 12, 0, second, tzinfo=UTC),
        )
    (event,) = event_objects(standin)
    assert (event["message"], event["count"]) == (halt, 3)
    assert (event["firstTimestamp"], event["lastTimestamp"]) == (
        "2026-12-03T12:00:00Z",
        "2026-12-03T12:00:02Z",
    )
    verbs = [(c.verb, c.resource) for c in standin.calls() if c.resource == "events"]
    assert verbs == [("create", "events"), ("patch", "events"), ("patch", "events")]
    # Another message, type, reason or object is another Event.
    recorder.record(canary(), reason="Waiting", message=halt + ": 1 of 2")
    recorder.record(canary(), reason="Waiting", message=halt, type_="Warning")
    recorder.record(canary(uid="u-2"), reason="Waiting", message=halt)
    assert sorted(e["count"] for e in event_objects(standin)) == [1, 1, 1, 3]
    # The Event expired (the API server keeps them an hour) or was deleted: a new one.
    kube.delete(EVENTS, NS, event["metadata"]["name"])
    recorder.record(canary(), reason="Waiting", message=halt)
    again = [e for e in event_objects(standin) if e["message"] == halt and e["type"] == "Normal"]
    assert [e["count"] for e in again if e["involvedObject"]["uid"] == "u-1"] == [1]
