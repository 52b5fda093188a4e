"""What each write of an analysis step costs a real API server, and how many steps it can take.

    flock /tmp/perch-bench.lock .venv/bin/python benchmarks/write_cost_on_cluster.py \
        [--objects 100] [--rounds 5] [--repeat 3] [--out FILE]

A step of a progressing canary is three writes (benchmarks/README.md, analyzer_on_cluster.py):
the Canary's status (a merge patch of the status subresource with a resourceVersion
precondition), the route (a PUT of the VirtualService without managedFields) and the "Advance"
Event (a POST, or a PATCH of count and lastTimestamp for a repeat). This benchmark sends each
kind of write, as the analyzer sends it, to ``--objects`` objects ``--rounds`` times from eight
threads, on a control plane of its own (etcd, kube-apiserver and kube-controller-manager from
``../shared/kube``, or ``PERCH_KUBE_ASSETS``), and reads the CPU seconds the API server, etcd and
this client spent (``/proc/PID/stat``) per write. The whole set is repeated ``--repeat`` times,
interleaved, and the median of the repeats is reported. Variants show what the writes would cost
in other shapes: a status write on a Canary without the pod template in its spec, a status
PUT, a JSON patch, a route merge patch.

The control plane here holds only these objects: in the analyzer benchmark, with 2,000 pods and
1,000 Deployments beside them and every watch it serves, the same step costs the API server
about 1.5 times as much. The report ends with the floor this sets: the API server's and etcd's
CPU for one step (status, route, Event POST), and the steps per second that one core, and the
machine's cores, can take at that price with nothing else running.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from perch.kube import load_api_client  # noqa: E402
from perch.resources import CANARIES, Kube, Resource  # noqa: E402
from perch.routers import RouteTarget, router_for  # noqa: E402
from perch.speccache import cached_parse_spec  # noqa: E402
from perch.status import CanaryStatus, canary_object  # noqa: E402
from tests import seed  # noqa: E402
from tests.support import controlplane  # noqa: E402

NAMESPACE = "bench"
VIRTUALSERVICES = Resource("networking.istio.io", "v1", "virtualservices")
EVENTS = Resource("", "v1", "events")
CRDS = (
    REPO / "charts" / "perch" / "crds" / "canaries.perch.dev.yaml",
    REPO / "tests" / "schemas" / "istio-1.30.3-virtualservices.networking.istio.io.yaml",
)
STATUS = CanaryStatus(
    phase="Progressing",
    canary_weight=5,
    canary_revision="v1-238a84449fe2a2a3",
    last_applied_revision="v1-332b7a421cd29015",
    analysed_revision="v1-238a84449fe2a2a3",
    phase_entered_at="2026-12-03T10:00:00Z",
    last_transition_time="2026-12-03T10:00:00Z",
)
STEP = ("status patch", "route PUT", "Event POST")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Bench:
    def __init__(self, kube: Kube, directory: Path, objects: int):
        self.kube = kube
        self.pids = {
            name: int((directory / f"{name}.pid").read_text())
            for name in ("kube-apiserver", "etcd")
        }
        self.names = [f"app-{i:04d}" for i in range(objects)]
        self.objs: dict[str, dict[str, Any]] = {}
        self.events: dict[str, dict[str, Any]] = {}
        dep = seed.podinfo()
        self.template = dep["spec"]["template"]
        self.spec = cached_parse_spec(dep["metadata"]["annotations"]["perch.dev/spec"])
        self.weight = 0

    def setup(self) -> None:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(self._make, self.names))

    def _make(self, name: str) -> None:
        for key, template in ((f"{name}", self.template), (f"{name}-bare", None)):
            body = canary_object(
                name=key,
                namespace=NAMESPACE,
                provider="istio",
                owner_references=[],
                revision=STATUS.canary_revision,
                template=template,
            )
            self.kube.create(CANARIES, NAMESPACE, body)
            self.objs[key] = self.kube.merge_patch(
                CANARIES, NAMESPACE, key, {"status": STATUS.to_wire()}, subresource="status"
            )
        target = RouteTarget(name=name, namespace=NAMESPACE, owner_references=())
        for desired in router_for("istio").build(target, self.spec, canary_weight=0):
            if desired["kind"] == "VirtualService":
                self.objs[f"vs/{name}"] = self.kube.create(VIRTUALSERVICES, NAMESPACE, desired)
        self.events[name] = self._event(name, 0)

    # The writes, as the analyzer makes them.

    def status_patch(self, key: str) -> None:
        status = STATUS.to_wire() | {"canaryWeight": self.weight}
        body = {"metadata": {"resourceVersion": self._rv(key)}, "status": status}
        self.objs[key] = self.kube.merge_patch(CANARIES, NAMESPACE, key, body, subresource="status")

    def status_put(self, key: str) -> None:
        body = copy.deepcopy(self.objs[key])
        body["metadata"].pop("managedFields", None)
        body["status"]["canaryWeight"] = self.weight
        self.objs[key] = self.kube.replace(CANARIES, NAMESPACE, key, body, subresource="status")

    def status_json_patch(self, key: str) -> None:
        ops = [
            {"op": "test", "path": "/metadata/resourceVersion", "value": self._rv(key)},
            {"op": "replace", "path": "/status/canaryWeight", "value": self.weight},
        ]
        self.objs[key] = self.kube.json_patch(CANARIES, NAMESPACE, key, ops, subresource="status")

    def route_put(self, name: str) -> None:
        body = copy.deepcopy(self.objs[f"vs/{name}"])
        body["metadata"].pop("managedFields", None)
        self._weights(body["spec"]["http"])
        self.objs[f"vs/{name}"] = self.kube.replace(VIRTUALSERVICES, NAMESPACE, name, body)

    def route_patch(self, name: str) -> None:
        current = self.objs[f"vs/{name}"]
        http = copy.deepcopy(current["spec"]["http"])
        self._weights(http)
        body = {"metadata": {"resourceVersion": self._rv(f"vs/{name}")}, "spec": {"http": http}}
        self.objs[f"vs/{name}"] = self.kube.merge_patch(VIRTUALSERVICES, NAMESPACE, name, body)

    def event_post(self, name: str) -> None:
        self.events[name] = self._event(name, self.weight)

    def event_patch(self, name: str) -> None:
        event = self.events[name]
        body = {"count": int(event.get("count") or 1) + 1, "lastTimestamp": _now()}
        self.events[name] = self.kube.merge_patch(
            EVENTS, NAMESPACE, event["metadata"]["name"], body
        )

    def _weights(self, http: list[dict[str, Any]]) -> None:
        routes = http[0]["route"]
        routes[0]["weight"], routes[1]["weight"] = 100 - self.weight, self.weight

    def _event(self, name: str, weight: int) -> dict[str, Any]:
        canary = self.objs[name]
        body = {
            "metadata": {"generateName": f"{name}."},
            "involvedObject": {
                "apiVersion": canary["apiVersion"],
                "kind": canary["kind"],
                "name": name,
                "namespace": NAMESPACE,
                "uid": canary["metadata"]["uid"],
            },
            "reason": "Synced",
            "message": f"Advance {name}.{NAMESPACE} canary weight {weight}",
            "type": "Normal",
            "source": {"component": "perch-analyzer"},
            "firstTimestamp": _now(),
            "lastTimestamp": _now(),
            "count": 1,
        }
        return self.kube.create(EVENTS, NAMESPACE, body)

    def _rv(self, key: str) -> str:
        return str(self.objs[key]["metadata"]["resourceVersion"])

    def measure(
        self, write: Callable[[str], None], keys: list[str], rounds: int
    ) -> dict[str, float]:
        before = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        mine, started = cpu_seconds(os.getpid()), time.monotonic()
        for _ in range(rounds):
            self.weight = (self.weight + 1) % 50
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(write, keys))
        count = rounds * len(keys)
        result = {
            name: 1000 * (cpu_seconds(pid) - before[name]) / count
            for name, pid in self.pids.items()
        }
        result["client"] = 1000 * (cpu_seconds(os.getpid()) - mine) / count
        result["wall"] = 1000 * (time.monotonic() - started) / count
        return result


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5, help="writes per object per measurement")
    parser.add_argument("--repeat", type=int, default=3, help="the whole set, interleaved")
    parser.add_argument(
        "--out", type=Path, default=REPO / "benchmarks" / "write_cost_on_cluster.last.json"
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="perch-writes-"))
    session = controlplane.start(work / "kube")
    try:
        assert session.plane.directory is not None, "needs a control plane it starts itself"
        api = load_api_client(str(session.plane.kubeconfig))
        api.configuration.connection_pool_maxsize = 16
        extensions = client.ApiextensionsV1Api(api)
        for path in CRDS:
            extensions.create_custom_resource_definition(yaml.safe_load(path.read_text()))
        time.sleep(3)  # Established, and the first write's validators built
        client.CoreV1Api(api).create_namespace({"metadata": {"name": NAMESPACE}})
        bench = Bench(
            Kube(api, field_manager="perch-analyzer"), session.plane.directory, args.objects
        )
        bench.setup()
        names = bench.names
        bare = [f"{n}-bare" for n in names]
        cases: list[tuple[str, Callable[[str], None], list[str]]] = [
            ("status patch", bench.status_patch, names),
            ("route PUT", bench.route_put, names),
            ("Event POST", bench.event_post, names),
            ("Event PATCH (a repeat)", bench.event_patch, names),
            ("status patch, no template in the spec", bench.status_patch, bare),
            ("status PUT", bench.status_put, names),
            ("status JSON patch", bench.status_json_patch, names),
            ("route merge patch", bench.route_patch, names),
        ]
        runs: dict[str, list[dict[str, float]]] = {label: [] for label, _, _ in cases}
        for _ in range(args.repeat):
            for label, write, keys in cases:
                runs[label].append(bench.measure(write, keys, args.rounds))
        table = {
            label: {k: statistics.median(r[k] for r in results) for k in results[0]}
            for label, results in runs.items()
        }
        print(f"{'write':40s} {'kube-apiserver':>15s} {'etcd':>6s} {'client':>7s} {'wall':>6s}")
        for label, row in table.items():
            print(
                f"{label:40s} {row['kube-apiserver']:12.2f} ms {row['etcd']:6.2f} "
                f"{row['client']:7.2f} {row['wall']:6.2f}"
            )
        step_api = sum(table[label]["kube-apiserver"] for label in STEP)
        step_etcd = sum(table[label]["etcd"] for label in STEP)
        per_core = 1000 / (step_api + step_etcd)
        cores = os.cpu_count() or 1
        print(
            f"\na step (status patch + route PUT + Event POST): kube-apiserver {step_api:.1f} ms, "
            f"etcd {step_etcd:.1f} ms of CPU → at most {per_core:.0f} steps/s per core, "
            f"{per_core * cores:.0f} on this machine's {cores} cores with nothing else running"
        )
        result = {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "commit": os.popen(f"git -C {REPO} rev-parse --short HEAD").read().strip(),
            "args": {k: str(v) for k, v in vars(args).items()},
            "load_average": os.getloadavg(),
            "ms_cpu_per_write": table,
            "runs": runs,
            "step": {"kube-apiserver_ms": step_api, "etcd_ms": step_etcd},
            "steps_per_second_per_core": per_core,
            "cores": cores,
        }
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
        return 0
    finally:
        session.stop()


if __name__ == "__main__":
    sys.exit(main())
