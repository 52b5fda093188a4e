"""A kubelet stand-in for a control plane with no nodes, the way kwok plays one.

The control plane of the cluster tier runs the real controllers but nothing that runs a container:
the Deployment controller makes ReplicaSets and Pods, and they stay Pending. ``FakeKubelet``:

- registers a Node whose ``Ready`` condition it sets and whose Lease in ``kube-node-lease`` it
  renews every few seconds (without that, the node lifecycle controller marks the node NotReady
  about 40 s after the last heartbeat and every pod on it unready);
- binds every pending pod to that node (there is no scheduler) and reports it Running and Ready,
  with a pod IP, so that ReplicaSets count it available and EndpointSlices list it;
- withholds readiness on demand (``withhold(namespace, prefix)``): matching pods run but never
  become Ready, which is how deadline tests make a rollout stall;
- finishes the deletion of bound pods (the kubelet would confirm it; without it they stay
  Terminating).

Pods are followed through a watch (with a re-list when it ends), so a rollout moves as fast as the
controllers do. On a cluster that has nodes of its own (kind) it is not started.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import re
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

log = logging.getLogger("tests.kubelet")

NODE = "perch-test-node"
LEASE_NAMESPACE = "kube-node-lease"
# kubelet's defaults: a 40 s lease renewed every 10 s; renewing more often costs nothing here and
# keeps a slow test machine well inside the grace period.
LEASE_SECONDS = 40
RENEW_SECONDS = 5.0


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _micro_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class FakeKubelet:
    def __init__(self, api: client.ApiClient, *, node: str = NODE) -> None:
        self.api = api
        self.core = client.CoreV1Api(api)
        self.node = node
        # (namespace, pod name pattern, image or "" for any): pods that never become Ready.
        self._withheld: set[tuple[str, str, str]] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ips = (f"10.244.{i // 250}.{i % 250 + 2}" for i in itertools.count())
        self._ready: dict[tuple[str, str], bool] = {}  # pods as last reported: ready or not
        self._threads: list[threading.Thread] = []

    # --- control --------------------------------------------------------------------------------

    def start(self) -> FakeKubelet:
        self._register_node()
        for target, name in ((self._heartbeat, "kubelet-lease"), (self._follow, "kubelet-pods")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=6)

    def withhold(self, namespace: str, pattern: str, *, image: str = "") -> None:
        """Pods of `namespace` whose name matches the regular expression `pattern` from its start
        (and that run `image`, when given) run but are never Ready: a release that does not come
        up. A Deployment's pods are named ``<deployment>-<hash>-<suffix>``, so
        ``podinfo-[a-z0-9]+-[a-z0-9]+$`` means the primary's pods and not podinfo-canary's."""
        with self._lock:
            self._withheld.add((namespace, pattern, image))
        self.resync(namespace)

    def release(self, namespace: str, pattern: str, *, image: str = "") -> None:
        with self._lock:
            self._withheld.discard((namespace, pattern, image))
        self.resync(namespace)

    def resync(self, namespace: str) -> None:
        for pod in self.core.list_namespaced_pod(namespace).items:
            self._handle(self.api.sanitize_for_serialization(pod))

    # --- the node -------------------------------------------------------------------------------

    def _register_node(self) -> None:
        body = {
            "metadata": {
                "name": self.node,
                "labels": {"kubernetes.io/hostname": self.node, "type": "perch-test"},
            }
        }
        with contextlib.suppress(ApiException):
            self.core.create_node(body)
        self._node_status()
        self._renew_lease()

    def _node_status(self) -> None:
        now = _now()
        condition = {
            "type": "Ready",
            "status": "True",
            "reason": "KubeletReady",
            "message": "perch test kubelet is posting ready status",
            "lastHeartbeatTime": now,
            "lastTransitionTime": now,
        }
        capacity = {"cpu": "64", "memory": "256Gi", "pods": "10000"}
        status = {
            "conditions": [condition],
            "capacity": capacity,
            "allocatable": capacity,
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
            "nodeInfo": {
                "architecture": "amd64",
                "operatingSystem": "linux",
                "kubeletVersion": "v1.36.2",
                "kubeProxyVersion": "",
                "containerRuntimeVersion": "fake://1",
                "kernelVersion": "",
                "osImage": "perch test kubelet",
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
            },
        }
        self.core.patch_node_status(
            self.node, {"status": status}, _content_type="application/merge-patch+json"
        )

    def _renew_lease(self) -> None:
        leases = client.CoordinationV1Api(self.api)
        spec = {
            "holderIdentity": self.node,
            "leaseDurationSeconds": LEASE_SECONDS,
            "renewTime": _micro_now(),
        }
        try:
            leases.patch_namespaced_lease(
                self.node,
                LEASE_NAMESPACE,
                {"spec": spec},
                _content_type="application/merge-patch+json",
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
            leases.create_namespaced_lease(
                LEASE_NAMESPACE, {"metadata": {"name": self.node}, "spec": spec}
            )

    def _heartbeat(self) -> None:
        beats = 0
        while not self._stop.wait(RENEW_SECONDS):
            # The API server may be restarting (fault tests): the next beat tries again.
            with contextlib.suppress(Exception):
                self._renew_lease()
                beats += 1
                if beats % 4 == 0:
                    self._node_status()

    # --- pods -----------------------------------------------------------------------------------

    def _follow(self) -> None:
        while not self._stop.is_set():
            try:
                listed = self.core.list_pod_for_all_namespaces()
                for pod in listed.items:
                    self._handle(self.api.sanitize_for_serialization(pod))
                for event in self._events(listed.metadata.resource_version):
                    if self._stop.is_set():
                        return
                    if event["type"] in ("ADDED", "MODIFIED"):
                        self._handle(event["raw_object"])
                    elif event["type"] == "DELETED":
                        meta = event["raw_object"].get("metadata") or {}
                        self._ready.pop((meta.get("namespace"), meta.get("name")), None)
            except Exception:
                # A watch that expired (410) or an API server restart: list again.
                log.debug("kubelet watch ended; re-listing", exc_info=True)
                self._stop.wait(0.5)

    def _events(self, resource_version: str) -> Iterator[dict[str, Any]]:
        stream = watch.Watch().stream(
            self.core.list_pod_for_all_namespaces,
            resource_version=resource_version,
            # Short, so that stop() does not wait long for a watch with nothing to say.
            timeout_seconds=5,
            allow_watch_bookmarks=False,
        )
        for event in stream:
            if event.get("type") == "ERROR":
                raise RuntimeError(f"watch error: {event.get('raw_object')}")
            yield event

    def _is_withheld(self, pod: dict[str, Any]) -> bool:
        meta = pod.get("metadata") or {}
        namespace, name = meta.get("namespace", ""), meta.get("name", "")
        images = {c.get("image") for c in (pod.get("spec") or {}).get("containers") or []}
        with self._lock:
            return any(
                ns == namespace and re.match(pattern, name) and (not image or image in images)
                for ns, pattern, image in self._withheld
            )

    def _handle(self, pod: dict[str, Any]) -> None:
        meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
        namespace, name = meta.get("namespace", ""), meta.get("name", "")
        try:
            if meta.get("deletionTimestamp"):
                if spec.get("nodeName"):
                    with contextlib.suppress(ApiException):
                        self.core.delete_namespaced_pod(name, namespace, grace_period_seconds=0)
                return
            if not spec.get("nodeName"):
                self._bind(namespace, name)
            ready = not self._is_withheld(pod)
            if self._ready.get((namespace, name)) == ready and self._reported(pod, ready):
                return
            self._report(pod, ready=ready)
            self._ready[(namespace, name)] = ready
        except ApiException as exc:
            if exc.status not in (404, 409):
                log.warning("kubelet could not run pod %s/%s: %s", namespace, name, exc.reason)

    def _bind(self, namespace: str, name: str) -> None:
        body = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": name, "namespace": namespace},
            "target": {"apiVersion": "v1", "kind": "Node", "name": self.node},
        }
        # _preload_content=False: the client cannot deserialise a Binding's answer.
        self.core.create_namespaced_pod_binding(name, namespace, body, _preload_content=False)

    @staticmethod
    def _reported(pod: dict[str, Any], ready: bool) -> bool:
        status = pod.get("status") or {}
        conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
        return status.get("phase") == "Running" and conditions.get("Ready") == str(ready)

    def _report(self, pod: dict[str, Any], *, ready: bool) -> None:
        meta, spec = pod["metadata"], pod.get("spec") or {}
        now = _now()
        flag = "True" if ready else "False"
        started = (pod.get("status") or {}).get("startTime") or now
        ip = (pod.get("status") or {}).get("podIP") or next(self._ips)
        containers = [
            {
                "name": c["name"],
                "image": c.get("image", ""),
                "imageID": f"fake://{c.get('image', '')}",
                "containerID": f"fake://{meta['uid']}/{c['name']}",
                "ready": ready,
                "started": True,
                "restartCount": 0,
                "state": {"running": {"startedAt": started}},
            }
            for c in spec.get("containers") or []
        ]
        conditions = [
            {"type": kind, "status": status, "lastTransitionTime": now}
            for kind, status in (
                ("PodScheduled", "True"),
                ("Initialized", "True"),
                ("ContainersReady", flag),
                ("Ready", flag),
            )
        ]
        status = {
            "phase": "Running",
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "startTime": started,
            "conditions": conditions,
            "containerStatuses": containers,
        }
        self.core.patch_namespaced_pod_status(
            meta["name"],
            meta["namespace"],
            {"status": status},
            _content_type="application/merge-patch+json",
        )


def wait_for(condition: Any, *, what: str, deadline: float = 60.0, every: float = 0.1) -> Any:
    """Polls `condition` until it returns something truthy; fails naming `what` after `deadline`."""
    end = time.monotonic() + deadline
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {deadline:g}s waiting for {what}")
        time.sleep(every)
