"""Kubernetes Events on the Canary object, each also a JSON log line, in Flagger's wording.

`kubectl describe canary podinfo` shows them; log collectors get the same line.

A repeat is aggregated as Kubernetes' own event recorder (client-go's EventCorrelator) does: an
event with the same object, type, reason and message as one this recorder wrote before updates
that Event's ``count`` and ``lastTimestamp`` (one PATCH) instead of creating another object, so a
halt that lasts an hour is one Event "x360 over 1h" in ``kubectl describe``, not 360 objects. The
recorder remembers the last ``MAX_REMEMBERED`` such events (client-go keeps 4,096); a restarted
analyzer, or an Event that expired meanwhile (the API server keeps them an hour), starts a new one.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from perch.kube import is_not_found
from perch.names import CANARY_API_VERSION, CANARY_KIND
from perch.resources import Kube, Resource
from perch.status import timestamp

EVENTS = Resource("", "v1", "events")
MAX_REMEMBERED: Final = 4096
COMPONENT = "perch-analyzer"
log = logging.getLogger("perch.analyzer")


@dataclass(slots=True)
class _Written:
    name: str  # the Event object's name
    count: int


class EventRecorder:
    def __init__(self, kube: Kube, *, host: str = "") -> None:
        self.kube = kube
        self.host = host
        self._lock = threading.Lock()
        self._written: OrderedDict[tuple[str, ...], _Written] = OrderedDict()

    def record(
        self,
        canary: Mapping[str, Any],
        *,
        reason: str,
        message: str,
        type_: str = "Normal",
        now: datetime | None = None,
    ) -> None:
        meta = canary.get("metadata") or {}
        name, namespace = str(meta.get("name", "")), str(meta.get("namespace", ""))
        level = logging.WARNING if type_ == "Warning" else logging.INFO
        log.log(
            level,
            message,
            extra={
                "fields": {"canary": f"{name}.{namespace}", "reason": reason, "eventType": type_}
            },
        )
        at = timestamp(now or datetime.now(UTC))
        key = (namespace, name, str(meta.get("uid", "")), type_, reason, message)
        try:
            if not self._repeat(key, namespace, at):
                self._create(key, canary, reason=reason, message=message, type_=type_, at=at)
        except (ApiException, HTTPError, OSError) as exc:
            # An event is a record, not a step: failing to write one never stops a rollout.
            log.warning("could not record event for %s.%s: %s", name, namespace, exc)

    def _repeat(self, key: tuple[str, ...], namespace: str, at: str) -> bool:
        """Counts a repeat on the Event written before; False when there is none to count on."""
        with self._lock:
            written = self._written.get(key)
            if written is None:
                return False
            self._written.move_to_end(key)
            count = written.count + 1
        try:
            self.kube.merge_patch(
                EVENTS, namespace, written.name, {"count": count, "lastTimestamp": at}
            )
        except ApiException as exc:
            if not is_not_found(exc):
                raise
            with self._lock:
                self._written.pop(key, None)
            return False  # expired or deleted meanwhile: a new one
        with self._lock:
            if key in self._written:
                self._written[key].count = max(self._written[key].count, count)
        return True

    def _create(
        self,
        key: tuple[str, ...],
        canary: Mapping[str, Any],
        *,
        reason: str,
        message: str,
        type_: str,
        at: str,
    ) -> None:
        meta = canary.get("metadata") or {}
        name, namespace = str(meta.get("name", "")), str(meta.get("namespace", ""))
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{name}.", "namespace": namespace},
            "involvedObject": {
                "apiVersion": CANARY_API_VERSION,
                "kind": CANARY_KIND,
                "name": name,
                "namespace": namespace,
                "uid": meta.get("uid", ""),
                "resourceVersion": meta.get("resourceVersion", ""),
            },
            "reason": reason,
            "message": message,
            "type": type_,
            "source": {"component": COMPONENT, "host": self.host}
            if self.host
            else {"component": COMPONENT},
            "firstTimestamp": at,
            "lastTimestamp": at,
            "count": 1,
            "reportingComponent": COMPONENT,
        }
        created = self.kube.create(EVENTS, namespace, event)
        written = str((created.get("metadata") or {}).get("name") or "")
        if not written:
            return
        with self._lock:
            self._written[key] = _Written(name=written, count=1)
            self._written.move_to_end(key)
            while len(self._written) > MAX_REMEMBERED:
                self._written.popitem(last=False)
