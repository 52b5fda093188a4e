"""The route objects a tick reads and writes, read from a watch rather than by a GET per tick.

A tick compares the route's weights with the status (``analyzer.step``'s drift check) and
``SetWeights`` compares the objects it would write with what is there, so every tick of every
canary reads its route. ``Routes`` serves those reads from the watch cache of Perch's routes
(``analyzer.cache.ROUTE_KINDS``, selected by Perch's managed-by label) and falls back to a GET
only for an object the cache does not hold: one that does not exist (yet), one that is not
Perch's (which set_weights then refuses to overwrite), a kind whose CRD or list permission is
missing, or a version the cache does not watch.

A watch delivers an object a moment after it was written, and the analyzer's own write is the
likeliest change to be in flight: a tick that came right after the write of the last would
otherwise read the weights it just replaced and "restore" them. So the answer of each write is
kept until the watch has caught up with it: a read returns the written object while the cached
one is the same object (uid) at an older generation (which the API server raises with every
change of the spec, the only part Perch writes).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any, Protocol, cast

from analyzer.cache import Kind
from perch.resources import Kube, Resource
from perch.routers.base import RouteRef

__all__ = ["RouteCache", "Routes"]


class RouteCache(Protocol):
    """What Routes reads: analyzer.cache.WatchCache with ``kinds=ROUTE_KINDS``."""

    def get(self, namespace: str, name: str, *, kind: Kind = "Canary") -> dict[str, Any] | None: ...

    def peek(
        self, namespace: str, name: str, *, kind: Kind = "Canary"
    ) -> Mapping[str, Any] | None: ...

    def holds(self, kind: Kind) -> bool: ...


def _identity(obj: Mapping[str, Any]) -> tuple[str, int]:
    meta = obj.get("metadata") or {}
    generation = meta.get("generation")
    return str(meta.get("uid") or ""), generation if isinstance(generation, int) else 0


class Routes:
    """Reads route objects from ``cache`` (None: by GET, every time) and remembers writes."""

    def __init__(self, kube: Kube, cache: RouteCache | None = None) -> None:
        self.kube = kube
        self.cache = cache
        self._lock = threading.Lock()
        self._written: dict[tuple[str, str, str], dict[str, Any]] = {}

    def read(self, ref: RouteRef, namespace: str) -> Mapping[str, Any] | None:
        """The route object as Perch last saw it, to read, not to edit; None when it does not
        exist."""
        key = (ref.api_version, ref.kind, f"{namespace}/{ref.name}")
        kind = cast(Kind, ref.kind)
        if self.cache is not None and self.cache.holds(kind):
            # Read only (set_weights copies what it edits): no copy where the cache lends its own.
            cached = self.cache.peek(namespace, ref.name, kind=kind)
            if cached is not None and cached.get("apiVersion") == ref.api_version:
                return self._newest(key, cached)
        found = self.kube.get(Resource(ref.group, ref.version, ref.plural), namespace, ref.name)
        with self._lock:
            self._written.pop(key, None)
        return found

    def wrote(self, ref: RouteRef, namespace: str, obj: Mapping[str, Any]) -> None:
        """``obj`` is the API server's answer to a write of the route: newer than the cache's."""
        if not obj.get("metadata"):
            return
        with self._lock:
            self._written[(ref.api_version, ref.kind, f"{namespace}/{ref.name}")] = dict(obj)

    def _newest(self, key: tuple[str, str, str], cached: Mapping[str, Any]) -> Mapping[str, Any]:
        with self._lock:
            written = self._written.get(key)
            if written is None:
                return cached
            (uid, generation), (wrote_uid, wrote_generation) = (
                _identity(cached),
                _identity(written),
            )
            if uid == wrote_uid and generation < wrote_generation:
                return written
            # The watch has caught up (or the object was replaced since): the cache knows best.
            del self._written[key]
            return cached
