"""A watch-fed cache of Canary objects and the Deployments they concern.

The analyzer ticks every canary every interval; a GET per tick per object would multiply API load
by the number of canaries. Instead one list+watch per kind (and per namespace, when the analyzer is
limited to some) keeps a local copy current, the way client-go's informers do:

- list (in pages) → remember the list's resourceVersion → watch from it, with a server-side
  timeout so that a silently dead connection cannot freeze the copy;
- a watch stream that ends normally is resumed from the last resourceVersion seen (client-go's
  reflector does the same; re-listing every few minutes would re-read every Deployment);
- 410 Gone (an ERROR event, or an expired ``continue`` token) → list again at once;
- any other ERROR event or API error on the watch → list again after a backoff;
- a connection error → resume the watch after a backoff (the resourceVersion is still good;
  if it has expired meanwhile, the API server says 410 and the cache re-lists).

The backoff is exponential with jitter and bounded, so that an API outage is not met with a storm
of requests from every replica. A re-list is compared with the copy and reported as ADDED,
MODIFIED and DELETED, so a subscriber never misses a deletion that happened while disconnected.

Deployments: every Deployment in the watched namespaces is watched (there is no annotation
selector in the API) and only the relevant ones are kept: opted-in primaries and the canary copies
Perch made (so the analyzer can read canary readiness from the cache too). A Deployment that stops
being relevant (opt-out) is reported as DELETED.

MetricTemplates (``kinds=("MetricTemplate",)``, a cache of their own in the analyzer, so that the
scheduler's subscription sees only Canaries and Deployments) are read by the metric checks at each
tick. Their CRD may be missing (Helm installs CRDs but never upgrades them, so an upgrade from a
chart without it leaves it out) or the RBAC not yet updated: a 404 or 403 on the list counts as an
empty, synced list, re-tried every ``backoff_max`` seconds, so that the analyzer still starts and a
templateRef metric fails with "not found" rather than the whole cache waiting.

Routes (``kinds=ROUTE_KINDS``, a cache of their own too): Istio VirtualServices and
DestinationRules and Gateway API HTTPRoutes that carry Perch's ``app.kubernetes.io/managed-by``
label, selected by the API server, so that a tick reads its route's weights without a GET and
the many routes of a mesh that are not Perch's are never sent. A mesh's CRDs are optional (a
cluster has Istio or the Gateway API, seldom both) and so is the permission to list them (a chart
older than the analyzer): those lists are treated like MetricTemplates', and the analyzer reads
the route by GET when the cache does not hold it.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeVar

from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from perch.kube import describe_api_error, response_json
from perch.names import (
    CANARY_PLURAL,
    GROUP,
    LABEL_MANAGED_BY,
    LABEL_TRACK,
    MANAGED_BY_VALUE,
    TRACK_CANARY,
    is_opted_in,
)

__all__ = [
    "EventType",
    "Kind",
    "Listener",
    "WatchCache",
    "is_relevant_deployment",
]

Kind = Literal[
    "Canary", "Deployment", "MetricTemplate", "VirtualService", "DestinationRule", "HTTPRoute"
]
EventType = Literal["ADDED", "MODIFIED", "DELETED"]
Listener = Callable[[Kind, EventType, dict[str, Any]], None]
Key = tuple[str, str]  # (namespace, name)

CANARY_VERSION: Final = "v1alpha1"
METRIC_TEMPLATE_PLURAL: Final = "metrictemplates"
DEFAULT_KINDS: Final[tuple[Kind, ...]] = ("Canary", "Deployment")
ROUTE_KINDS: Final[tuple[Kind, ...]] = ("VirtualService", "DestinationRule", "HTTPRoute")
# Kinds whose list may be refused (CRD not installed, RBAC not upgraded) without blocking the sync.
_OPTIONAL_KINDS: Final[frozenset[Kind]] = frozenset({"MetricTemplate", *ROUTE_KINDS})
# Custom kinds: (group, version, plural, label selector). Only Perch's routes are listed.
_MANAGED: Final = f"{LABEL_MANAGED_BY}={MANAGED_BY_VALUE}"
_CUSTOM: Final[Mapping[Kind, tuple[str, str, str, str]]] = {
    "Canary": (GROUP, CANARY_VERSION, CANARY_PLURAL, ""),
    "MetricTemplate": (GROUP, CANARY_VERSION, METRIC_TEMPLATE_PLURAL, ""),
    "VirtualService": ("networking.istio.io", "v1", "virtualservices", _MANAGED),
    "DestinationRule": ("networking.istio.io", "v1", "destinationrules", _MANAGED),
    "HTTPRoute": ("gateway.networking.k8s.io", "v1", "httproutes", _MANAGED),
}
# client-go's reflector picks 5-10 minutes; the API server caps watches at about 30 minutes.
DEFAULT_WATCH_TIMEOUT_SECONDS: Final = 300
DEFAULT_PAGE_SIZE: Final = 500
DEFAULT_REQUEST_TIMEOUT: Final = 30.0
DEFAULT_BACKOFF_INITIAL: Final = 0.5
DEFAULT_BACKOFF_MAX: Final = 30.0
# A watch is silent until something changes and the server ends it at timeoutSeconds; a read that
# stays silent past that plus this margin means the connection died without a FIN.
_WATCH_READ_MARGIN: Final = 30.0
_SHORT_WATCH_SECONDS: Final = 0.5
_API_VERSIONS: Final[Mapping[Kind, str]] = {
    "Deployment": "apps/v1",
    **{kind: f"{group}/{version}" for kind, (group, version, _, _) in _CUSTOM.items()},
}

log = logging.getLogger("perch.analyzer.cache")
T = TypeVar("T")


def is_relevant_deployment(obj: Mapping[str, Any]) -> bool:
    """An opted-in primary, or a canary copy Perch created."""
    meta = obj.get("metadata") or {}
    if is_opted_in(meta.get("annotations")):
        return True
    labels = meta.get("labels") or {}
    return labels.get(LABEL_MANAGED_BY) == MANAGED_BY_VALUE and labels.get(LABEL_TRACK) == (
        TRACK_CANARY
    )


def _key(obj: Mapping[str, Any]) -> Key:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


def _rv(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")


def clone(value: Any) -> Any:
    """A deep copy of a JSON value (dicts, lists and immutable leaves), as the API sends it.

    copy.deepcopy handles any object graph (memo, cycles, __deepcopy__ lookups) and was a fifth
    of the analyzer's CPU with a thousand canaries; objects decoded from JSON need none of that.
    """
    if type(value) is dict:
        return {k: clone(v) for k, v in value.items()}
    if type(value) is list:
        return [clone(v) for v in value]
    return value


@dataclass(kw_only=True)
class _Source:
    """One list+watch: a kind, in one namespace or in all of them."""

    kind: Kind
    namespace: str | None
    call: Callable[..., Any]  # the typed client's list function, used for list and watch
    args: tuple[str, ...]
    selector: str = ""  # a label selector the API server applies to the list and the watch
    synced: bool = False
    # Listed by the API (not an optional kind it refused): what the store lacks does not exist.
    available: bool = False
    rv: str | None = None  # where the watch resumes; None: list first
    watcher: watch.Watch | None = field(default=None, repr=False)

    def in_scope(self, key: Key) -> bool:
        return self.namespace is None or key[0] == self.namespace

    @property
    def label(self) -> str:
        return f"{self.kind} in {self.namespace or 'all namespaces'}"


class _JsonWatch(watch.Watch):
    """kubernetes.watch.Watch, each event's JSON decoded once.

    With ``return_type="object"`` the client decodes every event, encodes its object again and
    decodes that (to "deserialize" it into a dict it already had): three passes over every
    Canary and route the analyzer's own writes send back, a tenth of its CPU at a thousand
    canaries. ``deserialize=False`` decodes once but leaves out ``raw_object``, which the
    client's own handling of an ERROR event (410 Gone) then fails to find. This keeps both.
    """

    def unmarshal_event(self, data: str, return_type: Any) -> dict[str, Any] | None:
        if not data or data.isspace():
            return None
        try:
            event = json.loads(data)
        except json.JSONDecodeError:
            return None
        if not isinstance(event, dict):
            return None
        obj = event.get("object")
        event["raw_object"] = obj
        if isinstance(obj, dict) and event.get("type") != "ERROR":
            rv = (obj.get("metadata") or {}).get("resourceVersion")
            if rv:
                self.resource_version = rv
        return event


class _Backoff:
    """Exponential with jitter, bounded; the wait ends early when the cache stops."""

    def __init__(self, *, initial: float, maximum: float, stopping: threading.Event) -> None:
        self._initial = initial
        self._maximum = maximum
        self._failures = 0
        self._stopping = stopping

    def reset(self) -> None:
        self._failures = 0

    def wait(self, *, first_free: bool = False) -> None:
        self._failures += 1
        if first_free and self._failures == 1:
            return
        ceiling = min(self._maximum, self._initial * 2 ** min(self._failures - 1, 30))
        # Half fixed, half random: replicas that failed together do not retry together.
        delay = ceiling / 2 + random.uniform(0, ceiling / 2)  # noqa: S311 - jitter, not a secret
        self._stopping.wait(delay)


class WatchCache:
    """The latest Canary objects and relevant Deployments, kept current by list+watch threads.

    Read from any thread. ``get`` and ``items`` hand out copies: the tick code may edit what it
    reads (to compute a patch) without corrupting the cache or the next diff; ``peek``, ``select``
    and listeners see the cached objects themselves, to read only. ``kinds`` picks what is watched
    (Canaries and Deployments by default; MetricTemplates and routes in caches of their own).
    """

    def __init__(
        self,
        api_client: client.ApiClient,
        *,
        namespaces: Sequence[str] | None = None,
        keep_deployment: Callable[[Mapping[str, Any]], bool] = is_relevant_deployment,
        watch_timeout_seconds: int = DEFAULT_WATCH_TIMEOUT_SECONDS,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        page_size: int = DEFAULT_PAGE_SIZE,
        backoff_initial: float = DEFAULT_BACKOFF_INITIAL,
        backoff_max: float = DEFAULT_BACKOFF_MAX,
        kinds: Sequence[Kind] = DEFAULT_KINDS,
    ) -> None:
        if namespaces is not None and not namespaces:
            raise ValueError("namespaces: give at least one, or None for all namespaces")
        if not kinds:
            raise ValueError("kinds: give at least one kind to watch")
        self.namespaces: tuple[str, ...] | None = (
            tuple(namespaces) if namespaces is not None else None
        )
        if watch_timeout_seconds < 1:
            raise ValueError("watch_timeout_seconds must be at least 1")
        self._keep_deployment = keep_deployment
        self._watch_timeout = int(watch_timeout_seconds)
        self._request_timeout = request_timeout
        self._page_size = page_size
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max

        crs = client.CustomObjectsApi(api_client)
        apps = client.AppsV1Api(api_client)
        self._sources: list[_Source] = []
        for namespace in namespaces if namespaces is not None else [None]:
            for kind in kinds:
                call: Callable[..., Any]
                args: tuple[str, ...]
                selector = ""
                if kind == "Deployment":
                    if namespace is None:
                        call, args = apps.list_deployment_for_all_namespaces, ()
                    else:
                        call, args = apps.list_namespaced_deployment, (namespace,)
                else:
                    group, version, plural, selector = _CUSTOM[kind]
                    if namespace is None:
                        call, args = crs.list_cluster_custom_object, (group, version, plural)
                    else:
                        call = crs.list_namespaced_custom_object
                        args = (group, version, namespace, plural)
                self._sources.append(
                    _Source(kind=kind, namespace=namespace, call=call, args=args, selector=selector)
                )

        self._lock = threading.Lock()
        self._store: dict[Kind, dict[Key, dict[str, Any]]] = {kind: {} for kind in kinds}
        self._listeners: list[Listener] = []
        self._calls = {"list": 0, "watch": 0}
        self._synced = threading.Event()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    # --- reading --------------------------------------------------------------------------------

    def get(self, namespace: str, name: str, *, kind: Kind = "Canary") -> dict[str, Any] | None:
        with self._lock:
            obj = self._store[kind].get((namespace, name))
        return clone(obj) if obj is not None else None

    def peek(self, namespace: str, name: str, *, kind: Kind = "Canary") -> Mapping[str, Any] | None:
        """The stored object itself, not a copy: for code that only reads it (the scheduler's
        per-event checks). The cache replaces an object on change and never edits one, so what
        this returns stays as it was; the caller must not edit it either."""
        with self._lock:
            return self._store[kind].get((namespace, name))

    def items(self, kind: Kind = "Canary") -> list[dict[str, Any]]:
        with self._lock:
            objs = list(self._store[kind].values())
        return [clone(o) for o in objs]

    def select(
        self, pick: Callable[[Mapping[str, Any]], T | None], *, kind: Kind = "Canary"
    ) -> list[T]:
        """What `pick` returns for each cached object, skipping None; no copies are made.

        `pick` runs under the cache's lock and must only read the object it is given. With many
        canaries this is what per-tick scans use: copying the whole cache on every tick grows with
        the square of their number.
        """
        with self._lock:
            picked = [pick(obj) for obj in self._store[kind].values()]
        return [p for p in picked if p is not None]

    def synced(self) -> bool:
        """True once every list+watch has completed its first list."""
        return self._synced.is_set()

    def holds(self, kind: Kind) -> bool:
        """Whether the copy of ``kind`` is complete: every list of it answered (not refused, as
        an optional kind's may be), so an object it lacks does not exist, or is not selected."""
        with self._lock:
            sources = [s for s in self._sources if s.kind == kind]
            return bool(sources) and all(s.synced and s.available for s in sources)

    def covers(self, namespace: str) -> bool:
        """Whether objects of ``namespace`` are watched (all are, unless limited)."""
        return self.namespaces is None or namespace in self.namespaces

    def alive(self) -> bool:
        """False once a list+watch thread has ended (after stop(), or on an error its loop did
        not catch): that kind would never change again in the copy. True before start()."""
        return all(thread.is_alive() for thread in list(self._threads))

    def wait_synced(self, timeout: float | None = None) -> bool:
        return self._synced.wait(timeout)

    def api_calls(self) -> dict[str, int]:
        """List and watch requests sent so far (telemetry: each re-list shows up here)."""
        with self._lock:
            return dict(self._calls)

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener(kind, event_type, obj)`` after every change; returns the unsubscribe.

        Listeners run on the cache's threads, after the cache holds the change, one event at a
        time per kind and namespace; they must be quick and must not raise (errors are logged).
        They are handed the cached object itself, not a copy (with a thousand canaries, a copy
        per event was a tenth of the analyzer's CPU): read it, never edit it; ``get`` gives a
        copy to edit.
        """
        with self._lock:
            self._listeners.append(listener)

        def unsubscribe() -> None:
            with self._lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return unsubscribe

    # --- running --------------------------------------------------------------------------------

    def start(self) -> None:
        if self._threads:
            raise RuntimeError("the cache is already started")
        for source in self._sources:
            thread = threading.Thread(
                target=self._run,
                args=(source,),
                name=f"perch-cache-{source.kind}-{source.namespace or 'all'}",
                daemon=True,
            )
            self._threads.append(thread)
            thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        deadline = time.monotonic() + timeout
        threads = [t for t in self._threads if t is not threading.current_thread()]
        # Repeated: a watch that was connecting during the first round resets its stop flag when
        # its stream begins, and needs telling again.
        while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
            for source in self._sources:
                watcher = source.watcher
                if watcher is not None:
                    # Shuts the socket down, which ends a read waiting for the next event.
                    watcher.stop()  # type: ignore[no-untyped-call]
            for thread in threads:
                thread.join(0.05)

    def _run(self, source: _Source) -> None:
        backoff = _Backoff(
            initial=self._backoff_initial, maximum=self._backoff_max, stopping=self._stopping
        )
        while not self._stopping.is_set():
            try:
                if source.rv is None:
                    source.rv = self._relist(source)
                self._watch(source, backoff)
            except ApiException as exc:
                if self._stopping.is_set():
                    break
                source.rv = None
                if source.kind in _OPTIONAL_KINDS and exc.status in (403, 404):
                    self._unavailable(source, exc)
                    continue
                if exc.status == 410:
                    log.info("%s: resourceVersion expired; listing again", source.label)
                    # At once the first time; a server that answers 410 right after a fresh list
                    # (a broken proxy, a restoring etcd) gets the backoff, not a hot loop.
                    backoff.wait(first_free=True)
                    continue
                log.warning("%s: %s; listing again", source.label, describe_api_error(exc))
                backoff.wait()
            except Exception as exc:
                if self._stopping.is_set():
                    break
                # Transport errors leave the resourceVersion valid: resume, do not re-list.
                log.warning("%s: %s", source.label, describe_api_error(exc))
                backoff.wait()

    def _unavailable(self, source: _Source, exc: ApiException) -> None:
        """An optional kind the API will not list (CRD missing, RBAC not granted): empty, synced,
        and asked again after the longest backoff."""
        if not source.synced or self._store[source.kind]:
            log.warning(
                "%s: %s; treated as none, asking again every %gs",
                source.label,
                describe_api_error(exc),
                self._backoff_max,
            )
        source.available = False
        self._replace(source, [])
        self._stopping.wait(self._backoff_max)

    def _relist(self, source: _Source) -> str:
        items: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {
                "limit": self._page_size,
                "_preload_content": False,
                "_request_timeout": self._request_timeout,
            }
            if token:
                kwargs["_continue"] = token
            if source.selector:
                kwargs["label_selector"] = source.selector
            self._count("list")
            page = response_json(source.call(*source.args, **kwargs))
            items += [i for i in page.get("items") or [] if isinstance(i, dict)]
            meta = page.get("metadata") or {}
            token = meta.get("continue") or None
            if token is None:
                rv = str(meta.get("resourceVersion") or "")
                break
        for item in items:
            # List items lack apiVersion and kind on a real API server; watch events carry them.
            item.setdefault("apiVersion", _API_VERSIONS[source.kind])
            item.setdefault("kind", source.kind)
        source.available = True
        self._replace(source, items)
        return rv

    def _watch(self, source: _Source, backoff: _Backoff) -> None:
        """Follow one watch stream to its end, keeping ``source.rv`` at the last event seen."""
        # Events as the API's JSON, not client models (which drop fields the client does not know
        # and cost more than the request), decoded once (_JsonWatch).
        watcher = _JsonWatch(return_type="object")  # type: ignore[no-untyped-call]
        source.watcher = watcher
        if self._stopping.is_set():  # stop() ran before the watcher was registered
            return
        self._count("watch")
        opened, delivered = time.monotonic(), False
        # timeout_seconds also turns off Watch's own silent retry after a 410, so the cache sees
        # the 410 and re-lists instead of resuming from a version the server no longer has.
        events: Iterator[dict[str, Any]] = watcher.stream(  # type: ignore[no-untyped-call]
            source.call,
            *source.args,
            resource_version=source.rv,
            timeout_seconds=self._watch_timeout,
            allow_watch_bookmarks=True,
            _request_timeout=(self._request_timeout, self._watch_timeout + _WATCH_READ_MARGIN),
            **({"label_selector": source.selector} if source.selector else {}),
        )
        try:
            for event in events:
                if self._stopping.is_set():
                    break
                obj = event.get("raw_object")
                if not isinstance(obj, dict):
                    continue
                event_type = event.get("type")
                if event_type in ("ADDED", "MODIFIED", "DELETED"):
                    self._apply(source, event_type, obj)
                # Per event, so that a stream cut in the middle resumes after the last event
                # applied rather than replaying older versions over newer ones. BOOKMARK events
                # carry nothing but this.
                source.rv = _rv(obj) or source.rv
                delivered = True
                backoff.reset()
        finally:
            events.close()  # type: ignore[attr-defined]
            source.watcher = None
        if not delivered and time.monotonic() - opened < _SHORT_WATCH_SECONDS:
            # client-go's "very short watch": a proxy that closes every stream at once would
            # otherwise be met with a loop of new watches.
            log.warning("%s: the watch ended at once without events", source.label)
            backoff.wait()
        else:
            backoff.reset()

    # --- the store ------------------------------------------------------------------------------

    def _keep(self, kind: Kind, obj: Mapping[str, Any]) -> bool:
        return kind != "Deployment" or self._keep_deployment(obj)

    def _replace(self, source: _Source, items: list[dict[str, Any]]) -> None:
        kind = source.kind
        events: list[tuple[Kind, EventType, dict[str, Any]]] = []
        fresh = {_key(o): o for o in items if self._keep(kind, o)}
        with self._lock:
            store = self._store[kind]
            for key in [k for k in store if source.in_scope(k) and k not in fresh]:
                events.append((kind, "DELETED", store.pop(key)))
            for key, obj in fresh.items():
                old = store.get(key)
                store[key] = obj
                if old is None:
                    events.append((kind, "ADDED", obj))
                elif _rv(old) != _rv(obj):
                    events.append((kind, "MODIFIED", obj))
            source.synced = True
            if all(s.synced for s in self._sources):
                self._synced.set()
        self._emit(events)

    def _apply(self, source: _Source, event_type: str, obj: dict[str, Any]) -> None:
        kind, key = source.kind, _key(obj)
        emitted: EventType
        with self._lock:
            store = self._store[kind]
            old = store.get(key)
            if event_type != "DELETED" and self._keep(kind, obj):
                if old is not None and _rv(old) == _rv(obj):
                    return  # a replay of what the cache holds (a resumed watch)
                store[key] = obj
                emitted = "ADDED" if old is None else "MODIFIED"
            else:
                if old is None:
                    return  # never relevant: nobody was told about it
                del store[key]
                emitted = "DELETED"
        self._emit([(kind, emitted, obj)])

    def _emit(self, events: list[tuple[Kind, EventType, dict[str, Any]]]) -> None:
        if not events:
            return
        with self._lock:
            listeners = list(self._listeners)
        for kind, event_type, obj in events:
            for listener in listeners:
                try:
                    listener(kind, event_type, obj)
                except Exception:
                    log.exception("cache listener failed on %s %s %s", event_type, kind, _key(obj))

    def _count(self, verb: str) -> None:
        with self._lock:
            self._calls[verb] += 1
