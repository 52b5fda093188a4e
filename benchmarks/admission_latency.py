"""Admission latency of perch-webhook against its serving floor, measured in one run.

    .venv/bin/python benchmarks/admission_latency.py [--duration S] [--connections 8]
                                                     [--rounds 3] [--out FILE.json]

Two perch-webhook servers run side by side, started with the same flags (gthread, 2 workers x 4
threads, TLS from perch-certs, perch-webhook's defaults otherwise: log level info, keep-alive):

- floor: `--app benchmarks.noop_app:create_app`, Flask and gunicorn with no Perch logic;
- perch: `--app webhook.app:create_app`, the real admitter, its KUBECONFIG pointing at the
  Kubernetes API stand-in (tests/standin.py) that this process runs.

Cases, each over TLS with keep-alive connections (handshakes are not timed):

- floor / perch pass-through with wrk (POST through a Lua script, `--latency`): the same ~10 KB
  AdmissionReview every time, an UPDATE of an opted-in Deployment that changes only replicas
  (Perch decides it from the request alone);
- the same two with a Python client (threads with one keep-alive HTTPSConnection each, run in a
  child process so that its GIL is not the stand-in's), the baseline of the next case;
- perch canary spawn, Python client: every request an UPDATE with a new pod template for a
  different Deployment that was opted in beforehand (through the webhook, so its Canary object,
  canary Service and VirtualService exist) and has no canary yet; Perch reads the stand-in, writes
  the Canary object and creates the canary Deployment and HPA. Once more with 1 connection, which
  shows the service time without queueing.

The connections are spread evenly over the two gunicorn workers (see `connection_owners`), and
each case records the CPU time the server spent per request. Each case runs once per round;
rounds alternate the order of floor and Perch, and the medians over rounds are reported, ratios
as the median of each round's ratio (the machine is noisy: only ratios against the floor
measured minutes apart mean anything). Every response must be 200 with allowed=true (a spawn also
its "canary started" warning, and its canary Deployment must exist); any failure makes the exit
code 1. Goals are reported, not enforced.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import datetime as dt
import http.client
import json
import math
import multiprocessing
import os
import platform
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: tests.seed, tests.standin, perch, webhook
    sys.path.insert(0, str(REPO))

NAMESPACE = "test"
HOST = "127.0.0.1"
WORKERS = 2
THREADS = 4
NOOP_APP = "benchmarks.noop_app:create_app"
PERCH_APP = "webhook.app:create_app"
START_DEADLINE = 60.0
SPAWN_WARNING = "canary started for revision"
GOAL_PASS_THROUGH_P99_RATIO = 1.3
GOAL_SPAWN_P99_MS = 50.0
CASES: tuple[tuple[str, str, str], ...] = (
    # (key, label, client)
    ("floor_wrk", "floor (no-op app)", "wrk"),
    ("pass_wrk", "perch pass-through", "wrk"),
    ("floor_py", "floor (no-op app)", "python"),
    ("pass_py", "perch pass-through", "python"),
    ("spawn_py", "perch canary spawn", "python"),
    # Service time without queueing: releases seldom come 8 at once.
    ("spawn_py_c1", "perch canary spawn, 1 conn", "python"),
)
SPAWN_CASES = ("spawn_py", "spawn_py_c1")


# --- request bodies ---------------------------------------------------------------------------

TIME = "2025-01-15T10:00:00Z"
USER_ANNOTATIONS = frozenset({"perch.dev/enabled", "perch.dev/spec"})


def as_sent(dep: dict[str, Any], *, revision: int) -> dict[str, Any]:
    """A Deployment as the API server sends it to a webhook after `kubectl apply`: with
    kubectl's last-applied-configuration annotation and the status (what makes the seed's
    AdmissionReview ~10 KB, as in real clusters; managedFields, left out, would add ~4 KB)."""
    dep = copy.deepcopy(dep)
    meta = dep["metadata"]
    annotations = meta.setdefault("annotations", {})
    # What the user wrote; what Perch and controllers add is not in the applied configuration.
    user_annotations = {k: v for k, v in annotations.items() if k in USER_ANNOTATIONS}
    applied = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "annotations": user_annotations,
            "labels": meta.get("labels", {}),
            "name": meta["name"],
            "namespace": meta["namespace"],
        },
        "spec": {
            "replicas": dep["spec"]["replicas"],
            "selector": dep["spec"]["selector"],
            "template": {
                "metadata": {
                    "labels": dep["spec"]["template"]["metadata"]["labels"],
                    "annotations": dep["spec"]["template"]["metadata"].get("annotations", {}),
                },
                "spec": {"containers": dep["spec"]["template"]["spec"]["containers"]},
            },
        },
    }
    annotations["kubectl.kubernetes.io/last-applied-configuration"] = (
        json.dumps(applied, separators=(",", ":"), sort_keys=True) + "\n"
    )
    annotations["deployment.kubernetes.io/revision"] = str(revision)
    meta.setdefault("creationTimestamp", TIME)
    replicas = dep["spec"]["replicas"]
    dep["status"] = {
        "observedGeneration": meta.get("generation", 1),
        "replicas": replicas,
        "updatedReplicas": replicas,
        "readyReplicas": replicas,
        "availableReplicas": replicas,
        "conditions": [
            {
                "type": "Available",
                "status": "True",
                "lastUpdateTime": TIME,
                "lastTransitionTime": TIME,
                "reason": "MinimumReplicasAvailable",
                "message": "Deployment has minimum availability.",
            },
            {
                "type": "Progressing",
                "status": "True",
                "lastUpdateTime": TIME,
                "lastTransitionTime": TIME,
                "reason": "NewReplicaSetAvailable",
                "message": f'ReplicaSet "{meta["name"]}-6b7c9d8f5" has successfully progressed.',
            },
        ],
    }
    return dep


def deployment(name: str, *, opted_in: bool) -> dict[str, Any]:
    """The seed podinfo Deployment under another name (its own labels and autoscaler)."""
    from tests.seed import SEED_SPEC_CURRENT, podinfo

    spec = SEED_SPEC_CURRENT.replace("  name: podinfo\n", f"  name: {name}\n")
    dep = podinfo(spec=spec if opted_in else None, enabled=opted_in, uid=None, namespace=NAMESPACE)
    dep["metadata"]["name"] = name
    for labels in (
        dep["metadata"]["labels"],
        dep["spec"]["selector"]["matchLabels"],
        dep["spec"]["template"]["metadata"]["labels"],
    ):
        labels["app"] = name
    return dep


def review_body(*, operation: str, new: dict[str, Any], old: dict[str, Any] | None) -> bytes:
    from tests.seed import admission_review

    review = admission_review(operation=operation, obj=new, old=old, uid=str(uuid.uuid4()))
    return json.dumps(review, separators=(",", ":")).encode()


def pass_through_body() -> bytes:
    """UPDATE of the opted-in seed Deployment changing replicas only: no API call is needed."""
    from perch.revision import template_revision
    from tests.seed import SEED_SPEC_CURRENT, podinfo

    old = podinfo(spec=SEED_SPEC_CURRENT)
    old["metadata"]["annotations"]["perch.dev/revision"] = template_revision(
        old["spec"]["template"]
    )
    new = copy.deepcopy(old)
    new["spec"]["replicas"] = 3
    new["metadata"]["generation"] = 2
    return review_body(
        operation="UPDATE", new=as_sent(new, revision=1), old=as_sent(old, revision=1)
    )


# --- the servers ------------------------------------------------------------------------------


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@dataclass
class Certs:
    ca: Path
    cert: Path
    key: Path


def issue_certs(directory: Path) -> Certs:
    subprocess.run(
        [
            _bin("perch-certs"),
            "issue",
            "--service",
            "perch-webhook",
            "--namespace",
            "perch",
            "--out-dir",
            str(directory),
            "--ip",
            HOST,
        ],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=60,
    )
    return Certs(ca=directory / "ca.crt", cert=directory / "tls.crt", key=directory / "tls.key")


@dataclass
class Server:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    log_file: Any = field(repr=False)

    def workers(self) -> list[int]:
        return worker_pids(self.process.pid)

    def cpu_seconds(self) -> float:
        return cpu_seconds([self.process.pid, *self.workers()])

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log_file.close()


def start_server(
    name: str, app: str, certs: Certs, tmp: Path, env: dict[str, str] | None = None
) -> Server:
    port = free_port()
    log_path = tmp / f"{name}.log"
    log_file = log_path.open("wb")
    server_env = {k: v for k, v in os.environ.items() if not k.startswith("PERCH_WEBHOOK_")}
    server_env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    server_env.pop("KUBECONFIG", None)
    server_env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")])
    )
    server_env.update(env or {})
    process = subprocess.Popen(
        [
            _bin("perch-webhook"),
            "--bind",
            f"{HOST}:{port}",
            "--certfile",
            str(certs.cert),
            "--keyfile",
            str(certs.key),
            "--workers",
            str(WORKERS),
            "--threads",
            str(THREADS),
            "--app",
            app,
        ],
        cwd=REPO,
        env=server_env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    server = Server(name=name, port=port, process=process, log_path=log_path, log_file=log_file)
    context = ssl.create_default_context(cafile=str(certs.ca))
    deadline = time.monotonic() + START_DEADLINE
    while True:
        if process.poll() is not None:
            server.stop()
            raise SystemExit(
                f"{name} server exited with {process.returncode}:\n{server.log_tail()}"
            )
        try:
            conn = http.client.HTTPSConnection(HOST, port, context=context, timeout=5)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                conn.close()
                return server
        except OSError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise SystemExit(
                f"{name} server did not serve within {START_DEADLINE}s:\n{server.log_tail()}"
            )
        time.sleep(0.1)


# --- which worker holds which connection, and CPU time (Linux /proc) ----------------------------
#
# gunicorn's workers race to accept connections: 8 keep-alive connections often all land on one
# of the two workers (half the threads, one core), which halves throughput and doubles p50 for
# that run whatever the app. The clients therefore spread their connections evenly over the
# workers (wrk by starting again until they are), so that the floor and Perch are compared under
# the same distribution; each result records the one it ran with.

BALANCE_ATTEMPTS = 60


def worker_pids(master: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == master:
            pids.append(int(entry.name))
    return sorted(pids)


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU time of these processes so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


def connection_owners(port: int, pids: Sequence[int]) -> dict[int, int]:
    """Client port -> worker pid, for each established connection to the server's `port`."""
    peer_of_inode: dict[str, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            local, remote, state, inode = cols[1], cols[2], cols[3], cols[9]
            if state == "01" and int(local.rsplit(":", 1)[1], 16) == port:
                peer_of_inode[inode] = int(remote.rsplit(":", 1)[1], 16)
    owners: dict[int, int] = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                peer = peer_of_inode.get(target[8:-1])
                if peer is not None:
                    owners[peer] = pid
    return owners


def spread(owners: dict[int, int], pids: Sequence[int]) -> list[int]:
    """Connections per worker, most first (workers without any count as 0)."""
    return sorted((list(owners.values()).count(pid) for pid in pids), reverse=True)


def balanced(counts: Sequence[int]) -> bool:
    return not counts or max(counts) - min(counts) <= 1


# --- wrk --------------------------------------------------------------------------------------

WRK_SCRIPT = """\
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = assert(io.open(%(body)s, "rb"))
wrk.body = f:read("*a")
f:close()

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  responses = 0
  failures = 0
end

function response(status, headers, body)
  responses = responses + 1
  if status ~= 200 or not string.find(body, '"allowed":true', 1, true) then
    failures = failures + 1
  end
end

function done(summary, latency, requests)
  local responses, failures = 0, 0
  for _, t in ipairs(threads) do
    responses = responses + t:get("responses")
    failures = failures + t:get("failures")
  end
  local e = summary.errors
  io.write(string.format(
    'WRK_RESULT {"requests":%%d,"duration_us":%%d,"p50_us":%%d,"p90_us":%%d,"p99_us":%%d,' ..
    '"max_us":%%d,"responses":%%d,"failures":%%d,"connect_errors":%%d,"read_errors":%%d,' ..
    '"write_errors":%%d,"status_errors":%%d,"timeouts":%%d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, responses, failures, e.connect, e.read, e.write,
    e.status, e.timeout))
end
"""


def run_wrk(
    server: Server, body_path: Path, script_dir: Path, *, duration: float, connections: int
) -> dict[str, Any]:
    script = script_dir / "post.lua"
    if not script.exists():
        script.write_text(WRK_SCRIPT % {"body": json.dumps(str(body_path))})
    threads = min(2, connections)
    command = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        "10s",
        "--latency",
        "-s",
        str(script),
        f"https://{HOST}:{server.port}/mutate",
    ]
    pids = server.workers()
    for attempt in range(1, BALANCE_ATTEMPTS + 1):
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        counts: list[int] = []
        deadline = time.monotonic() + 5
        while pids and time.monotonic() < deadline and process.poll() is None:
            owners = connection_owners(server.port, pids)
            if len(owners) >= connections:
                counts = spread(owners, pids)
                break
            time.sleep(0.02)
        if balanced(counts) or attempt == BALANCE_ATTEMPTS:
            break
        process.terminate()  # an uneven spread: connect again
        process.communicate()
    stdout, stderr = process.communicate(timeout=duration + 120)
    line = next((x for x in stdout.splitlines() if x.startswith("WRK_RESULT ")), None)
    if process.returncode != 0 or line is None:
        raise SystemExit(f"wrk failed ({process.returncode}):\n{stdout}\n{stderr}")
    raw = json.loads(line.removeprefix("WRK_RESULT "))
    errors = sum(raw[k] for k in ("connect_errors", "read_errors", "write_errors", "timeouts"))
    seconds = raw["duration_us"] / 1e6
    return {
        "requests": raw["requests"],
        "seconds": round(seconds, 3),
        "rps": raw["requests"] / seconds,
        "p50_ms": raw["p50_us"] / 1000,
        "p90_ms": raw["p90_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "max_ms": raw["max_us"] / 1000,
        # A response that is not 200 with allowed=true, or a request that got no response.
        "failures": raw["failures"] + errors,
        "failure_samples": [f"wrk errors: {raw}"] if raw["failures"] + errors else [],
        "connections_per_worker": counts,
        "connect_attempts": attempt,
    }


# --- the Python client (runs in a child process) -------------------------------------------------


@dataclass(frozen=True)
class ClientJob:
    port: int
    ca: str
    items: list[tuple[str, bytes]]  # (uid, body)
    cycle: bool  # send the same items again and again (False: each once, then stop)
    duration: float
    connections: int
    expect_warning: str = ""
    workers: tuple[int, ...] = ()  # the server's worker pids, to spread the connections over


def _percentile(ordered: Sequence[float], pct: float) -> float:
    """Nearest rank, as wrk reports it."""
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def _check(status: int, data: bytes, uid: str, expect_warning: str) -> str | None:
    if status != 200:
        return f"HTTP {status}: {data[:300]!r}"
    try:
        response = json.loads(data)["response"]
    except (ValueError, KeyError, TypeError):
        return f"not an AdmissionReview: {data[:300]!r}"
    if response.get("uid") != uid:
        return f"uid {response.get('uid')!r}, sent {uid!r}"
    if response.get("allowed") is not True:
        return f"not allowed: {json.dumps(response)[:300]}"
    if expect_warning and not any(expect_warning in w for w in response.get("warnings") or []):
        return f"no {expect_warning!r} warning: {json.dumps(response)[:300]}"
    return None


def client_process(job: ClientJob) -> dict[str, Any]:
    """Keep-alive HTTPS clients on `job.connections` threads; the handshake is not timed."""
    context = ssl.create_default_context(cafile=job.ca)
    lock = threading.Lock()
    source: Iterator[tuple[str, bytes]] = iter(job.items)
    if job.cycle:
        from itertools import cycle

        source = cycle(job.items)
    latencies: list[list[float]] = [[] for _ in range(job.connections)]
    failures = [0] * job.connections
    samples: list[str] = []
    exhausted = threading.Event()
    consumed = [0]
    start = threading.Barrier(job.connections + 1)
    headers = {"Content-Type": "application/json"}
    deadline = [0.0]

    def next_item() -> tuple[str, bytes] | None:
        with lock:
            try:
                item = next(source)
            except StopIteration:
                exhausted.set()
                return None
            consumed[0] += 1
            return item

    def connect() -> http.client.HTTPSConnection:
        conn = http.client.HTTPSConnection(HOST, job.port, context=context, timeout=30)
        conn.request("GET", "/healthz")  # opens the connection: TLS handshake, untimed
        conn.getresponse().read()
        return conn

    def open_spread() -> tuple[list[http.client.HTTPSConnection], list[int]]:
        """`job.connections` connections, as evenly over the workers as the race allows."""
        quota = -(-job.connections // max(1, len(job.workers)))
        kept: list[http.client.HTTPSConnection] = []
        surplus: list[http.client.HTTPSConnection] = []
        per_worker: dict[int, int] = dict.fromkeys(job.workers, 0)
        for _ in range(BALANCE_ATTEMPTS * job.connections):
            if len(kept) == job.connections:
                break
            conn = connect()
            owner = None
            if job.workers:
                assert conn.sock is not None
                owner = connection_owners(job.port, job.workers).get(conn.sock.getsockname()[1])
            if owner is None or per_worker[owner] < quota:
                kept.append(conn)
                if owner is not None:
                    per_worker[owner] += 1
            else:
                surplus.append(conn)  # kept open until the end, so that the next goes elsewhere
        for conn in surplus:
            conn.close()
        while len(kept) < job.connections:
            kept.append(connect())
        return kept, sorted(per_worker.values(), reverse=True)

    connections, counts = open_spread()

    def worker(index: int) -> None:
        conn = connections[index]
        mine = latencies[index]
        start.wait()
        while time.perf_counter() < deadline[0]:
            item = next_item()
            if item is None:
                break
            uid, body = item
            began = time.perf_counter()
            try:
                conn.request("POST", "/mutate", body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException) as exc:
                failures[index] += 1
                with lock:
                    samples.append(f"{type(exc).__name__}: {exc}")
                conn.close()
                conn = connect()
                continue
            mine.append(time.perf_counter() - began)
            problem = _check(response.status, data, uid, job.expect_warning)
            if problem is not None:
                failures[index] += 1
                with lock:
                    samples.append(problem)
        conn.close()

    threads = [
        threading.Thread(target=worker, args=(i,), daemon=True) for i in range(job.connections)
    ]
    for thread in threads:
        thread.start()
    deadline[0] = time.perf_counter() + job.duration + 3600  # set properly once all connected
    start.wait()
    began = time.perf_counter()
    deadline[0] = began + job.duration
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - began
    ordered = sorted(x for per in latencies for x in per)
    return {
        "requests": len(ordered),
        "seconds": round(seconds, 3),
        "rps": len(ordered) / seconds,
        "p50_ms": _percentile(ordered, 50) * 1000,
        "p90_ms": _percentile(ordered, 90) * 1000,
        "p99_ms": _percentile(ordered, 99) * 1000,
        "max_ms": (ordered[-1] if ordered else math.nan) * 1000,
        "failures": sum(failures),
        "failure_samples": samples[:5],
        "ran_out_of_bodies": exhausted.is_set(),
        "bodies_sent": consumed[0],
        "connections_per_worker": counts,
    }


def run_client(job: ClientJob) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(client_process, job).result(timeout=job.duration + 300)


# --- the canary-spawn case: Deployments opted in beforehand, one per request --------------------


class SpawnPool:
    """Deployments opted in through the webhook, each with no canary yet, and the UPDATE that
    gives each a new revision."""

    def __init__(self, standin: Any, perch_port: int, ca: Path, connections: int):
        from perch.resources import Kube

        self.kube = Kube(standin.api_client(), timeout=30)
        self.port = perch_port
        self.context = ssl.create_default_context(cafile=str(ca))
        self.connections = connections
        self.ready: list[tuple[str, bytes]] = []
        self.counter = 0
        self.lock = threading.Lock()

    def _names(self, count: int) -> list[str]:
        with self.lock:
            first = self.counter
            self.counter += count
        return [f"podinfo-{i:05d}" for i in range(first + 1, first + count + 1)]

    def top_up(self, wanted: int) -> None:
        missing = wanted - len(self.ready)
        if missing <= 0:
            return
        names = self._names(missing)
        chunks = [names[i :: self.connections] for i in range(self.connections)]
        with concurrent.futures.ThreadPoolExecutor(self.connections) as pool:
            for made in pool.map(self._seed_many, chunks):
                self.ready.extend(made)

    def take(self, count: int) -> list[tuple[str, bytes]]:
        taken, self.ready = self.ready[:count], self.ready[count:]
        return taken

    def give_back(self, unused: list[tuple[str, bytes]]) -> None:
        self.ready = unused + self.ready

    def _seed_many(self, names: list[str]) -> list[tuple[str, bytes]]:
        conn = http.client.HTTPSConnection(HOST, self.port, context=self.context, timeout=30)
        try:
            return [self._seed(conn, name) for name in names]
        finally:
            conn.close()

    def _seed(self, conn: http.client.HTTPSConnection, name: str) -> tuple[str, bytes]:
        import jsonpatch

        from perch.resources import DEPLOYMENTS, HPAS
        from tests.seed import IMAGE_NEW

        # The Deployment and its HPA exist, not opted in; then a user opts it in (kubectl apply).
        stored = self.kube.create(DEPLOYMENTS, NAMESPACE, deployment(name, opted_in=False))
        self.kube.create(
            HPAS,
            NAMESPACE,
            {
                "apiVersion": "autoscaling/v2",
                "kind": "HorizontalPodAutoscaler",
                "metadata": {"name": name, "namespace": NAMESPACE},
                "spec": {
                    "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
                    "minReplicas": 2,
                    "maxReplicas": 4,
                    "metrics": [
                        {
                            "type": "Resource",
                            "resource": {
                                "name": "cpu",
                                "target": {"type": "Utilization", "averageUtilization": 99},
                            },
                        }
                    ],
                },
            },
        )
        opted = copy.deepcopy(stored)
        opted["metadata"]["annotations"] = deployment(name, opted_in=True)["metadata"][
            "annotations"
        ]
        body = review_body(
            operation="UPDATE", new=as_sent(opted, revision=1), old=as_sent(stored, revision=1)
        )
        response = self._admit(conn, body)
        if not any("opted in" in w for w in response.get("warnings") or []):
            raise SystemExit(f"opting {name} in was not initialized: {response}")
        if "patch" in response:
            import base64

            opted = jsonpatch.apply_patch(opted, json.loads(base64.b64decode(response["patch"])))
        stored = self.kube.replace(DEPLOYMENTS, NAMESPACE, name, opted)

        # The request measured: a new image, i.e. a new revision, for a Deployment with no canary.
        new = copy.deepcopy(stored)
        new["spec"]["template"]["spec"]["containers"][0]["image"] = IMAGE_NEW
        new["metadata"]["generation"] = stored["metadata"].get("generation", 1) + 1
        review = review_body(
            operation="UPDATE", new=as_sent(new, revision=2), old=as_sent(stored, revision=2)
        )
        return json.loads(review)["request"]["uid"], review

    def _admit(self, conn: http.client.HTTPSConnection, body: bytes) -> dict[str, Any]:
        conn.request("POST", "/mutate", body=body, headers={"Content-Type": "application/json"})
        reply = conn.getresponse()
        data = reply.read()
        uid = json.loads(body)["request"]["uid"]
        problem = _check(reply.status, data, uid, "")
        if problem is not None:
            raise SystemExit(f"seeding the canary-spawn case failed: {problem}")
        response: dict[str, Any] = json.loads(data)["response"]
        return response


def canaries_spawned(standin: Any, names: Sequence[str]) -> int:
    from perch.names import canary_name

    with standin.emulator.lock:  # keys only: StandIn.objects() would deep-copy thousands
        stored = set(standin.emulator.store)
    return sum((("deployments", NAMESPACE, canary_name(n)) in stored) for n in names)


def forget_history(standin: Any) -> None:
    """Drop the stand-in's record of calls and changes (nothing here watches or asserts on
    them), so that its heap, and its garbage collections, do not grow round after round."""
    with standin.emulator.lock:
        standin.emulator.calls.clear()
        standin.emulator.changes.clear()


# --- the run ------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
    return {
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "wrk": (wrk.stdout or wrk.stderr).splitlines()[0].strip()
        if wrk.stdout or wrk.stderr
        else "?",
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def summarize(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    cases: dict[str, Any] = {}
    for key, label, client in CASES:
        runs = [r[key] for r in rounds if key in r]
        cases[key] = {
            "label": label,
            "client": client,
            "median": {
                metric: _median([run[metric] for run in runs])
                for metric in (
                    "p50_ms",
                    "p90_ms",
                    "p99_ms",
                    "max_ms",
                    "rps",
                    "server_cpu_ms_per_request",
                    "standin_cpu_ms_per_request",
                )
            },
            "requests": sum(run["requests"] for run in runs),
            "failures": sum(run["failures"] for run in runs),
            "rounds": runs,
        }

    def ratio(num: str, den: str, metric: str) -> float:
        return _median([r[num][metric] / r[den][metric] for r in rounds])

    ratios = {
        "pass_p99_over_floor_wrk": ratio("pass_wrk", "floor_wrk", "p99_ms"),
        "pass_p50_over_floor_wrk": ratio("pass_wrk", "floor_wrk", "p50_ms"),
        "pass_rps_over_floor_wrk": ratio("pass_wrk", "floor_wrk", "rps"),
        "pass_p99_over_floor_python": ratio("pass_py", "floor_py", "p99_ms"),
        "pass_p50_over_floor_python": ratio("pass_py", "floor_py", "p50_ms"),
        "pass_rps_over_floor_python": ratio("pass_py", "floor_py", "rps"),
        "spawn_p99_over_floor_python": ratio("spawn_py", "floor_py", "p99_ms"),
        "spawn_p50_over_floor_python": ratio("spawn_py", "floor_py", "p50_ms"),
        "spawn_rps_over_floor_python": ratio("spawn_py", "floor_py", "rps"),
        "pass_cpu_over_floor_wrk": ratio("pass_wrk", "floor_wrk", "server_cpu_ms_per_request"),
    }
    spawn_p99 = cases["spawn_py"]["median"]["p99_ms"]
    goals = {
        "pass_through_p99_ratio": {
            "goal": f"<= {GOAL_PASS_THROUGH_P99_RATIO}",
            "value": ratios["pass_p99_over_floor_wrk"],
            "met": ratios["pass_p99_over_floor_wrk"] <= GOAL_PASS_THROUGH_P99_RATIO,
        },
        "spawn_p99_ms": {
            "goal": f"<= {GOAL_SPAWN_P99_MS}",
            "value": spawn_p99,
            "met": spawn_p99 <= GOAL_SPAWN_P99_MS,
        },
    }
    return {"cases": cases, "ratios": ratios, "goals": goals}


def table(summary: dict[str, Any], connections: int) -> str:
    lines = [
        f"{'case':<28} {'client':<7} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'req/s':>8} "
        f"{'CPU ms/req':>10} {'requests':>9} {'failures':>8}",
    ]
    for key, _, _ in CASES:
        case = summary["cases"][key]
        m = case["median"]
        lines.append(
            f"{case['label']:<28} {case['client']:<7} {m['p50_ms']:>8.2f} {m['p90_ms']:>8.2f} "
            f"{m['p99_ms']:>8.2f} {m['rps']:>8.0f} {m['server_cpu_ms_per_request']:>10.2f} "
            f"{case['requests']:>9} {case['failures']:>8}"
        )
    r = summary["ratios"]
    g = summary["goals"]
    lines += [
        "",
        "CPU ms/req: CPU time of the server's processes (the canary spawn's excludes the "
        "stand-in's)",
        "",
        "ratios (median of the per-round ratios):",
        f"  pass-through / floor, wrk:    p99 {r['pass_p99_over_floor_wrk']:.2f}  "
        f"p50 {r['pass_p50_over_floor_wrk']:.2f}  req/s {r['pass_rps_over_floor_wrk']:.2f}"
        f"   (goal p99 <= {GOAL_PASS_THROUGH_P99_RATIO}: "
        f"{'met' if g['pass_through_p99_ratio']['met'] else 'NOT met'})",
        f"  pass-through / floor, wrk:    server CPU per request "
        f"{r['pass_cpu_over_floor_wrk']:.2f}",
        f"  pass-through / floor, python: p99 {r['pass_p99_over_floor_python']:.2f}  "
        f"p50 {r['pass_p50_over_floor_python']:.2f}  req/s {r['pass_rps_over_floor_python']:.2f}",
        f"  canary spawn / floor, python: p99 {r['spawn_p99_over_floor_python']:.2f}  "
        f"p50 {r['spawn_p50_over_floor_python']:.2f}  req/s {r['spawn_rps_over_floor_python']:.2f}",
        f"  canary spawn p99: {g['spawn_p99_ms']['value']:.1f} ms at {connections} connections "
        f"(goal <= {GOAL_SPAWN_P99_MS:.0f} ms: "
        f"{'met' if g['spawn_p99_ms']['met'] else 'NOT met'}); "
        f"{summary['cases']['spawn_py_c1']['median']['p99_ms']:.1f} ms at 1 connection",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Admission latency of perch-webhook against a no-op Flask app (the floor)."
    )
    parser.add_argument(
        "--duration", type=float, default=10.0, help="seconds per case and round (default 10)"
    )
    parser.add_argument(
        "--connections", type=int, default=8, help="keep-alive connections (default 8)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds, each running every case once; medians are reported",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=3.0,
        help="seconds of warm-up per server and client before measuring",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument(
        "--keep-logs",
        action="store_true",
        help="keep the servers' logs and certificates (the path is printed)",
    )
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.connections < 1 or args.rounds < 1 or args.warmup < 0:
        parser.error("--duration, --connections and --rounds must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk is not installed: `make system-packages` installs it", file=sys.stderr)
        return 2
    from tests.standin import StandIn

    started = dt.datetime.now(dt.UTC)
    python = Path(sys.executable)
    shown = python.relative_to(REPO).as_posix() if python.is_relative_to(REPO) else str(python)
    given = list(argv) if argv is not None else sys.argv[1:]
    command = " ".join([shown, "benchmarks/admission_latency.py", *given])
    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="perch-bench-"))
    servers: list[Server] = []
    log = _printer()
    try:
        certs = issue_certs(tmp / "certs")
        pass_body = pass_through_body()
        body_path = tmp / "pass-through.json"
        body_path.write_bytes(pass_body)
        pass_items = [(json.loads(pass_body)["request"]["uid"], pass_body)]
        log(f"pass-through AdmissionReview: {len(pass_body)} bytes")
        with StandIn() as standin:
            kubeconfig = standin.kubeconfig(tmp / "kubeconfig")
            floor = start_server("floor", NOOP_APP, certs, tmp)
            servers.append(floor)
            perch = start_server("perch", PERCH_APP, certs, tmp, {"KUBECONFIG": str(kubeconfig)})
            servers.append(perch)
            pool = SpawnPool(standin, perch.port, certs.ca, args.connections)

            def wrk(server: Server, duration: float) -> dict[str, Any]:
                return run_wrk(
                    server, body_path, tmp, duration=duration, connections=args.connections
                )

            def python_client(
                server: Server,
                duration: float,
                items: list[tuple[str, bytes]] = pass_items,
                expect_warning: str = "",
                connections: int = args.connections,
            ) -> dict[str, Any]:
                job = ClientJob(
                    port=server.port,
                    ca=str(certs.ca),
                    items=items,
                    cycle=items is pass_items,
                    duration=duration,
                    connections=connections,
                    expect_warning=expect_warning,
                    workers=tuple(server.workers()),
                )
                return run_client(job)

            def spawn(duration: float, connections: int) -> dict[str, Any]:
                items = pool.take(len(pool.ready))
                calls_before = len(standin.emulator.calls)
                result = measure(
                    perch,
                    lambda: python_client(perch, duration, items, SPAWN_WARNING, connections),
                )
                sent = items[: result["bodies_sent"]]
                pool.give_back(items[result["bodies_sent"] :])
                result["api_calls_per_request"] = round(
                    (len(standin.emulator.calls) - calls_before) / max(1, result["requests"]), 1
                )
                # Every answered request must have made its canary Deployment in the stand-in.
                result["canary_deployments_created"] = canaries_spawned(
                    standin, [_name_of(body) for _, body in sent]
                )
                forget_history(standin)
                return result

            def measure(server: Server, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
                """`run`, with the CPU time the server and the stand-in (this process) spent."""
                server_cpu, standin_cpu = server.cpu_seconds(), time.process_time()
                result = run()
                requests = max(1, result["requests"])
                result["server_cpu_ms_per_request"] = (
                    (server.cpu_seconds() - server_cpu) * 1000 / requests
                )
                result["standin_cpu_ms_per_request"] = (
                    (time.process_time() - standin_cpu) * 1000 / requests
                )
                return result

            # Warm-up: every server, path and client once, untimed; it also sizes the spawn pool.
            warm_failures = 0
            for server in (floor, perch):
                warm_failures += wrk(server, args.warmup)["failures"]
                warm_failures += python_client(server, args.warmup)["failures"]
            pool.top_up(max(50, args.connections * 10))
            warm = spawn(args.warmup, args.connections)
            forget_history(standin)
            warm_failures += warm["failures"]
            if warm_failures:
                log(f"warm-up had {warm_failures} failures: {warm['failure_samples']}")
            # The warm-up rate is low (cold caches): the rounds' own rates take over after one.
            spawn_rps = {"spawn_py": warm["rps"], "spawn_py_c1": warm["rps"]}

            rounds: list[dict[str, dict[str, Any]]] = []
            for index in range(args.rounds):
                # Enough opted-in Deployments that the round does not run out (it is reported).
                wanted = sum(
                    math.ceil(max(rate, 10) * args.duration * 1.3) + 20
                    for rate in spawn_rps.values()
                )
                seed_began = time.perf_counter()
                pool.top_up(wanted)
                log(
                    f"round {index + 1}/{args.rounds}: {wanted} Deployments opted in and ready "
                    f"to spawn a canary ({time.perf_counter() - seed_began:.1f}s)"
                )
                steps: list[tuple[str, Callable[[], dict[str, Any]]]] = [
                    ("floor_wrk", lambda: measure(floor, lambda: wrk(floor, args.duration))),
                    ("pass_wrk", lambda: measure(perch, lambda: wrk(perch, args.duration))),
                    (
                        "floor_py",
                        lambda: measure(floor, lambda: python_client(floor, args.duration)),
                    ),
                    (
                        "pass_py",
                        lambda: measure(perch, lambda: python_client(perch, args.duration)),
                    ),
                ]
                if index % 2:  # Perch first in every other round: drift falls on both sides
                    steps = [steps[1], steps[0], steps[3], steps[2]]
                steps.append(("spawn_py", lambda: spawn(args.duration, args.connections)))
                steps.append(("spawn_py_c1", lambda: spawn(args.duration, 1)))
                results: dict[str, dict[str, Any]] = {}
                for key, run in steps:
                    results[key] = run()
                    _log_case(log, index, key, results[key])
                for key in SPAWN_CASES:
                    if results[key]["ran_out_of_bodies"]:
                        log(
                            f"  ({key} used every prepared Deployment before the duration "
                            "ended; its req/s is over the time it ran)"
                        )
                    spawn_rps[key] = max(spawn_rps[key], results[key]["rps"])
                rounds.append(results)
            crashes = standin.crashes()
        for server in servers:
            if server.process.poll() is not None:
                raise SystemExit(f"{server.name} server died:\n{server.log_tail()}")
    finally:
        for server in servers:
            server.stop()
        if not args.keep_logs:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"logs and certificates kept in {tmp}", file=sys.stderr)

    summary = summarize(rounds)
    spawned = sum(r[k]["canary_deployments_created"] for r in rounds for k in SPAWN_CASES)
    answered = sum(r[k]["requests"] - r[k]["failures"] for r in rounds for k in SPAWN_CASES)
    failures = sum(case["failures"] for case in summary["cases"].values()) + warm_failures
    problems: list[str] = []
    if spawned < answered:
        problems.append(f"only {spawned} canary Deployments exist for {answered} spawn answers")
    if crashes:
        problems.append(f"the API stand-in crashed {len(crashes)} times: {crashes[0]!r}")
    if failures:
        problems.append(f"{failures} requests failed (warm-up included)")
    report = {
        "date": started.isoformat(timespec="seconds"),
        "command": command,
        # Other work on the machine shows here; only the ratios are comparable across runs.
        "machine": {
            **machine(),
            "loadavg_1_5_15_before": [round(x, 2) for x in load_before],
            "loadavg_1_5_15_after": [round(x, 2) for x in os.getloadavg()],
        },
        "settings": {
            "duration_s": args.duration,
            "connections": args.connections,
            "rounds": args.rounds,
            "warmup_s": args.warmup,
            "gunicorn": f"gthread, {WORKERS} workers x {THREADS} threads, TLS, keep-alive",
            "pass_through_body_bytes": len(pass_body),
        },
        **summary,
        "failures": failures,
        "problems": problems,
    }
    print()
    print(table(summary, args.connections))
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    for problem in problems:
        print(f"FAILED: {problem}", file=sys.stderr)
    return 1 if problems else 0


def _name_of(body: bytes) -> str:
    return str(json.loads(body)["request"]["name"])


def _printer() -> Callable[[str], None]:
    began = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - began:6.1f}s] {message}", file=sys.stderr, flush=True)

    return log


def _log_case(log: Callable[[str], None], index: int, key: str, result: dict[str, Any]) -> None:
    log(
        f"  round {index + 1} {key:<9} p50 {result['p50_ms']:6.2f} ms  p99 "
        f"{result['p99_ms']:6.2f} ms  {result['rps']:7.0f} req/s  {result['requests']} requests"
        f"  failures {result['failures']}  server CPU {result['server_cpu_ms_per_request']:.2f} "
        f"ms/request  connections per worker {result.get('connections_per_worker')}"
    )


if __name__ == "__main__":
    sys.exit(main())
