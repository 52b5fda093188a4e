"""perch-analyzer with 100 to 1,000 canaries progressing at once, on a real control plane.

    flock /tmp/perch-bench.lock .venv/bin/python benchmarks/analyzer_on_cluster.py \
        [--canaries 100,500,1000] [--interval 10] [--duration 60] [--namespaces 10] \
        [--step-weight 1] [--max-weight 99] [--max-active 0] [--analyzer-code DIR] \
        [--profile DIR] [--out FILE]

Real parts: etcd, kube-apiserver and kube-controller-manager v1.36 (``../shared/kube``, or
``PERCH_KUBE_ASSETS``) with their audit log; Perch installed as the cluster tier installs it (the
chart's CRDs and RBAC, a ServiceAccount token per component); ``perch-webhook`` registered by URL,
through which every canary is created; ``perch-analyzer`` as a process with the chart's analyzer
ServiceAccount (through ``analyzer_entry.py``, which adds only a SIGUSR1 dump of the scheduler's
tick lags); the kubelet stand-in (tests/support/kubelet.py) making every pod Running and Ready;
a real Prometheus scraping Istio-shaped request metrics for every canary workload
(tests/support/mesh.py's IstioExporter, in a process of its own).

Canaries: N opted-in Deployments dealt over ``--namespaces`` namespaces, each created by the API
(the webhook makes its Canary object and route) and then given a new image by a strategic-merge
PATCH of the container's image, as ``kubectl set image`` sends it (the webhook holds the template
back and starts the canary: canary Deployment, Service, Canary Progressing). The cases are
cumulative: the 500 case adds 400 to the 100 of the first, and so on; the analyzer is stopped
while canaries are added, so they progress only while a case runs. Spec: the seed's early form
without the gate and the HPA, interval ``--interval``, stepWeight ``--step-weight`` up to
``--max-weight`` (nobody finishes during the run), the two builtin metrics (30 s window),
threshold 10.

Per case a new analyzer is started on the case's namespaces; after a warm-up (every canary has
advanced once since the start, then one more interval) the window of ``--duration`` seconds is
measured:

- tick lag p50/p99/max (start minus scheduled time of every tick, from the scheduler), ticks,
  missed (started later than the misfire grace, one interval) and skipped runs;
- CPU seconds (utime + stime, /proc/PID/stat) of the analyzer, kube-apiserver, etcd,
  kube-controller-manager and Prometheus (pids from the control plane's ``*.pid`` files), and the
  analyzer's peak RSS (VmHWM);
- from the audit log (the bytes written during the window): every request of the analyzer's
  identity (``system:serviceaccount:perch:perch-analyzer``) by verb and resource, per tick and
  per canary and interval; requests of every other identity, for context;
- the weight every canary gained: the mean, and its spread (min, p10, p50, p90, max), which says
  whether the ticks that ran were shared fairly when not all of them could.

A baseline is measured in the same run first: the analyzer with no canary in its namespaces.
Ratios are against it (the machine is shared: absolute figures of different runs do not compare).

``--analyzer-code DIR`` runs the analyzer from another copy of the repository (a tree as it was
before a change), everything else from this one. ``--profile DIR`` records the analyzer with
py-spy (``--py-spy PATH``; GIL holder, 50 Hz) and the API server with its own
``/debug/pprof/profile`` during each window, and lists where their CPU goes; a profiled run's
timings are not results.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime as dt
import gzip
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for path in (str(REPO), str(HERE)):
    if path not in sys.path:
        sys.path.insert(0, path)

import analyzer_scale as scale  # noqa: E402
from kubernetes import client  # noqa: E402
from kubernetes.client.exceptions import ApiException  # noqa: E402

from perch.kube import load_api_client  # noqa: E402
from tests.seed import IMAGE_NEW  # noqa: E402
from tests.support import controlplane  # noqa: E402
from tests.support.install import Installed, install, register_webhook, wait_registered  # noqa: E402
from tests.support.kubelet import FakeKubelet  # noqa: E402
from tests.support.prometheus import PrometheusServer, missing_binaries  # noqa: E402
from tests.support.release import rolled_out  # noqa: E402
from tests.support.webhook_server import PERCH_APP, Server, start_server  # noqa: E402

HOST = "127.0.0.1"
SETUP_WORKERS = 8
SETUP_DEADLINE = 900.0
READY_DEADLINE = 600.0
WARMUP_GRACE = 30.0
SCRAPE = "5s"
METRIC_WINDOW = "30s"
GOAL_CANARIES = 1000
GOAL_LAG_P99_S = 1.0
GOAL_RSS_MB = 300.0
SMP = "application/strategic-merge-patch+json"
COMPONENTS = ("kube-apiserver", "etcd", "kube-controller-manager")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- the world --------------------------------------------------------------------------------


@dataclass
class World:
    work: Path
    session: controlplane.Session
    api: client.ApiClient
    installed: Installed
    webhook: Server
    prometheus: PrometheusServer
    exporter: scale.ExporterProcess
    kubelet: FakeKubelet | None
    pids: dict[str, int]

    @property
    def plane(self) -> controlplane.ControlPlane:
        return self.session.plane


def control_plane_pids(directory: Path) -> dict[str, int]:
    pids = {}
    for name in COMPONENTS:
        text = (directory / f"{name}.pid").read_text()
        pids[name] = int("".join(ch for ch in text if ch.isdigit()))
    return pids


@contextlib.contextmanager
def world(work: Path, flows: Sequence[tuple[str, str]]) -> Iterator[World]:
    session = controlplane.start(work / "kube")
    plane = session.plane
    if plane.directory is None:
        session.stop()
        raise RuntimeError("needs a control plane it starts itself (its pids and audit log)")
    exporter: scale.ExporterProcess | None = None
    prometheus = PrometheusServer(work / "prometheus", scrape_interval=SCRAPE)
    kubelet: FakeKubelet | None = None
    server: Server | None = None
    api = load_api_client(str(plane.kubeconfig))
    try:
        exporter = scale.ExporterProcess(flows, requests_per_tick=1, tick_seconds=1.0)
        prometheus.scrape(f"{HOST}:{exporter.port}").start()
        kubelet = FakeKubelet(api).start()
        installed = install(
            api,
            admin_kubeconfig=plane.kubeconfig,
            directory=work,
            values={"analyzer": {"mode": "deployment"}},
        )
        server = start_server(
            work / "webhook", app=PERCH_APP, env={"KUBECONFIG": str(installed.webhook.kubeconfig)}
        )
        register_webhook(
            api,
            namespace=installed.release.namespace,
            host=HOST,
            port=server.port,
            ca=server.certs.ca,
            name="zz-perch-bench.perch.dev",
        )
        wait_registered(api)
        yield World(
            work=work,
            session=session,
            api=api,
            installed=installed,
            webhook=server,
            prometheus=prometheus,
            exporter=exporter,
            kubelet=kubelet,
            pids=control_plane_pids(plane.directory),
        )
    finally:
        if server is not None:
            server.terminate()
        if kubelet is not None:
            kubelet.stop()
        prometheus.stop()
        if exporter is not None:
            exporter.stop()
        session.stop()


# --- the canaries -----------------------------------------------------------------------------


def create_canaries(
    w: World, canaries: Sequence[tuple[str, str]], spec: str, namespaces: Sequence[str]
) -> float:
    """Each Deployment created opted in, then its image PATCHed as kubectl set image does;
    returns the seconds it took until every primary and canary has rolled out."""
    started = time.monotonic()
    core = client.CoreV1Api(w.api)
    for namespace in namespaces:
        with contextlib.suppress(ApiException):
            core.create_namespace({"metadata": {"name": namespace}})
    local = threading.local()

    def one(item: tuple[str, str]) -> None:
        namespace, name = item
        if not hasattr(local, "apps"):
            local.apps = client.AppsV1Api(load_api_client(str(w.plane.kubeconfig)))
        apps: client.AppsV1Api = local.apps
        body = scale.workload(name, namespace, spec)
        body["metadata"]["annotations"].pop(
            "kubectl.kubernetes.io/last-applied-configuration", None
        )
        body.pop("status", None)
        apps.create_namespaced_deployment(namespace, body)
        patch = {
            "spec": {
                "template": {"spec": {"containers": [{"name": "podinfod", "image": IMAGE_NEW}]}}
            }
        }
        url = (
            f"{apps.api_client.configuration.host}/apis/apps/v1/namespaces/{namespace}"
            f"/deployments/{name}"
        )
        for _ in range(10):
            response = apps.api_client.call_api(
                "PATCH",
                url,
                header_params={"Content-Type": SMP, "Accept": "application/json"},
                body=patch,
                _request_timeout=60,
            )
            answer = response.read()
            if response.status == 200:
                return
            if response.status not in (409, 500, 504):
                break
            time.sleep(0.2)
        raise RuntimeError(f"set image {namespace}/{name}: HTTP {response.status} {answer[:300]!r}")

    with concurrent.futures.ThreadPoolExecutor(SETUP_WORKERS) as pool:
        for done, _ in enumerate(pool.map(one, canaries), 1):
            if done % 100 == 0:
                log(f"  {done}/{len(canaries)} released")
    wait_rolled_out(w, canaries)
    return time.monotonic() - started


def wait_rolled_out(w: World, canaries: Sequence[tuple[str, str]]) -> None:
    """Every primary and canary Deployment rolled out, each canary with its new revision."""
    apps = client.AppsV1Api(w.api)
    wanted = {(ns, n) for ns, n in canaries} | {(ns, f"{n}-canary") for ns, n in canaries}
    until = time.monotonic() + READY_DEADLINE
    while True:
        ready: set[tuple[str, str]] = set()
        for namespace in sorted({ns for ns, _ in canaries}):
            listed = w.api.sanitize_for_serialization(apps.list_namespaced_deployment(namespace))
            for dep in listed.get("items") or []:
                key = (namespace, dep["metadata"]["name"])
                if key in wanted and rolled_out(dep):
                    ready.add(key)
        if ready >= wanted:
            return
        if time.monotonic() > until:
            missing = sorted(wanted - ready)[:10]
            raise RuntimeError(f"{len(wanted - ready)} Deployments not rolled out, e.g. {missing}")
        log(f"  {len(ready)}/{len(wanted)} Deployments rolled out")
        time.sleep(5)


def canary_weights(w: World, namespaces: Sequence[str]) -> dict[tuple[str, str], dict[str, Any]]:
    custom = client.CustomObjectsApi(w.api)
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for namespace in namespaces:
        listed = custom.list_namespaced_custom_object(
            "perch.dev", "v1alpha1", namespace, "canaries"
        )
        for item in listed.get("items") or []:
            status = item.get("status") or {}
            found[(namespace, item["metadata"]["name"])] = {
                "phase": status.get("phase"),
                "weight": int(status.get("canaryWeight") or 0),
            }
    return found


# --- the analyzer -----------------------------------------------------------------------------


@dataclass
class Analyzer(scale.AnalyzerProcess):
    code: Path = REPO
    namespaces: Sequence[str] = ()

    def start(self) -> Analyzer:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PERCH_")}
        env.update(
            KUBECONFIG=str(self.kubeconfig),
            PERCH_BENCH_DUMP=str(self.dump_path),
            PYTHONPATH=str(self.code),
        )
        command = [
            sys.executable,
            str(self.code / "benchmarks" / "analyzer_entry.py"),
            "--no-leader-elect",
            "--prometheus-url",
            self.prometheus_url,
            "--metrics-bind",
            f"{HOST}:{self.port}",
            *[arg for ns in self.namespaces for arg in ("--namespace", ns)],
            *self.extra,
        ]
        with self.log_path.open("wb") as out:
            self.process = subprocess.Popen(
                command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=self.code
            )
        return self


# --- measuring --------------------------------------------------------------------------------


@dataclass
class Snapshot:
    at: float
    cpu: dict[str, float]
    machine: tuple[int, int]
    scheduler: dict[str, Any]
    audit_offset: int
    audit_inode: int

    @classmethod
    def take(cls, w: World, analyzer: Analyzer) -> Snapshot:
        scheduler = analyzer.dump()
        audit = w.plane.audit_log
        assert audit is not None
        pids = {**w.pids, "analyzer": analyzer.pid, "prometheus": prometheus_pid(w)}
        stat = audit.stat()
        return cls(
            at=time.monotonic(),
            cpu={name: scale.cpu_seconds(pid) for name, pid in pids.items()},
            machine=scale.machine_busy(),
            scheduler=scheduler,
            audit_offset=stat.st_size,
            audit_inode=stat.st_ino,
        )


def prometheus_pid(w: World) -> int:
    process = w.prometheus._process
    assert process is not None
    return process.pid


def audit_slice(
    path: Path, start: int, end: int, *, start_inode: int | None = None
) -> Iterator[dict[str, Any]]:
    """The completed requests logged between two sizes of the audit log.

    The API server starts a new log at 100 MB (its --audit-log-maxsize defaults to lumberjack's
    100), renaming the full one to audit-TIMESTAMP.log: a window that spans a rotation reads the
    old file from ``start`` (found by its inode), any between, and the new one up to ``end``."""
    pieces: list[tuple[Path, int, int | None]] = [(path, start, end)]
    if start_inode is not None and path.stat().st_ino != start_inode:
        backups = sorted(path.parent.glob("audit-*.log"), key=lambda p: p.stat().st_mtime)
        old = [i for i, p in enumerate(backups) if p.stat().st_ino == start_inode]
        first = old[0] if old else len(backups)
        pieces = [(backups[first], start, None)] if old else []
        pieces += [(p, 0, None) for p in backups[first + 1 :]]
        pieces.append((path, 0, end))
    for piece, begin, until in pieces:
        with piece.open("rb") as lines:
            lines.seek(begin)
            while until is None or lines.tell() < until:
                raw = lines.readline()
                if not raw:
                    break
                with contextlib.suppress(json.JSONDecodeError):
                    event = json.loads(raw)
                    if event.get("stage") == "ResponseComplete":
                        yield event


def call_key(event: dict[str, Any]) -> str:
    ref = event.get("objectRef") or {}
    resource = ref.get("resource") or event.get("requestURI", "?").split("?")[0]
    if ref.get("subresource"):
        resource += "/" + ref["subresource"]
    return f"{event.get('verb')} {resource}"


def count_calls(
    path: Path, start: int, end: int, analyzer_user: str, *, start_inode: int | None = None
) -> tuple[Counter[str], Counter[str]]:
    """(the analyzer's calls by "verb resource", everyone's calls by user)."""
    own: Counter[str] = Counter()
    users: Counter[str] = Counter()
    for event in audit_slice(path, start, end, start_inode=start_inode):
        user = (event.get("user") or {}).get("username", "?")
        users[user] += 1
        if user == analyzer_user:
            own[call_key(event)] += 1
    return own, users


def measure(
    w: World, analyzer: Analyzer, *, duration: float, canaries: int, interval: float
) -> dict[str, Any]:
    start = Snapshot.take(w, analyzer)
    rss: list[float] = []
    until = start.at + duration
    while (left := until - time.monotonic()) > 0:
        time.sleep(min(1.0, left))
        analyzer.check_alive()
        rss.append(scale.memory_mb(analyzer.pid)["VmRSS"])
    end = Snapshot.take(w, analyzer)
    window = end.at - start.at
    lags = end.scheduler["lags"][len(start.scheduler["lags"]) :]
    durations = end.scheduler["durations"][len(start.scheduler["durations"]) :]
    stats = {
        k: end.scheduler["stats"][k] - start.scheduler["stats"].get(k, 0)
        for k in ("ticks", "errors", "skipped", "missed")
    }
    ticks = stats["ticks"]
    expected = canaries * window / interval
    audit = w.plane.audit_log
    assert audit is not None
    own, users = count_calls(
        audit,
        start.audit_offset,
        end.audit_offset,
        w.installed.analyzer.username,
        start_inode=start.audit_inode,
    )
    cpu = {name: end.cpu[name] - start.cpu.get(name, 0.0) for name in end.cpu}
    busy = (end.machine[0] - start.machine[0]) / max(1, end.machine[1] - start.machine[1])
    memory = scale.memory_mb(analyzer.pid)
    calls = sum(own.values())
    return {
        "canaries": canaries,
        "window_seconds": round(window, 2),
        "ticks": ticks,
        "ticks_expected": round(expected),
        "tick_coverage": ticks / expected if expected else math.nan,
        "scheduler": stats,
        "jobs": end.scheduler["stats"]["jobs"],
        "lag_p50_s": scale.percentile(lags, 50),
        "lag_p99_s": scale.percentile(lags, 99),
        "lag_max_s": max(lags, default=math.nan),
        "tick_duration_p50_s": scale.percentile(durations, 50),
        "tick_duration_p99_s": scale.percentile(durations, 99),
        "cpu_seconds": {k: round(v, 3) for k, v in cpu.items()},
        "cpu_cores": {k: v / window for k, v in cpu.items()},
        "analyzer_cpu_ms_per_tick": 1000 * cpu["analyzer"] / ticks if ticks else math.nan,
        "machine_busy_share": busy,
        "analyzer_rss_mb": memory["VmRSS"],
        "analyzer_peak_rss_mb": memory["VmHWM"],
        "analyzer_window_max_rss_mb": max(rss, default=memory["VmRSS"]),
        "analyzer_calls": dict(sorted(own.items())),
        "analyzer_calls_total": calls,
        "analyzer_calls_per_tick": calls / ticks if ticks else math.nan,
        "analyzer_calls_per_canary_interval": calls / expected if expected else math.nan,
        "analyzer_calls_per_tick_by_kind": {k: v / ticks for k, v in sorted(own.items()) if ticks},
        "calls_by_user": dict(users.most_common()),
        "loadavg": scale.loadavg(),
    }


def run_case(
    w: World,
    *,
    canaries: int,
    namespaces: Sequence[str],
    interval: float,
    duration: float,
    code: Path,
    profile: Path | None,
    py_spy: str | None,
    label: str = "",
    max_active: int = 0,
) -> dict[str, Any]:
    directory = w.work / f"case-{canaries}{'-' + label if label else ''}"
    directory.mkdir(parents=True, exist_ok=True)
    analyzer = Analyzer(
        extra=("--max-active", str(max_active)) if max_active else (),
        directory=directory,
        kubeconfig=w.installed.analyzer.kubeconfig,
        prometheus_url=w.prometheus.url,
        code=code,
        namespaces=namespaces,
    ).start()
    try:
        ready_s = analyzer.wait_ready()
        before = canary_weights(w, namespaces) if canaries else {}
        if canaries:
            log(f"{canaries} canaries: analyzer ready in {ready_s:.1f}s; warming up")
            until = time.monotonic() + 3 * interval + WARMUP_GRACE
            while time.monotonic() < until:
                analyzer.check_alive()
                now = canary_weights(w, namespaces)
                behind = [k for k, v in before.items() if now.get(k, v)["weight"] <= v["weight"]]
                if not behind:
                    break
                time.sleep(interval / 2)
            else:
                log(f"  warm-up ended with {len(behind)} canaries that never advanced")
            time.sleep(interval)
        else:
            time.sleep(10)
        weights_start = canary_weights(w, namespaces) if canaries else {}
        profilers = start_profilers(
            w, analyzer, profile, py_spy, duration, f"{canaries}{'-' + label if label else ''}"
        )
        log(f"{canaries} canaries: measuring {duration:g}s")
        result = measure(w, analyzer, duration=duration, canaries=canaries, interval=interval)
        weights_end = canary_weights(w, namespaces) if canaries else {}
        if profilers:
            result["profile"] = finish_profilers(profilers)
        gained = [
            weights_end[k]["weight"] - v["weight"]
            for k, v in weights_start.items()
            if k in weights_end
        ]
        result["weight_gained_mean"] = sum(gained) / len(gained) if gained else 0.0
        # Fairness when not every tick runs: does every canary advance, or do some starve?
        ranked = sorted(gained)
        result["weight_gained_spread"] = (
            {
                "min": ranked[0],
                "p10": ranked[len(ranked) // 10],
                "p50": ranked[len(ranked) // 2],
                "p90": ranked[(len(ranked) * 9) // 10],
                "max": ranked[-1],
            }
            if ranked
            else {}
        )
        result["phases_end"] = dict(Counter(str(v["phase"]) for v in weights_end.values()))
        result["analyzer_ready_s"] = ready_s
        result["analyzer_errors_logged"] = sum(
            1
            for line in analyzer.log_tail(10**9).splitlines()
            if '"level": "ERROR"' in line or '"levelname": "ERROR"' in line or "Traceback" in line
        )
        result["interval_s"] = interval
        result["code"] = label
        return result
    finally:
        analyzer.stop()


# --- profiles ---------------------------------------------------------------------------------


def start_profilers(
    w: World,
    analyzer: Analyzer,
    profile: Path | None,
    py_spy: str | None,
    duration: float,
    canaries: str,
) -> dict[str, Any]:
    if profile is None:
        return {}
    profile.mkdir(parents=True, exist_ok=True)
    found: dict[str, Any] = {}
    spy = py_spy or shutil.which("py-spy")
    if spy:
        out = profile / f"analyzer-{canaries}.txt"
        command = [spy, "record", "--pid", str(analyzer.pid), "--duration", str(int(duration))]
        command += ["--rate", "50", "--gil", "--format", "raw", "--output", str(out)]
        with out.with_suffix(".log").open("wb") as err:
            found["analyzer"] = (
                subprocess.Popen(command, stdout=err, stderr=subprocess.STDOUT),
                out,
            )
    else:
        log("py-spy not found (--py-spy PATH): the analyzer is not profiled")
    out = profile / f"kube-apiserver-{canaries}.pb.gz"
    thread = threading.Thread(
        target=_pprof, args=(w, int(duration) - 2, out), name="pprof", daemon=True
    )
    thread.start()
    found["kube-apiserver"] = (thread, out)
    return found


def _pprof(w: World, seconds: int, out: Path) -> None:
    host = w.api.configuration.host
    response = w.api.call_api(
        "GET", f"{host}/debug/pprof/profile?seconds={seconds}", _request_timeout=seconds + 60
    )
    data = response.read()
    if response.status == 200:
        out.write_bytes(data)
    else:
        log(f"pprof: HTTP {response.status} {data[:200]!r}")


def finish_profilers(profilers: dict[str, Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    if "analyzer" in profilers:
        process, out = profilers["analyzer"]
        process.wait(timeout=120)
        if out.exists():
            summary["analyzer"] = scale.summarise_profile(out, top=25)
    thread, out = profilers["kube-apiserver"]
    thread.join(timeout=120)
    if out.exists():
        summary["kube-apiserver"] = summarise_pprof(out.read_bytes(), top=30)
    return summary


def _varint(data: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        byte = data[i]
        i += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, i
        shift += 7


def _fields(data: bytes) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of one protobuf message: enough of the format for
    pprof's profile.proto (varints, length-delimited, fixed64)."""
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(data, i)
        elif wire == 2:
            size, i = _varint(data, i)
            value, i = data[i : i + size], i + size
        elif wire == 1:
            value, i = data[i : i + 8], i + 8
        elif wire == 5:
            value, i = data[i : i + 4], i + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield number, wire, value


def _ints(wire: int, value: Any) -> list[int]:
    if wire == 0:
        return [value]
    out, i = [], 0
    while i < len(value):
        v, i = _varint(value, i)
        out.append(v)
    return out


def summarise_pprof(raw: bytes, top: int = 30) -> dict[str, Any]:
    """Self and inclusive CPU shares per Go function of a /debug/pprof/profile answer."""
    data = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    strings: list[str] = []
    functions: dict[int, int] = {}
    locations: dict[int, list[int]] = {}
    samples: list[tuple[list[int], int]] = []
    for number, _wire, value in _fields(data):
        if number == 6:
            strings.append(value.decode("utf-8", "replace"))
        elif number == 5:
            fid = name = 0
            for n, _w, v in _fields(value):
                if n == 1:
                    fid = v
                elif n == 2:
                    name = v
            functions[fid] = name
        elif number == 4:
            lid, lines = 0, []
            for n, _w, v in _fields(value):
                if n == 1:
                    lid = v
                elif n == 4:
                    for ln, _lw, lv in _fields(v):
                        if ln == 1:
                            lines.append(lv)
            locations[lid] = lines
        elif number == 2:
            stack: list[int] = []
            values: list[int] = []
            for n, w2, v in _fields(value):
                if n == 1:
                    stack += _ints(w2, v)
                elif n == 2:
                    values += _ints(w2, v)
            samples.append((stack, values[-1] if values else 0))
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for stack, value in samples:
        names = [strings[functions[f]] for loc in stack for f in locations.get(loc, [])]
        if not names:
            continue
        total += value
        own[names[0]] += value
        for name in set(names):
            inclusive[name] += value
    if not total:
        return {"samples": 0}
    return {
        "cpu_seconds": total / 1e9,
        "self": [(name, round(v / total, 4)) for name, v in own.most_common(top)],
        "inclusive": [(name, round(v / total, 4)) for name, v in inclusive.most_common(top)],
    }


# --- reporting --------------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds * 1000:.0f} ms"


def table(baseline: dict[str, Any], cases: Sequence[dict[str, Any]]) -> str:
    head = (
        "| canaries | ticks (of due) | lag p50 | lag p99 | missed | analyzer CPU, cores "
        "(ms/tick) | analyzer peak RSS MB | kube-apiserver CPU, cores (x baseline) | etcd CPU, "
        "cores (x baseline) | controller-manager CPU | analyzer calls / tick | machine busy | "
        "load avg |"
    )
    lines = [head, "|" + " --- |" * 13]

    def cores(case: dict[str, Any], name: str) -> float:
        return float(case["cpu_cores"][name])

    lines.append(
        f"| 0 (baseline) | | | | | {cores(baseline, 'analyzer'):.3f} | "
        f"{baseline['analyzer_peak_rss_mb']:.0f} | {cores(baseline, 'kube-apiserver'):.2f} | "
        f"{cores(baseline, 'etcd'):.2f} | {cores(baseline, 'kube-controller-manager'):.2f} | "
        f"| {baseline['machine_busy_share']:.0%} | {baseline['loadavg']} |"
    )
    for c in cases:
        api_x = cores(c, "kube-apiserver") / max(cores(baseline, "kube-apiserver"), 1e-3)
        etcd_x = cores(c, "etcd") / max(cores(baseline, "etcd"), 1e-3)
        lines.append(
            f"| {c['canaries']} | {c['ticks']} ({c['tick_coverage']:.0%}) "
            f"| {_ms(c['lag_p50_s'])} | {_ms(c['lag_p99_s'])} | {c['scheduler']['missed']} "
            f"| {cores(c, 'analyzer'):.2f} ({c['analyzer_cpu_ms_per_tick']:.1f}) "
            f"| {c['analyzer_peak_rss_mb']:.0f} "
            f"| {cores(c, 'kube-apiserver'):.2f} ({api_x:.1f}x) "
            f"| {cores(c, 'etcd'):.2f} ({etcd_x:.1f}x) "
            f"| {cores(c, 'kube-controller-manager'):.2f} "
            f"| {c['analyzer_calls_per_tick']:.2f} | {c['machine_busy_share']:.0%} "
            f"| {c['loadavg']} |"
        )
    return "\n".join(lines)


def calls_table(cases: Sequence[dict[str, Any]]) -> str:
    kinds = sorted({k for c in cases for k in c["analyzer_calls"]})
    lines = [
        "| analyzer calls per tick | " + " | ".join(str(c["canaries"]) for c in cases) + " |",
        "|" + " --- |" * (len(cases) + 1),
    ]
    for kind in kinds:
        cells = [
            f"{c['analyzer_calls'].get(kind, 0) / c['ticks']:.3f}" if c["ticks"] else "n/a"
            for c in cases
        ]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    lines.append(
        "| all, per tick | "
        + " | ".join(f"{c['analyzer_calls_per_tick']:.3f}" for c in cases)
        + " |"
    )
    lines.append(
        "| all, per canary and interval | "
        + " | ".join(f"{c['analyzer_calls_per_canary_interval']:.3f}" for c in cases)
        + " |"
    )
    return "\n".join(lines)


def verdicts(cases: Sequence[dict[str, Any]]) -> list[str]:
    out = []
    for c in cases:
        if c["canaries"] < GOAL_CANARIES:
            continue
        lag_ok = c["lag_p99_s"] < GOAL_LAG_P99_S
        rss_ok = c["analyzer_peak_rss_mb"] < GOAL_RSS_MB
        gets = sum(v for k, v in c["analyzer_calls"].items() if k.startswith("get "))
        out.append(
            f"{c['canaries']} canaries: tick lag p99 {c['lag_p99_s']:.2f}s "
            f"({'meets' if lag_ok else 'misses'} < {GOAL_LAG_P99_S:g}s), peak RSS "
            f"{c['analyzer_peak_rss_mb']:.0f} MB ({'meets' if rss_ok else 'misses'} < "
            f"{GOAL_RSS_MB:g} MB), GETs in the window {gets}, weight gained per canary "
            f"{c['weight_gained_mean']:.1f} (spread {c.get('weight_gained_spread') or '-'})"
        )
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])

    def counts(text: str) -> list[int]:
        values = [int(v) for v in text.split(",") if v.strip()]
        if not values or any(v <= 0 for v in values) or values != sorted(values):
            raise argparse.ArgumentTypeError(
                "an ascending comma-separated list of positive numbers"
            )
        return values

    parser.add_argument("--canaries", type=counts, default=[100, 500, 1000])
    parser.add_argument("--interval", type=float, default=10.0, help="analysis interval, seconds")
    parser.add_argument("--duration", type=float, default=60.0, help="measured window, seconds")
    parser.add_argument("--baseline-duration", type=float, default=30.0)
    parser.add_argument("--namespaces", type=int, default=10)
    parser.add_argument("--step-weight", type=int, default=1)
    parser.add_argument("--max-weight", type=int, default=99)
    parser.add_argument(
        "--max-active",
        type=int,
        default=0,
        help="the analyzer's global cap (0: none): the rest of the canaries wait in the queue",
    )
    parser.add_argument(
        "--analyzer-code",
        type=Path,
        default=REPO,
        help="the repository copy the analyzer runs from",
    )
    parser.add_argument(
        "--before-code",
        type=Path,
        default=None,
        help="another copy (the code before a change): each case runs its analyzer first, then "
        "--analyzer-code's, on the same canaries",
    )
    parser.add_argument("--profile", type=Path, default=None, help="profiles go here")
    parser.add_argument("--py-spy", default=None, help="py-spy's path (default: on PATH)")
    parser.add_argument("--keep", action="store_true", help="keep the control plane's folder")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    missing = missing_binaries() or controlplane.unavailable()
    if missing:
        print(f"analyzer_on_cluster: cannot run: {missing}", file=sys.stderr)
        return 2
    command = " ".join(
        [
            "flock /tmp/perch-bench.lock .venv/bin/python benchmarks/analyzer_on_cluster.py",
            *sys.argv[1:],
        ]
    )
    namespaces = [f"bench-{i:02d}" for i in range(args.namespaces)]
    total = max(args.canaries)
    names = [(namespaces[i % len(namespaces)], f"app-{i:04d}") for i in range(total)]
    spec = scale.spec_text(
        interval=args.interval,
        step_weight=args.step_weight,
        max_weight=args.max_weight,
        metric_interval=METRIC_WINDOW,
        threshold=10,
    )
    code = args.analyzer_code.resolve()
    codes = (
        {"after": code, "before": args.before_code.resolve()} if args.before_code else {"": code}
    )
    order = sorted(codes, key=lambda label: label != "before")  # before, then after
    results: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command,
        "machine": scale.machine(),
        "code": scale.code_version(),
        "analyzer_code": {label or "analyzer": str(path) for label, path in codes.items()},
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "loadavg_start": scale.loadavg(),
        "cases": [],
    }
    work = Path(tempfile.mkdtemp(prefix="perch-analyzer-cluster-"))
    started = time.monotonic()
    try:
        flows = [(ns, f"{name}-canary") for ns, name in names]
        with world(work, flows) as w:
            log(f"control plane up; measuring the baseline ({args.baseline_duration:g}s)")
            results["baselines"] = {
                label: run_case(
                    w,
                    canaries=0,
                    namespaces=namespaces,
                    interval=args.interval,
                    duration=args.baseline_duration,
                    code=codes[label],
                    profile=None,
                    py_spy=None,
                    label=label,
                )
                for label in order
            }
            made = 0
            for count in args.canaries:
                log(f"releasing canaries {made}..{count - 1}")
                setup = create_canaries(w, names[made:count], spec, namespaces)
                made = count
                scale.wait_for_rates(w.prometheus.url, namespaces, count, deadline=300)
                for label in order:
                    case = run_case(
                        w,
                        canaries=count,
                        namespaces=namespaces,
                        interval=args.interval,
                        duration=args.duration,
                        code=codes[label],
                        profile=args.profile,
                        py_spy=args.py_spy,
                        label=label,
                        max_active=args.max_active,
                    )
                    case["setup_seconds"] = round(setup, 1)
                    results["cases"].append(case)
                    log(
                        f"{count} canaries {label}: lag p50 {case['lag_p50_s']:.3f}s p99 "
                        f"{case['lag_p99_s']:.3f}s, {case['ticks']} ticks "
                        f"({case['tick_coverage']:.0%}), {case['analyzer_calls_per_tick']:.2f} "
                        f"calls/tick, analyzer {case['cpu_cores']['analyzer']:.2f} cores, "
                        f"apiserver {case['cpu_cores']['kube-apiserver']:.2f}, "
                        f"etcd {case['cpu_cores']['etcd']:.2f}"
                    )
    finally:
        results["loadavg_end"] = scale.loadavg()
        results["elapsed_seconds"] = round(time.monotonic() - started, 1)
        if args.out:
            args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(scale.PAGE)
    print(f"{results['date']}  {command}")
    print(f"machine: {results['machine']}  code: {results['code']}")
    print(f"analyzer from {results['analyzer_code']}")
    print(f"load average at start {results['loadavg_start']}, at end {results['loadavg_end']}")
    for label in order:
        cases = [c for c in results["cases"] if c["code"] == label]
        if label:
            print(f"\n{label} ({codes[label]}):")
        if label in results.get("baselines", {}):
            print(table(results["baselines"][label], cases))
        if cases:
            print(calls_table(cases))
        for line in verdicts(cases):
            print(line)
    for case in results["cases"]:
        for who, found in (case.get("profile") or {}).items():
            print(
                f"profile of {who}, {case['canaries']} canaries {case['code']} "
                "(share of CPU samples):"
            )
            for name, share in found.get("self", [])[:20]:
                print(f"  self {share:6.1%}  {name}")
            for name, share in found.get("inclusive", [])[:20]:
                print(f"  incl {share:6.1%}  {name}")
    print(f"elapsed {results['elapsed_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
