"""Kubernetes Events on the Canary object, each also a JSON log line, in Flagger's wording.

`kubectl describe canary podinfo` shows them; log collectors get the same line.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from perch.names import CANARY_API_VERSION, CANARY_KIND
from perch.resources import Kube, Resource
from perch.status import timestamp

EVENTS = Resource("", "v1", "events")
COMPONENT = "perch-analyzer"
log = logging.getLogger("perch.analyzer")


class EventRecorder:
    def __init__(self, kube: Kube, *, host: str = "") -> None:
        self.kube = kube
        self.host = host

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
        try:
            self.kube.create(EVENTS, namespace, event)
        except (ApiException, HTTPError, OSError) as exc:
            # An event is a record, not a step: failing to write one never stops a rollout.
            log.warning("could not record event for %s.%s: %s", name, namespace, exc)
