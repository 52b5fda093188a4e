"""The analyzer's watch cache against a real API server, as the analyzer's ServiceAccount.

What only a real API server shows: the resourceVersions a list hands out and a watch resumes
from, watch streams the server ends at ``timeoutSeconds``, the window of events its watch cache
keeps (a watch resumed from before an API server restart gets 410 "too old resource version"),
and the chart's RBAC judging every list and watch.

This module runs on a control plane of its own, started here (tests/support/controlplane.py)
and shared by its tests, not on the session's:

- one test restarts the API server, which would cut every other test's connections;
- no admission webhook is registered on it (the session's mutates opted-in Deployments into
  canaries, which would add objects these tests do not expect), and no other test's objects are
  there.

Where a test needs the cache cut off from the API server, the cache connects through
:class:`Cable`, a TCP relay in front of the API server that the test unplugs and plugs back:
the client, the TLS session and the server stay real. The relay is also how the cache finds the
API server again after the restart: kube-up may move it to another port (see
``test_after_an_api_server_restart_the_cache_relists_and_reports_what_it_missed``).
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from analyzer.cache import Kind, WatchCache
from analyzer.leader import parse_micro_time
from perch.kube import load_api_client
from perch.resources import CANARIES, DEPLOYMENTS, Kube
from tests.support import controlplane
from tests.support.chart import NAMESPACE, render
from tests.support.install import Identity, Installed, apply, install, kubeconfig_for
from tests.support.kubelet import wait_for
from tests.support.relay import Cable

pytestmark = pytest.mark.cluster

# A second release of the chart with analyzer.namespaces set: its analyzer may read SCOPED only.
SCOPED_RELEASE = "perch-scoped"
SCOPED = "scoped-a"
OUTSIDE = "scoped-b"
OPTED_IN = {"perch.dev/enabled": "true"}
CANARY_COPY = {"app.kubernetes.io/managed-by": "perch", "perch.dev/track": "canary"}
DEADLINE = 30.0
ADMIN_TIMEOUT = 30.0


# --- the private control plane ----------------------------------------------------------------


@dataclass
class Private:
    plane: controlplane.ControlPlane
    installed: Installed
    scoped: Identity  # the analyzer of a release with analyzer.namespaces=[SCOPED]
    directory: Path
    _admins: dict[str, client.ApiClient] = field(default_factory=dict)

    def server(self) -> str:
        """The API server's URL now: a restart may have moved it."""
        config = yaml.safe_load(self.plane.kubeconfig.read_text())
        return str(config["clusters"][0]["cluster"]["server"])

    def port(self) -> int:
        found = re.fullmatch(r"https://127\.0\.0\.1:(\d+)", self.server())
        if found is None:
            raise AssertionError(f"not a local control plane: {self.server()}")
        return int(found.group(1))

    def admin(self) -> client.ApiClient:
        server = self.server()
        if server not in self._admins:
            self._admins[server] = load_api_client(str(self.plane.kubeconfig))
        return self._admins[server]

    def kube(self) -> Kube:
        # The test's own writes may wait: the machine is shared and the API server may be busy.
        return Kube(self.admin(), timeout=ADMIN_TIMEOUT)

    def client_as(self, identity: Identity, *, server: str | None = None) -> client.ApiClient:
        """The identity's token, sent to `server` (default: the API server as it is now)."""
        config = yaml.safe_load(identity.kubeconfig.read_text())
        config["clusters"][0]["cluster"]["server"] = server or self.server()
        path = self.directory / f"{identity.service_account}-{time.monotonic_ns()}.kubeconfig"
        path.write_text(yaml.safe_dump(config))
        return load_api_client(str(path))

    def requests_by(self, identity: Identity, since: float) -> list[dict[str, Any]]:
        """The audit log's completed requests of `identity` received at or after `since`."""
        return [
            e
            for e in self.plane.audit_events()
            if e.get("user", {}).get("username") == identity.username
            and (parse_micro_time(e.get("requestReceivedTimestamp")) or 0) >= since
        ]


@pytest.fixture(scope="module")
def private(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Private]:
    directory = tmp_path_factory.mktemp("private-kube")
    session = controlplane.start(directory / "plane")
    try:
        api = load_api_client(str(session.plane.kubeconfig))
        installed = install(
            api,
            admin_kubeconfig=session.plane.kubeconfig,
            directory=directory,
            values={"analyzer": {"mode": "deployment"}},
        )
        core = client.CoreV1Api(api)
        for ns in (SCOPED, OUTSIDE):
            core.create_namespace({"metadata": {"name": ns}})
        # The chart's own namespace-scoped RBAC: a RoleBinding in each of analyzer.namespaces.
        scoped = render(
            {"analyzer": {"mode": "deployment", "namespaces": [SCOPED]}},
            namespace=NAMESPACE,
            name=SCOPED_RELEASE,
        )
        account = f"{SCOPED_RELEASE}-analyzer"
        apply(
            api,
            [
                o
                for o in scoped.objects
                if o["kind"] in ("ServiceAccount", "ClusterRole", "RoleBinding")
                and o["metadata"]["name"] == account
            ],
        )
        identity = kubeconfig_for(
            api,
            session.plane.kubeconfig,
            service_account=account,
            namespace=NAMESPACE,
            out=directory / "scoped-analyzer.kubeconfig",
        )
        yield Private(session.plane, installed, identity, directory)
    finally:
        session.stop()


@pytest.fixture
def ns(private: Private) -> Iterator[str]:
    name = f"wc-{time.monotonic_ns() % 10**8:08d}"
    core = client.CoreV1Api(private.admin())
    core.create_namespace({"metadata": {"name": name}})
    yield name
    with contextlib.suppress(Exception):
        client.CoreV1Api(private.admin()).delete_namespace(name)


@pytest.fixture
def make_cache(private: Private) -> Iterator[Callable[..., WatchCache]]:
    made: list[WatchCache] = []
    cables: list[Cable] = []

    def make(
        *, identity: Identity | None = None, cable: Cable | None = None, **kwargs: Any
    ) -> WatchCache:
        kwargs.setdefault("backoff_initial", 0.05)
        kwargs.setdefault("backoff_max", 0.4)
        api = private.client_as(
            identity or private.installed.analyzer, server=cable.url if cable else None
        )
        if cable is not None:
            cables.append(cable)
        cache = WatchCache(api, **kwargs)
        made.append(cache)
        return cache

    yield make
    for cache in made:
        cache.stop()
    for cable in cables:
        cable.close()


class Recorder:
    """The cache's events about one namespace, in order."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.events: list[tuple[str, str, str, str]] = []
        self._lock = threading.Lock()

    def __call__(self, kind: str, event_type: str, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        if meta.get("namespace") != self.namespace:
            return
        with self._lock:
            self.events.append((kind, event_type, meta["name"], meta["resourceVersion"]))

    def seen(self, kind: str, event_type: str, name: str) -> bool:
        with self._lock:
            return any(e[:3] == (kind, event_type, name) for e in self.events)


def canary(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "perch.dev/v1alpha1",
        "kind": "Canary",
        "metadata": {"name": name},
        "spec": {"targetRef": {"name": name}},
    }


def deployment(
    name: str, *, annotations: dict[str, str] | None = None, labels: dict[str, str] | None = None
) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "annotations": annotations or {}, "labels": labels or {}},
        "spec": {
            "replicas": 0,  # no pods: the controllers still write the Deployment's status
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "app", "image": "podinfo:1"}]},
            },
        },
    }


def versions(objs: list[dict[str, Any]], namespace: str) -> dict[str, str]:
    return {
        o["metadata"]["name"]: o["metadata"]["resourceVersion"]
        for o in objs
        if o["metadata"]["namespace"] == namespace
    }


def rv(obj: dict[str, Any] | None) -> str | None:
    return None if obj is None else obj["metadata"]["resourceVersion"]


def same_version(cache: WatchCache, kube: Kube, namespace: str, name: str, kind: Kind) -> bool:
    """The cache holds the version of the object the API server holds now."""
    res = CANARIES if kind == "Canary" else DEPLOYMENTS
    return rv(cache.get(namespace, name, kind=kind)) == rv(kube.get(res, namespace, name))


# --- following changes ------------------------------------------------------------------------


def test_the_cache_lists_then_follows_canaries_and_deployments(
    private: Private, ns: str, make_cache: Callable[..., WatchCache]
) -> None:
    kube = private.kube()
    since = time.time()
    before = kube.create(CANARIES, ns, canary("before"))
    kube.create(DEPLOYMENTS, ns, deployment("before", annotations=OPTED_IN))
    cache = make_cache()
    recorder = Recorder(ns)
    cache.subscribe(recorder)
    assert not cache.synced()
    cache.start()
    assert cache.wait_synced(DEADLINE)
    # A listed object reads as the API server serves it (list items lack apiVersion and kind).
    assert cache.get(ns, "before") == before
    assert recorder.seen("Canary", "ADDED", "before")
    assert recorder.seen("Deployment", "ADDED", "before")

    created = kube.create(CANARIES, ns, canary("podinfo"))
    wait_for(lambda: recorder.seen("Canary", "ADDED", "podinfo"), what="ADDED podinfo")
    assert cache.get(ns, "podinfo") == created
    patched = kube.merge_patch(CANARIES, ns, "podinfo", {"spec": {"revision": "r2"}})
    wait_for(lambda: recorder.seen("Canary", "MODIFIED", "podinfo"), what="MODIFIED podinfo")
    assert cache.get(ns, "podinfo") == patched
    assert set(versions(cache.items(), ns)) == {"before", "podinfo"}
    kube.delete(CANARIES, ns, "podinfo")
    wait_for(lambda: recorder.seen("Canary", "DELETED", "podinfo"), what="DELETED podinfo")
    assert cache.get(ns, "podinfo") is None

    kube.create(DEPLOYMENTS, ns, deployment("podinfo", annotations=OPTED_IN))
    wait_for(lambda: recorder.seen("Deployment", "ADDED", "podinfo"), what="ADDED Deployment")
    template = {"spec": {"template": {"metadata": {"annotations": {"release": "2"}}}}}
    kube.merge_patch(DEPLOYMENTS, ns, "podinfo", template)
    # The Deployment controller writes the status too: the cache catches up with every write.
    wait_for(
        lambda: same_version(cache, kube, ns, "podinfo", "Deployment"), what="the last version"
    )
    cached = cache.get(ns, "podinfo", kind="Deployment")
    assert cached is not None
    assert cached["spec"]["template"]["metadata"]["annotations"] == {"release": "2"}
    assert recorder.seen("Deployment", "MODIFIED", "podinfo")
    kube.delete(DEPLOYMENTS, ns, "podinfo")
    wait_for(lambda: recorder.seen("Deployment", "DELETED", "podinfo"), what="DELETED Deployment")
    assert cache.get(ns, "podinfo", kind="Deployment") is None

    # Every read came from the cache: one list and one watch per kind, never a GET.
    assert cache.api_calls() == {"list": 2, "watch": 2}
    if private.plane.audit_log is not None:
        # Open watches are not in the log yet: it holds completed requests.
        reads = sorted(
            (e["verb"], e["objectRef"]["resource"])
            for e in private.requests_by(private.installed.analyzer, since)
        )
        assert reads == [("list", "canaries"), ("list", "deployments")]


def test_the_cache_hands_out_copies(
    private: Private, ns: str, make_cache: Callable[..., WatchCache]
) -> None:
    kube = private.kube()
    cache = make_cache(namespaces=[ns])
    cache.start()
    assert cache.wait_synced(DEADLINE)
    kube.create(CANARIES, ns, canary("podinfo"))
    wait_for(lambda: cache.get(ns, "podinfo") is not None, what="podinfo in the cache")
    mine = cache.get(ns, "podinfo")
    assert mine is not None
    mine["spec"]["targetRef"]["name"] = "edited"
    cache.items()[0]["metadata"]["name"] = "edited"
    again = cache.get(ns, "podinfo")
    assert again is not None
    assert again["spec"]["targetRef"]["name"] == "podinfo"
    assert again["metadata"]["name"] == "podinfo"


def test_the_cache_keeps_only_opted_in_deployments_and_canary_copies(
    private: Private, ns: str, make_cache: Callable[..., WatchCache]
) -> None:
    kube = private.kube()
    cache = make_cache()
    recorder = Recorder(ns)
    cache.subscribe(recorder)
    cache.start()
    assert cache.wait_synced(DEADLINE)
    kube.create(DEPLOYMENTS, ns, deployment("plain"))
    kube.create(DEPLOYMENTS, ns, deployment("podinfo", annotations=OPTED_IN))
    kube.create(DEPLOYMENTS, ns, deployment("half", annotations={"perch.dev/enabled": "false"}))
    kube.create(DEPLOYMENTS, ns, deployment("podinfo-canary", labels=CANARY_COPY))
    wait_for(lambda: recorder.seen("Deployment", "ADDED", "podinfo-canary"), what="the canary copy")
    assert set(versions(cache.items("Deployment"), ns)) == {"podinfo", "podinfo-canary"}
    assert cache.get(ns, "plain", kind="Deployment") is None

    # Opting out is a deletion as far as the analyzer is concerned; opting in an addition.
    opt_out = {"metadata": {"annotations": {"perch.dev/enabled": None}}}
    kube.merge_patch(DEPLOYMENTS, ns, "podinfo", opt_out)
    kube.merge_patch(DEPLOYMENTS, ns, "plain", {"metadata": {"annotations": OPTED_IN}})
    wait_for(lambda: recorder.seen("Deployment", "DELETED", "podinfo"), what="the opt-out")
    wait_for(lambda: recorder.seen("Deployment", "ADDED", "plain"), what="the opt-in")
    wait_for(lambda: same_version(cache, kube, ns, "plain", "Deployment"), what="plain settled")
    assert cache.get(ns, "podinfo", kind="Deployment") is None
    assert set(versions(cache.items("Deployment"), ns)) == {"plain", "podinfo-canary"}
    assert not recorder.seen("Deployment", "ADDED", "half")


def test_a_cache_limited_to_namespaces_works_with_namespaced_rbac_and_sees_nothing_else(
    private: Private, make_cache: Callable[..., WatchCache]
) -> None:
    kube = private.kube()
    since = time.time()
    cache = make_cache(identity=private.scoped, namespaces=[SCOPED])
    cache.start()
    assert cache.wait_synced(DEADLINE)
    kube.create(CANARIES, OUTSIDE, canary("elsewhere"))
    kube.create(DEPLOYMENTS, OUTSIDE, deployment("elsewhere", annotations=OPTED_IN))
    kube.create(CANARIES, SCOPED, canary("here"))
    kube.create(DEPLOYMENTS, SCOPED, deployment("here", annotations=OPTED_IN))
    wait_for(lambda: cache.get(SCOPED, "here") is not None, what="the Canary here")
    wait_for(lambda: cache.get(SCOPED, "here", kind="Deployment"), what="the Deployment here")
    assert cache.get(OUTSIDE, "elsewhere") is None
    assert cache.get(OUTSIDE, "elsewhere", kind="Deployment") is None
    assert {o["metadata"]["namespace"] for o in cache.items()} == {SCOPED}
    assert {o["metadata"]["namespace"] for o in cache.items("Deployment")} == {SCOPED}

    # Namespaced lists and watches are all this release's RBAC grants, and all the cache needs.
    if private.plane.audit_log is not None:
        reads = private.requests_by(private.scoped, since)
        assert {e["objectRef"].get("namespace") for e in reads} == {SCOPED}
        assert {e["responseStatus"]["code"] for e in reads} == {200}
    # The same account watching all namespaces is refused, and never has a copy to offer.
    wide = make_cache(identity=private.scoped)
    wide.start()
    if private.plane.audit_log is not None:
        wait_for(
            lambda: [
                e
                for e in private.requests_by(private.scoped, since)
                if e["verb"] == "list"
                and "namespace" not in e["objectRef"]
                and e["responseStatus"]["code"] == 403
            ],
            what="a cluster-wide list refused by RBAC",
        )
    assert not wide.wait_synced(1.0)


# --- watch streams ending, connections cut, the API server restarted -------------------------


def test_a_watch_the_server_ends_is_resumed_without_listing_again(
    private: Private, ns: str, make_cache: Callable[..., WatchCache]
) -> None:
    kube = private.kube()
    since = time.time()
    # The server ends each watch after a second (timeoutSeconds), as it does every few minutes.
    cache = make_cache(namespaces=[ns], watch_timeout_seconds=1)
    cache.start()
    assert cache.wait_synced(DEADLINE)
    wait_for(lambda: cache.api_calls()["watch"] >= 2 + 2 * 3, what="three watches per kind")
    kube.create(CANARIES, ns, canary("late"))
    wait_for(lambda: cache.get(ns, "late") is not None, what="a change after the resumes")
    assert cache.api_calls()["list"] == 2
    if private.plane.audit_log is not None:
        requests = private.requests_by(private.installed.analyzer, since)
        lists = [e for e in requests if e["verb"] == "list"]
        # Completed watch requests: the server closed those streams, with a 200.
        ended = [e for e in requests if e["verb"] == "watch" and e["responseStatus"]["code"] == 200]
        assert len(lists) == 2, lists
        assert len(ended) >= 4


def test_a_cut_connection_resumes_from_its_resource_version_without_listing_again(
    private: Private, ns: str, make_cache: Callable[..., WatchCache]
) -> None:
    kube = private.kube()
    kube.create(CANARIES, ns, canary("changed"))
    kube.create(CANARIES, ns, canary("gone"))
    cable = Cable(private.port())
    cache = make_cache(namespaces=[ns], cable=cable)
    recorder = Recorder(ns)
    cache.subscribe(recorder)
    cache.start()
    assert cache.wait_synced(DEADLINE)

    cable.unplug()
    kube.create(CANARIES, ns, canary("new"))
    kube.merge_patch(CANARIES, ns, "changed", {"spec": {"revision": "r2"}})
    kube.delete(CANARIES, ns, "gone")
    assert cache.get(ns, "gone") is not None  # nothing reaches the cache while cut off
    cable.plug()

    # The API server replays what happened since the resourceVersion the cache last saw.
    wait_for(lambda: recorder.seen("Canary", "DELETED", "gone"), what="the deletion")
    wait_for(lambda: recorder.seen("Canary", "ADDED", "new"), what="the addition")
    wait_for(lambda: recorder.seen("Canary", "MODIFIED", "changed"), what="the change")
    assert versions(cache.items(), ns) == versions(kube.list_objects(CANARIES, ns), ns)
    assert cache.api_calls()["list"] == 2


def test_after_an_api_server_restart_the_cache_relists_and_reports_what_it_missed(
    private: Private, ns: str, make_cache, caplog: pytest.LogCaptureFixture
) -> None:
    if not private.plane.local:
        pytest.skip("restarting the API server needs a control plane started by the tests")
    caplog.set_level(logging.INFO, logger="perch.analyzer.cache")
    kube = private.kube()
    for name in ("kept", "changed", "dropped"):
        kube.create(CANARIES, ns, canary(name))
    for name in ("kept", "changed", "dropped", "opted-out"):
        kube.create(DEPLOYMENTS, ns, deployment(name, annotations=OPTED_IN))
    kube.create(DEPLOYMENTS, ns, deployment("opted-in"))
    cable = Cable(private.port())
    cache = make_cache(cable=cable)  # all namespaces, as the analyzer runs by default
    recorder = Recorder(ns)
    cache.subscribe(recorder)
    cache.start()
    assert cache.wait_synced(DEADLINE)
    lists = cache.api_calls()["list"]

    # Cut off, the cache misses these; then the restart empties the API server's watch cache,
    # so the resourceVersion the cache resumes from is older than anything the server can replay.
    cable.unplug()
    kube.create(CANARIES, ns, canary("born"))
    kube.merge_patch(CANARIES, ns, "changed", {"spec": {"revision": "r2"}})
    kube.delete(CANARIES, ns, "dropped")
    kube.create(DEPLOYMENTS, ns, deployment("born-canary", labels=CANARY_COPY))
    template = {"spec": {"template": {"metadata": {"annotations": {"release": "2"}}}}}
    kube.merge_patch(DEPLOYMENTS, ns, "changed", template)
    kube.delete(DEPLOYMENTS, ns, "dropped")
    opt_out = {"metadata": {"annotations": {"perch.dev/enabled": None}}}
    kube.merge_patch(DEPLOYMENTS, ns, "opted-out", opt_out)
    kube.merge_patch(DEPLOYMENTS, ns, "opted-in", {"metadata": {"annotations": OPTED_IN}})
    private.plane.restart()
    cable.plug(private.port())
    kube = private.kube()

    def server_state() -> tuple[dict[str, str], dict[str, str]]:
        deployments = kube.list_objects(DEPLOYMENTS, ns)
        relevant = [d for d in deployments if d["metadata"]["name"] != "opted-out"]
        return versions(kube.list_objects(CANARIES, ns), ns), versions(relevant, ns)

    def cache_state() -> tuple[dict[str, str], dict[str, str]]:
        return versions(cache.items(), ns), versions(cache.items("Deployment"), ns)

    wait_for(lambda: cache_state() == server_state(), what="the cache to match the server")
    canaries, deployments = cache_state()
    assert set(canaries) == {"kept", "changed", "born"}
    assert set(deployments) == {"kept", "changed", "born-canary", "opted-in"}
    for event in [
        ("Canary", "ADDED", "born"),
        ("Canary", "MODIFIED", "changed"),
        ("Canary", "DELETED", "dropped"),
        ("Deployment", "ADDED", "born-canary"),
        ("Deployment", "ADDED", "opted-in"),
        ("Deployment", "MODIFIED", "changed"),
        ("Deployment", "DELETED", "dropped"),
        ("Deployment", "DELETED", "opted-out"),
    ]:
        assert recorder.seen(*event), (event, recorder.events)
    # The cache says it listed again, because the server no longer had its resourceVersion.
    assert cache.api_calls()["list"] >= lists + 2
    for source in ("Canary in all namespaces", "Deployment in all namespaces"):
        assert f"{source}: resourceVersion expired; listing again" in caplog.messages


def test_stop_cuts_the_open_watches(
    private: Private, make_cache: Callable[..., WatchCache]
) -> None:
    cache = make_cache()  # 300 s watches
    cache.start()
    assert cache.wait_synced(DEADLINE)
    wait_for(lambda: cache.api_calls()["watch"] == 2, what="both watches open")
    began = time.monotonic()
    cache.stop(timeout=5)
    assert time.monotonic() - began < 4  # the watches were cut, not waited out
    assert not any(
        t.name.startswith("perch-cache-") and t.is_alive() for t in threading.enumerate()
    )
