"""How perch-analyzer scales with the number of canaries under analysis, measured in one run.

    .venv/bin/python benchmarks/analyzer_scale.py [--canaries 100,500,1000] [--interval 10]
        [--duration 60] [--namespaces 10] [--promotion-runs 3] [--profile DIR] [--out FILE.json]

Real parts: perch-analyzer (``analyzer.__main__.main`` in a subprocess, through
``analyzer_entry.py``, which only adds a SIGUSR1 dump of the scheduler's tick lags), the real
Prometheus server scraping live Istio-style request metrics (tests/support/mesh.py's
IstioExporter, in a process of its own), the webhook's admission logic (``PerchAdmitter``)
creating every canary, and the Kubernetes API stand-in (tests/standin.py) over HTTP in a process
of its own (``analyzer_standin.py``), so that neither its CPU nor its GIL is the analyzer's.

Cases, each with a fresh stand-in, exporter and Prometheus:

- baseline: the analyzer with no canary at all (its fixed CPU and memory);
- N canaries (``--canaries``), spread over ``--namespaces`` namespaces: N opted-in Deployments
  created and updated to a new image through the admission logic, as ``kubectl set image`` would
  (Canary object in phase Progressing, canary Deployment, Service and VirtualService), all marked
  rolled out, with healthy traffic for every canary workload; analysis interval ``--interval``,
  stepWeight 1 up to a maxWeight that outlasts the run, the two builtin metrics (the seed's
  ``istio_requests_total`` and ``istio_request_duration_seconds_bucket``, 30 s window). The
  analyzer starts with all of them, takes them up, and every tick afterwards advances each by one
  point of weight (read, query, patch the route, an Event, the status). After a warm-up (every
  canary has its first weight, then one more interval) the window of ``--duration`` seconds is
  measured;
- promotion: one canary, interval 1 s, 5 steps (stepWeight 10 up to 50), healthy, with a
  Deployment controller marking rollouts done; the time from its first "Advance" event to phase
  Succeeded (from the stand-in's clock at each write) against ``interval x (steps + 2)``, the
  ticks step() needs (steps, then promote, finalise, succeed; analyzer/step.py). Repeated
  ``--promotion-runs`` times, each with a new analyzer.

Measured per case, over the window only: tick lag (actual start minus scheduled time) for every
tick, from the scheduler itself; ticks, misses and skips; calls the stand-in received; queries
Prometheus answered (its own ``prometheus_http_requests_total{handler="/api/v1/query"}``), and the
analyzer's own counters from its /metrics; CPU seconds (utime + stime from /proc) and peak RSS
(VmHWM) of the analyzer process. Ratios and increments are against the baseline of the same run:
the machine is shared and noisy, absolute times from different runs do not compare.

With ``--profile DIR`` py-spy (``pip install py-spy``) records the analyzer (GIL holder, 50 Hz)
during each window and the result lists the functions that dominate; py-spy slows the analyzer,
so a profiled run's timings are not results.

Goals (reported, not enforced): 1,000 canaries with tick lag p99 < 1 s and RSS < 300 MB;
promotion overhead < 1 s.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import copy
import datetime as dt
import hashlib
import json
import math
import multiprocessing
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: tests.*, perch, webhook
    sys.path.insert(0, str(REPO))

import jsonpatch  # noqa: E402
import requests  # noqa: E402
import yaml  # noqa: E402
from kubernetes import client  # noqa: E402
from kubernetes.client.exceptions import ApiException  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from perch.resources import Kube  # noqa: E402
from tests.seed import IMAGE_NEW, IMAGE_STABLE, admission_review, podinfo  # noqa: E402
from tests.support.mesh import DeploymentController, IstioExporter, free_port  # noqa: E402
from tests.support.prometheus import PrometheusServer, missing_binaries  # noqa: E402
from webhook.handler import PerchAdmitter  # noqa: E402

HERE = Path(__file__).resolve().parent
STANDIN_SCRIPT = HERE / "analyzer_standin.py"
ENTRY_SCRIPT = HERE / "analyzer_entry.py"
HOST = "127.0.0.1"
START_DEADLINE = 60.0
STOP_DEADLINE = 20.0
SETUP_WORKERS = 4
METRIC_WINDOW = "30s"
SCALE_SCRAPE = "5s"
# Healthy traffic for every canary workload: one request a second each keeps the exporter cheap.
SCALE_REQUESTS_PER_TICK = 1
SCALE_TRAFFIC_TICK = 1.0
PROMOTION_SCRAPE = "1s"
PROMOTION_STEP_WEIGHT = 10
PROMOTION_MAX_WEIGHT = 50
PROMOTION_STEPS = PROMOTION_MAX_WEIGHT // PROMOTION_STEP_WEIGHT
PROMOTION_TICKS = PROMOTION_STEPS + 2  # steps, then promote, finalise and succeed
PROMOTION_DEADLINE = 90.0
GOAL_CANARIES = 1000
GOAL_LAG_P99_S = 1.0
GOAL_RSS_MB = 300.0
GOAL_PROMOTION_OVERHEAD_S = 1.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE = "=" * 100


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- processes ------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process, in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak RSS) of one process, in MB."""
    found: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0]) / 1024
    return found


def machine_busy() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def stop_process(process: subprocess.Popen[Any] | None, *, sig: int = signal.SIGTERM) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout=STOP_DEADLINE)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=STOP_DEADLINE)


class StandInProcess:
    """analyzer_standin.py: the API stand-in in its own process, asked over stdin/stdout."""

    def __init__(self, directory: Path, namespaces: Sequence[str]) -> None:
        self.log_path = directory / "standin.log"
        command = [sys.executable, str(STANDIN_SCRIPT)]
        for namespace in namespaces:
            command += ["--namespace", namespace]
        with self.log_path.open("wb") as stderr:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                cwd=REPO,
                start_new_session=True,
            )
        self._lock = threading.Lock()
        self._clients: list[client.ApiClient] = []
        hello = self._read()
        self.url: str = hello["url"]
        self.pid: int = self.process.pid

    def _read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the stand-in exited:\n{self.log_path.read_text()[-3000:]}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def ask(self, command: str) -> dict[str, Any]:
        assert self.process.stdin is not None
        with self._lock:
            self.process.stdin.write(command + "\n")
            self.process.stdin.flush()
            return self._read()

    def api_client(self) -> client.ApiClient:
        configuration = client.Configuration()
        configuration.host = self.url
        api = client.ApiClient(configuration)
        self._clients.append(api)
        return api

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "current-context": "standin",
                    "clusters": [{"name": "standin", "cluster": {"server": self.url}}],
                    "users": [{"name": "standin", "user": {}}],
                    "contexts": [
                        {"name": "standin", "context": {"cluster": "standin", "user": "standin"}}
                    ],
                }
            )
        )
        return path

    def stop(self) -> None:
        for api in self._clients:
            api.close()  # type: ignore[no-untyped-call]
        if self.process.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                assert self.process.stdin is not None
                self.process.stdin.write("quit\n")
                self.process.stdin.close()
            try:
                self.process.wait(timeout=STOP_DEADLINE)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STOP_DEADLINE)


@dataclass
class AnalyzerProcess:
    """perch-analyzer (through analyzer_entry.py) against the stand-in and Prometheus."""

    directory: Path
    kubeconfig: Path
    prometheus_url: str
    extra: Sequence[str] = ()
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def dump_path(self) -> Path:
        return self.directory / f"analyzer-{self.port}.dump.json"

    @property
    def log_path(self) -> Path:
        return self.directory / f"analyzer-{self.port}.log"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def metrics_url(self) -> str:
        return f"http://{HOST}:{self.port}/metrics"

    def start(self) -> AnalyzerProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PERCH_")}
        env.update(KUBECONFIG=str(self.kubeconfig), PERCH_BENCH_DUMP=str(self.dump_path))
        command = [
            sys.executable,
            str(ENTRY_SCRIPT),
            "--no-leader-elect",
            "--prometheus-url",
            self.prometheus_url,
            "--metrics-bind",
            f"{HOST}:{self.port}",
            *self.extra,
        ]
        with self.log_path.open("wb") as out:
            self.process = subprocess.Popen(
                command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO
            )
        return self

    def check_alive(self) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(
                f"perch-analyzer exited with {self.process.returncode}:\n{self.log_tail()}"
            )

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def wait_ready(self, deadline: float = START_DEADLINE) -> float:
        """Seconds until /readyz answers 200 (the watch cache has listed everything)."""
        started = time.monotonic()
        until = started + deadline
        while time.monotonic() < until:
            self.check_alive()
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"http://{HOST}:{self.port}/readyz", timeout=2).ok:
                    return time.monotonic() - started
            time.sleep(0.1)
        raise RuntimeError(f"perch-analyzer not ready within {deadline:g}s:\n{self.log_tail()}")

    def dump(self) -> dict[str, Any]:
        """The scheduler's lags, durations and stats so far (SIGUSR1, see analyzer_entry.py)."""
        self.check_alive()
        with contextlib.suppress(FileNotFoundError):
            self.dump_path.unlink()
        os.kill(self.pid, signal.SIGUSR1)
        until = time.monotonic() + 30
        while time.monotonic() < until:
            if self.dump_path.exists():
                data: dict[str, Any] = json.loads(self.dump_path.read_text())
                if not data["schedulers"]:
                    raise RuntimeError("analyzer_entry.py saw no CanaryScheduler being built")
                scheduler: dict[str, Any] = data["schedulers"][-1]
                return scheduler
            time.sleep(0.02)
        raise RuntimeError(f"no lag dump from the analyzer within 30s:\n{self.log_tail()}")

    def scrape(self) -> tuple[dict[str, float], float, int]:
        """Every perch_analyzer_* sample of its /metrics; the scrape's seconds and bytes."""
        started = time.monotonic()
        text = requests.get(self.metrics_url, timeout=30).text
        took = time.monotonic() - started
        return own_samples(text, "perch_analyzer_"), took, len(text.encode())

    def stop(self) -> None:
        stop_process(self.process)


def own_samples(text: str, prefix: str) -> dict[str, float]:
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.startswith(prefix):
                continue
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def prometheus_queries_answered(url: str) -> float:
    """Instant queries Prometheus has answered so far, by its own metrics (all codes)."""
    text = requests.get(f"{url}/metrics", timeout=10).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (
                sample.name == "prometheus_http_requests_total"
                and sample.labels.get("handler") == "/api/v1/query"
            ):
                total += sample.value
    return total


# --- the canaries -------------------------------------------------------------------------------


def spec_text(
    *, interval: float, step_weight: int, max_weight: int, metric_interval: str, threshold: int
) -> str:
    """The seed's spec (early form, builtin metrics), without the load-test gate and the HPA."""
    return f"""\
service:
  port: 9898
canaryAnalysis:
  interval: {interval:g}s
  threshold: {threshold}
  maxWeight: {max_weight}
  stepWeight: {step_weight}
  metrics:
  - name: istio_requests_total
    threshold: 99
    interval: {metric_interval}
  - name: istio_request_duration_seconds_bucket
    threshold: 500
    interval: {metric_interval}
"""


def workload(name: str, namespace: str, spec: str) -> dict[str, Any]:
    """The seed's podinfo Deployment, renamed, as kubectl sends it to the API server."""
    dep = podinfo(namespace=namespace, uid=None, spec=spec)
    for key in ("resourceVersion", "generation"):
        dep["metadata"].pop(key, None)
    dep["metadata"]["name"] = name
    dep["metadata"]["labels"] = {"app": name}
    dep["spec"]["replicas"] = 1
    dep["spec"]["selector"] = {"matchLabels": {"app": name}}
    dep["spec"]["template"]["metadata"]["labels"] = {"app": name}
    return dep


def admit(
    admitter: PerchAdmitter, operation: str, obj: dict[str, Any], old: dict[str, Any] | None
) -> tuple[dict[str, Any] | None, str]:
    """The object as the webhook's patch leaves it (None when refused), and the message."""
    import base64

    review = admission_review(operation=operation, obj=obj, old=old, uid=str(uuid.uuid4()))
    answer = admitter.admit(review).review["response"]
    message = str((answer.get("status") or {}).get("message") or "")
    if not answer["allowed"]:
        return None, message
    if "patch" in answer:
        obj = jsonpatch.apply_patch(obj, json.loads(base64.b64decode(answer["patch"])))
    return obj, message


def create_canary(api: client.ApiClient, namespace: str, name: str, spec: str) -> None:
    """kubectl apply of an opted-in Deployment, then kubectl set image: a canary starts."""
    admitter = PerchAdmitter(Kube(api), adopt_timeout=5)
    apps = client.AppsV1Api(api)
    created, why = admit(admitter, "CREATE", workload(name, namespace, spec), None)
    if created is None:
        raise RuntimeError(f"admission refused the creation of {namespace}/{name}: {why}")
    apps.create_namespaced_deployment(namespace, created)
    for _ in range(20):
        live = api.sanitize_for_serialization(apps.read_namespaced_deployment(name, namespace))
        new = copy.deepcopy(live)
        new["spec"]["template"]["spec"]["containers"][0]["image"] = IMAGE_NEW
        admitted, why = admit(admitter, "UPDATE", new, live)
        if admitted is None:  # the adopter wrote meanwhile: as kubectl, try again
            time.sleep(0.05)
            continue
        try:
            apps.replace_namespaced_deployment(name, namespace, admitted)
            return
        except ApiException as exc:
            if exc.status != 409:
                raise
    raise RuntimeError(f"could not start a canary for {namespace}/{name}: {why}")


def mark_rolled_out(api: client.ApiClient, namespace: str) -> int:
    """What the Deployment controller and kubelet would write: every Deployment is ready."""
    apps = client.AppsV1Api(api)
    raw = api.sanitize_for_serialization(apps.list_namespaced_deployment(namespace))
    marked = 0
    for dep in raw.get("items", []):
        meta, spec = dep["metadata"], dep.get("spec", {})
        replicas = spec.get("replicas", 1)
        status = {
            "observedGeneration": meta.get("generation", 1),
            "replicas": replicas,
            "updatedReplicas": replicas,
            "readyReplicas": replicas,
            "availableReplicas": replicas,
        }
        apps.patch_namespaced_deployment_status(
            meta["name"],
            namespace,
            {"status": status},
            _content_type="application/merge-patch+json",
        )
        marked += 1
    return marked


def canary_names(count: int, namespaces: Sequence[str]) -> list[tuple[str, str]]:
    """(namespace, name) for ``count`` canaries, dealt round-robin over the namespaces."""
    return [(namespaces[i % len(namespaces)], f"app-{i:04d}") for i in range(count)]


def set_up_canaries(
    standin: StandInProcess, canaries: Sequence[tuple[str, str]], spec: str
) -> float:
    started = time.monotonic()
    local = threading.local()

    def one(item: tuple[str, str]) -> None:
        if not hasattr(local, "api"):
            local.api = standin.api_client()
        create_canary(local.api, item[0], item[1], spec)

    with concurrent.futures.ThreadPoolExecutor(SETUP_WORKERS) as pool:
        for done, _ in enumerate(pool.map(one, canaries), 1):
            if done % 250 == 0:
                log(f"  {done}/{len(canaries)} canaries started")
    api = standin.api_client()
    for namespace in sorted({ns for ns, _ in canaries}):
        mark_rolled_out(api, namespace)
    return time.monotonic() - started


def wait_for_rates(
    prometheus_url: str, namespaces: Sequence[str], expected: int, deadline: float = 120.0
) -> float:
    """Seconds until Prometheus has a rate over the metric window for every canary workload."""
    matcher = "|".join(namespaces)  # plain names: no regex or PromQL escaping needed
    query = (
        "count(sum by (destination_workload_namespace, destination_workload) "
        f'(rate(istio_requests_total{{reporter="destination",'
        f'destination_workload_namespace=~"{matcher}"}}[{METRIC_WINDOW}])))'
    )
    started = time.monotonic()
    seen, last = 0, ""
    while time.monotonic() < started + deadline:
        answer: Any = None
        try:
            answer = requests.get(
                f"{prometheus_url}/api/v1/query", params={"query": query}, timeout=10
            ).json()
            result = answer["data"]["result"]
            seen = int(float(result[0]["value"][1])) if result else 0
            if seen >= expected:
                return time.monotonic() - started
            last = str(answer)[:300]
        except (requests.RequestException, KeyError, IndexError, ValueError) as exc:
            last = f"{exc!r} {str(answer)[:300]}"
        time.sleep(0.5)
    raise RuntimeError(
        f"Prometheus has rates for {seen} of {expected} workloads after {deadline:g}s; "
        f"last answer {last}; targets: {scrape_health(prometheus_url)}"
    )


def _exporter_main(
    conn: Any, flows: Sequence[tuple[str, str]], requests_per_tick: int, tick_seconds: float
) -> None:
    exporter = IstioExporter(requests_per_tick=requests_per_tick, tick_seconds=tick_seconds)
    for namespace, name in flows:
        exporter.set(namespace, name)
    exporter.start()
    conn.send((exporter.port, os.getpid()))
    with contextlib.suppress(EOFError):
        conn.recv()  # until told to stop, or the parent is gone
    exporter.stop()


class ExporterProcess:
    """IstioExporter with healthy traffic for ``flows`` (namespace, workload), in its own process:
    its scrape (19 series per workload) must not wait for the benchmark's GIL, nor take the
    analyzer's."""

    def __init__(
        self, flows: Sequence[tuple[str, str]], *, requests_per_tick: int, tick_seconds: float
    ) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self.process = context.Process(
            target=_exporter_main,
            args=(child, list(flows), requests_per_tick, tick_seconds),
            daemon=True,
        )
        self.process.start()
        if not self._conn.poll(START_DEADLINE):
            self.stop()
            raise RuntimeError("the exporter process did not start")
        self.port, self.pid = self._conn.recv()

    def stop(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._conn.send(None)
        self.process.join(STOP_DEADLINE)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(STOP_DEADLINE)


@contextlib.contextmanager
def world(
    directory: Path,
    namespaces: Sequence[str],
    flows: Sequence[tuple[str, str]],
    *,
    scrape_interval: str,
    requests_per_tick: int,
    tick_seconds: float,
) -> Iterator[tuple[StandInProcess, PrometheusServer]]:
    """A stand-in, an exporter with ``flows`` and a Prometheus scraping it; all stopped after."""
    directory.mkdir(parents=True, exist_ok=True)
    standin = StandInProcess(directory, namespaces)
    traffic: ExporterProcess | None = None
    prometheus = PrometheusServer(directory / "prometheus", scrape_interval=scrape_interval)
    try:
        traffic = ExporterProcess(
            flows, requests_per_tick=requests_per_tick, tick_seconds=tick_seconds
        )
        prometheus.scrape(f"{HOST}:{traffic.port}").start()
        yield standin, prometheus
    finally:
        prometheus.stop()
        if traffic is not None:
            traffic.stop()
        standin.stop()


def scrape_health(prometheus_url: str) -> list[dict[str, Any]]:
    """Prometheus's view of its scrape targets: health, last error, last scrape's seconds."""
    with contextlib.suppress(requests.RequestException, KeyError, ValueError):
        targets = requests.get(f"{prometheus_url}/api/v1/targets", timeout=10).json()
        return [
            {k: t.get(k) for k in ("scrapeUrl", "health", "lastError", "lastScrapeDuration")}
            for t in targets["data"]["activeTargets"]
        ]
    return []


# --- measuring ------------------------------------------------------------------------------------


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def counter_deltas(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    """Increase of every counter sample (``..._total``, histogram ``_count``/``_sum``)."""
    counters = ("_total{", "_count{", "_sum{")
    return {
        k: v - before.get(k, 0.0)
        for k, v in after.items()
        if any(c in k for c in counters) and v - before.get(k, 0.0)
    }


def gauges(samples: dict[str, float]) -> dict[str, float]:
    """The other samples (gauges, quantiles, buckets) as they were at the end."""
    counters = ("_total{", "_count{", "_sum{", "_created{")
    return {k: v for k, v in samples.items() if not any(c in k for c in counters)}


@dataclass
class Snapshot:
    at: float
    cpu: float
    standin_cpu: float
    prometheus_cpu: float
    machine: tuple[int, int]
    scheduler: dict[str, Any]
    calls: dict[str, int]
    queries: float
    metrics: dict[str, float]
    scrape_seconds: float
    scrape_bytes: int

    @classmethod
    def take(
        cls, analyzer: AnalyzerProcess, standin: StandInProcess, prometheus: PrometheusServer
    ) -> Snapshot:
        scheduler = analyzer.dump()
        metrics, took, size = analyzer.scrape()
        assert prometheus._process is not None
        return cls(
            at=time.monotonic(),
            cpu=cpu_seconds(analyzer.pid),
            standin_cpu=cpu_seconds(standin.pid),
            prometheus_cpu=cpu_seconds(prometheus._process.pid),
            machine=machine_busy(),
            scheduler=scheduler,
            calls=standin.ask("calls")["calls"],
            queries=prometheus_queries_answered(prometheus.url),
            metrics=metrics,
            scrape_seconds=took,
            scrape_bytes=size,
        )


def measure(
    analyzer: AnalyzerProcess,
    standin: StandInProcess,
    prometheus: PrometheusServer,
    duration: float,
) -> dict[str, Any]:
    """Everything about the analyzer over the next ``duration`` seconds."""
    start = Snapshot.take(analyzer, standin, prometheus)
    rss_samples: list[float] = []
    until = start.at + duration
    while (left := until - time.monotonic()) > 0:
        time.sleep(min(1.0, left))
        analyzer.check_alive()
        rss_samples.append(memory_mb(analyzer.pid)["VmRSS"])
    end = Snapshot.take(analyzer, standin, prometheus)
    window = end.at - start.at
    lags = end.scheduler["lags"][len(start.scheduler["lags"]) :]
    durations = end.scheduler["durations"][len(start.scheduler["durations"]) :]
    stats = {
        k: end.scheduler["stats"][k] - start.scheduler["stats"].get(k, 0)
        for k in ("ticks", "errors", "skipped", "missed")
    }
    stats["jobs"] = end.scheduler["stats"]["jobs"]
    calls = {k: v - start.calls.get(k, 0) for k, v in end.calls.items()}
    calls = {k: v for k, v in sorted(calls.items()) if v}
    busy = (end.machine[0] - start.machine[0]) / max(1, end.machine[1] - start.machine[1])
    memory = memory_mb(analyzer.pid)
    ticks = stats["ticks"]
    own = counter_deltas(end.metrics, start.metrics)
    own_queries = sum(v for k, v in own.items() if "prometheus_queries" in k)
    return {
        "window_seconds": round(window, 2),
        "ticks": ticks,
        "scheduler": stats,
        "lag_p50_s": percentile(lags, 50),
        "lag_p99_s": percentile(lags, 99),
        "lag_max_s": max(lags, default=math.nan),
        "tick_duration_p50_s": percentile(durations, 50),
        "tick_duration_p99_s": percentile(durations, 99),
        "api_calls": calls,
        "api_calls_total": sum(calls.values()),
        "api_calls_per_tick": sum(calls.values()) / ticks if ticks else math.nan,
        "prometheus_queries": end.queries - start.queries,
        "prometheus_queries_per_tick": (end.queries - start.queries) / ticks if ticks else math.nan,
        "analyzer_metrics_delta": own,
        "analyzer_metrics_end": gauges(end.metrics),
        "analyzer_reported_queries": own_queries,
        "cpu_seconds": round(end.cpu - start.cpu, 3),
        "cpu_cores": (end.cpu - start.cpu) / window,
        "cpu_ms_per_tick": 1000 * (end.cpu - start.cpu) / ticks if ticks else math.nan,
        "standin_cpu_cores": (end.standin_cpu - start.standin_cpu) / window,
        "prometheus_cpu_cores": (end.prometheus_cpu - start.prometheus_cpu) / window,
        "machine_busy_share": busy,
        "rss_mb": memory["VmRSS"],
        "rss_window_max_mb": max(rss_samples, default=memory["VmRSS"]),
        "peak_rss_mb": memory["VmHWM"],
        "metrics_scrape_seconds": end.scrape_seconds,
        "metrics_scrape_bytes": end.scrape_bytes,
        "loadavg": loadavg(),
    }


# --- py-spy ---------------------------------------------------------------------------------------


def start_profile(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes] | None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        log("py-spy not found (.venv/bin/pip install py-spy): not profiling")
        return None
    command = [spy, "record", "--pid", str(pid), "--duration", str(math.ceil(seconds))]
    command += ["--rate", "50", "--gil", "--format", "raw", "--output", str(out)]
    with out.with_suffix(".log").open("wb") as err:
        return subprocess.Popen(command, stdout=err, stderr=subprocess.STDOUT)


_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _frame_name(frame: str) -> str:
    found = _FRAME.match(frame.strip())
    if not found:
        return frame.strip()
    path = found["file"]
    for marker in ("/site-packages/", str(REPO) + "/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{path}:{found['function']}"


def summarise_profile(path: Path, top: int = 20) -> dict[str, Any]:
    """Self and inclusive shares per function from py-spy's collapsed ("raw") stacks."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_name(f) for f in stack.split(";")]
        total += count
        own[frames[-1]] += count
        for name in set(frames):
            if name.startswith(("analyzer/", "perch/")):  # Perch's own code, inclusive
                inclusive[name] += count
    if not total:
        return {"samples": 0}

    def share(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(name, round(n / total, 3)) for name, n in counter.most_common(top)]

    return {"samples": total, "self": share(own), "inclusive": share(inclusive)}


# --- the cases ------------------------------------------------------------------------------------


def start_analyzer(
    directory: Path, standin: StandInProcess, prometheus: PrometheusServer
) -> AnalyzerProcess:
    kubeconfig = standin.kubeconfig(directory / f"kubeconfig-{uuid.uuid4().hex[:6]}")
    return AnalyzerProcess(directory, kubeconfig, prometheus.url).start()


def run_baseline(directory: Path, namespaces: Sequence[str], duration: float) -> dict[str, Any]:
    log(f"baseline: the analyzer with no canary, {duration:g}s")
    with world(
        directory,
        namespaces,
        [],
        scrape_interval=SCALE_SCRAPE,
        requests_per_tick=SCALE_REQUESTS_PER_TICK,
        tick_seconds=SCALE_TRAFFIC_TICK,
    ) as (standin, prometheus):
        analyzer = start_analyzer(directory, standin, prometheus)
        try:
            ready = analyzer.wait_ready()
            time.sleep(2)
            result = measure(analyzer, standin, prometheus, duration)
        finally:
            analyzer.stop()
    result["ready_seconds"] = ready
    log(
        f"baseline: {result['cpu_cores'] * 1000:.1f} ms CPU/s, RSS {result['rss_mb']:.1f} MB, "
        f"peak {result['peak_rss_mb']:.1f} MB"
    )
    return result


def run_scale(
    directory: Path,
    count: int,
    *,
    namespaces: Sequence[str],
    interval: float,
    duration: float,
    profile: Path | None,
) -> dict[str, Any]:
    # Bounded: an analyzer that cannot keep up never gets there, and is measured as it is.
    warmup_deadline = 2 * interval + 30
    # Every canary must still be progressing at the end of the window: one point per tick.
    needed = math.ceil((warmup_deadline + duration) / interval) + 5
    max_weight = max(50, min(100, needed))
    spec = spec_text(
        interval=interval,
        step_weight=1,
        max_weight=max_weight,
        metric_interval=METRIC_WINDOW,
        threshold=10,
    )
    canaries = canary_names(count, namespaces)
    log(f"{count} canaries: setting up (interval {interval:g}s, maxWeight {max_weight})")
    flows = [(namespace, f"{name}-canary") for namespace, name in canaries]
    with world(
        directory,
        namespaces,
        flows,
        scrape_interval=SCALE_SCRAPE,
        requests_per_tick=SCALE_REQUESTS_PER_TICK,
        tick_seconds=SCALE_TRAFFIC_TICK,
    ) as (standin, prometheus):
        setup = set_up_canaries(standin, canaries, spec)
        rates = wait_for_rates(prometheus.url, namespaces, count)
        log(f"{count} canaries: set up in {setup:.1f}s; Prometheus has rates ({rates:.1f}s)")
        summary = standin.ask("canaries")
        if summary["phases"] != {"Progressing": count}:
            raise RuntimeError(f"canaries not all Progressing before the analyzer: {summary}")
        analyzer = start_analyzer(directory, standin, prometheus)
        spy: subprocess.Popen[bytes] | None = None
        try:
            ready = analyzer.wait_ready()
            started = time.monotonic()
            while time.monotonic() < started + warmup_deadline:
                analyzer.check_alive()
                summary = standin.ask("canaries")
                if summary["with_weight"] >= count:
                    break
                time.sleep(1)
            taken_up = time.monotonic() - started
            log(
                f"{count} canaries: analyzer ready in {ready:.1f}s, {summary['with_weight']} "
                f"with a weight after {taken_up:.1f}s; one more interval, then {duration:g}s"
            )
            time.sleep(interval)
            before = standin.ask("canaries")
            if profile is not None:
                profile.mkdir(parents=True, exist_ok=True)
                spy = start_profile(analyzer.pid, duration, profile / f"analyzer-{count}.txt")
            result = measure(analyzer, standin, prometheus, duration)
            after = standin.ask("canaries")
            if spy is not None:
                spy.wait(timeout=60)
                result["profile"] = summarise_profile(profile / f"analyzer-{count}.txt")  # type: ignore[operator]
            crashes = standin.ask("crashes")["crashes"]
        finally:
            stop_process(spy, sig=signal.SIGINT)
            analyzer.stop()
        errors = analyzer.log_tail(10**9).count('"level": "error"')
    expected = count * result["window_seconds"] / interval
    result.update(
        canaries=count,
        interval_s=interval,
        max_weight=max_weight,
        setup_seconds=round(setup, 1),
        ready_seconds=round(ready, 2),
        warmup_seconds=round(taken_up, 1),
        warmup_complete=summary["with_weight"] >= count,
        expected_ticks=round(expected),
        tick_coverage=result["ticks"] / expected if expected else math.nan,
        canaries_before=before,
        canaries_after=after,
        weight_gained_mean=after["weight_mean"] - before["weight_mean"],
        standin_crashes=crashes,
        analyzer_error_log_lines=errors,
        profiled=profile is not None,
    )
    log(
        f"{count} canaries: lag p50 {result['lag_p50_s']:.3f}s p99 {result['lag_p99_s']:.3f}s, "
        f"{result['ticks']} ticks ({result['tick_coverage']:.0%}), "
        f"{result['api_calls_per_tick']:.2f} API calls/tick, "
        f"{result['prometheus_queries_per_tick']:.3f} queries/tick, "
        f"CPU {result['cpu_cores']:.2f} cores, peak RSS {result['peak_rss_mb']:.0f} MB"
    )
    return result


def run_promotion(directory: Path, runs: int) -> dict[str, Any]:
    namespaces = [f"promo-{i}" for i in range(runs)]
    spec = spec_text(
        interval=1,
        step_weight=PROMOTION_STEP_WEIGHT,
        max_weight=PROMOTION_MAX_WEIGHT,
        metric_interval="10s",
        threshold=5,
    )
    results: list[dict[str, Any]] = []
    flows = [(namespace, "app-canary") for namespace in namespaces]
    # The flow test's traffic: 20 requests every 0.1 s.
    with world(
        directory,
        namespaces,
        flows,
        scrape_interval=PROMOTION_SCRAPE,
        requests_per_tick=20,
        tick_seconds=0.1,
    ) as (standin, prometheus):
        for namespace in namespaces:
            log(f"promotion {namespace}: one canary, interval 1s, {PROMOTION_STEPS} steps")
            api = standin.api_client()
            controller = DeploymentController(api, namespace).start()
            analyzer: AnalyzerProcess | None = None
            try:
                create_canary(api, namespace, "app", spec)
                wait_for_rates(prometheus.url, [namespace], 1)
                analyzer = start_analyzer(directory, standin, prometheus)
                analyzer.wait_ready()
                until = time.monotonic() + PROMOTION_DEADLINE
                while time.monotonic() < until:
                    analyzer.check_alive()
                    timeline = [e for e in standin.ask("timeline")["timeline"] if e[3] == namespace]
                    if any(e[1] == "canaries" and e[5] == "Succeeded" for e in timeline):
                        break
                    time.sleep(0.2)
                else:
                    raise RuntimeError(f"no promotion within {PROMOTION_DEADLINE:g}s")
                scheduler = analyzer.dump()
            finally:
                if analyzer is not None:
                    analyzer.stop()
                controller.stop()
            canary = client.CustomObjectsApi(api).get_namespaced_custom_object(
                "perch.dev", "v1alpha1", namespace, "canaries", "app"
            )
            results.append(promotion_result(timeline, scheduler, analyzer.log_tail(10**9)))
            # A correctness check on the way: the saved last-good template must be the old one.
            stable = (canary.get("spec") or {}).get("stableTemplate") or {}
            images = [c.get("image") for c in (stable.get("spec") or {}).get("containers") or []]
            results[-1]["stable_template_images"] = images
            results[-1]["stable_template_is_old"] = images == [IMAGE_STABLE]
            log(
                f"promotion {namespace}: {results[-1]['advance_to_succeeded_s']:.2f}s from the "
                f"first Advance to Succeeded, overhead {results[-1]['overhead_s']:.2f}s"
            )
    overheads = [r["overhead_s"] for r in results]
    return {
        "interval_s": 1,
        "steps": PROMOTION_STEPS,
        "ideal_s": PROMOTION_TICKS * 1.0,
        "runs": results,
        "overhead_median_s": sorted(overheads)[len(overheads) // 2],
        "overhead_max_s": max(overheads),
    }


def promotion_result(
    timeline: list[list[Any]], scheduler: dict[str, Any], analyzer_log: str
) -> dict[str, Any]:
    advances = [e for e in timeline if e[1] == "events" and str(e[7]).startswith("Advance")]
    done = [e for e in timeline if e[1] == "canaries" and e[5] == "Succeeded"]
    first, last = advances[0][0], done[0][0]
    writes = [
        {"t": round(e[0] - first, 3), "phase": e[5], "weight": e[6]}
        for e in timeline
        if e[1] == "canaries" and e[2] == "MODIFIED"
    ]
    elapsed = last - first
    return {
        "advance_to_succeeded_s": round(elapsed, 3),
        "overhead_s": round(elapsed - PROMOTION_TICKS * 1.0, 3),
        "status_writes": writes,
        "events": [f"{e[0] - first:+.3f}s {e[7]}" for e in timeline if e[1] == "events"],
        "lag_p50_s": percentile(scheduler["lags"], 50),
        "lag_max_s": max(scheduler["lags"], default=math.nan),
        "tick_duration_max_s": max(scheduler["durations"], default=math.nan),
        "scheduler": scheduler["stats"],
        "conflicts_logged": analyzer_log.count("changed during the tick"),
    }


# --- reporting ------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "memory_gb": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1),
        "prometheus": _first_line(["prometheus", "--version"]),
    }


def _first_line(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    return (done.stdout or done.stderr or "?").splitlines()[0].strip()


def code_version() -> dict[str, Any]:
    """The commit, and whether the analyzer's files differ from it (others edit them too)."""
    head = _first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--", "analyzer", "perch"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split("\n")
    digest = hashlib.sha256()
    for path in sorted((REPO / "analyzer").rglob("*.py")):
        digest.update(path.read_bytes())
    return {
        "commit": head,
        "modified": [line[3:] for line in dirty if line.strip()],
        "analyzer_sha256": digest.hexdigest()[:12],
    }


def _ms(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds * 1000:.0f} ms"


def table(baseline: dict[str, Any], cases: Sequence[dict[str, Any]]) -> str:
    head = (
        "| canaries | ticks (of expected) | lag p50 | lag p99 | lag max | missed | API calls "
        "/ tick | Prom queries / tick | CPU cores (+ over baseline) | CPU ms / tick | peak RSS MB "
        "(+ over baseline) | stand-in CPU | machine busy |"
    )
    lines = [head, "|" + " --- |" * 13]
    lines.append(
        f"| 0 (baseline) | {baseline['ticks']} | | | | | | | {baseline['cpu_cores']:.3f} "
        f"| | {baseline['peak_rss_mb']:.0f} | {baseline['standin_cpu_cores']:.2f} "
        f"| {baseline['machine_busy_share']:.0%} |"
    )
    for c in cases:
        lines.append(
            f"| {c['canaries']} | {c['ticks']} ({c['tick_coverage']:.0%}) "
            f"| {_ms(c['lag_p50_s'])} | {_ms(c['lag_p99_s'])} | {_ms(c['lag_max_s'])} "
            f"| {c['scheduler']['missed']} | {c['api_calls_per_tick']:.2f} "
            f"| {c['prometheus_queries_per_tick']:.3f} "
            f"| {c['cpu_cores']:.2f} (+{c['cpu_cores'] - baseline['cpu_cores']:.2f}) "
            f"| {c['cpu_ms_per_tick']:.1f} "
            f"| {c['peak_rss_mb']:.0f} (+{c['peak_rss_mb'] - baseline['peak_rss_mb']:.0f}) "
            f"| {c['standin_cpu_cores']:.2f} | {c['machine_busy_share']:.0%} |"
        )
    return "\n".join(lines)


def against_baseline(baseline: dict[str, Any], case: dict[str, Any]) -> None:
    """Increments over the no-canary analyzer of the same run."""
    case["rss_increment_mb"] = case["peak_rss_mb"] - baseline["peak_rss_mb"]
    case["rss_kb_per_canary"] = case["rss_increment_mb"] * 1024 / case["canaries"]
    case["rss_ratio"] = case["peak_rss_mb"] / baseline["peak_rss_mb"]
    case["cpu_increment_cores"] = case["cpu_cores"] - baseline["cpu_cores"]
    extra = case["cpu_seconds"] - baseline["cpu_cores"] * case["window_seconds"]
    case["cpu_increment_ms_per_tick"] = 1000 * extra / case["ticks"] if case["ticks"] else math.nan


def verdicts(cases: Sequence[dict[str, Any]], promotion: dict[str, Any] | None) -> list[str]:
    out = []
    goal = [c for c in cases if c["canaries"] >= GOAL_CANARIES]
    if goal:
        c = goal[0]
        lag_ok = c["lag_p99_s"] < GOAL_LAG_P99_S
        rss_ok = c["peak_rss_mb"] < GOAL_RSS_MB
        out.append(
            f"{c['canaries']} canaries: tick lag p99 {c['lag_p99_s']:.2f}s "
            f"({'meets' if lag_ok else 'misses'} < {GOAL_LAG_P99_S:g}s), peak RSS "
            f"{c['peak_rss_mb']:.0f} MB ({'meets' if rss_ok else 'misses'} < {GOAL_RSS_MB:g} MB)"
        )
    if promotion is not None:
        ok = promotion["overhead_max_s"] < GOAL_PROMOTION_OVERHEAD_S
        out.append(
            f"promotion overhead: median {promotion['overhead_median_s']:.2f}s, max "
            f"{promotion['overhead_max_s']:.2f}s ({'meets' if ok else 'misses'} < "
            f"{GOAL_PROMOTION_OVERHEAD_S:g}s)"
        )
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])

    def counts(text: str) -> list[int]:
        values = [int(v) for v in text.split(",") if v.strip()]
        if not values or any(v <= 0 for v in values):
            raise argparse.ArgumentTypeError("a comma-separated list of positive numbers")
        return values

    parser.add_argument("--canaries", type=counts, default=[100, 500, 1000])
    parser.add_argument("--interval", type=float, default=10.0, help="analysis interval, seconds")
    parser.add_argument("--duration", type=float, default=60.0, help="measured window, seconds")
    parser.add_argument("--namespaces", type=int, default=10)
    parser.add_argument("--baseline-duration", type=float, default=None, help="default: duration")
    parser.add_argument("--promotion-runs", type=int, default=3, help="0 skips the promotion")
    parser.add_argument("--profile", type=Path, default=None, help="py-spy output directory")
    parser.add_argument("--keep", action="store_true", help="keep the logs and data directory")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args(argv)
    if args.interval < 1:
        parser.error("--interval must be at least 1 (the spec's minimum)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    missing = missing_binaries()
    if missing:
        print(f"analyzer_scale: cannot run: {missing}", file=sys.stderr)
        return 2
    command = " ".join([".venv/bin/python", "benchmarks/analyzer_scale.py", *sys.argv[1:]])
    namespaces = [f"bench-{i:02d}" for i in range(args.namespaces)]
    tmp = Path(tempfile.mkdtemp(prefix="perch-analyzer-scale-"))
    results: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command,
        "machine": machine(),
        "code": code_version(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "loadavg_start": loadavg(),
    }
    started = time.monotonic()
    try:
        baseline_duration = args.baseline_duration or min(args.duration, 30.0)
        results["baseline"] = run_baseline(tmp / "baseline", namespaces, baseline_duration)
        cases = []
        for count in args.canaries:
            cases.append(
                run_scale(
                    tmp / f"n{count}",
                    count,
                    namespaces=namespaces,
                    interval=args.interval,
                    duration=args.duration,
                    profile=args.profile,
                )
            )
            against_baseline(results["baseline"], cases[-1])
            results["cases"] = cases
        promotion = (
            run_promotion(tmp / "promotion", args.promotion_runs) if args.promotion_runs else None
        )
        results["promotion"] = promotion
    finally:
        results["loadavg_end"] = loadavg()
        results["elapsed_seconds"] = round(time.monotonic() - started, 1)
        if args.out:
            args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
        if args.keep:
            log(f"logs and data kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(PAGE)
    print(f"{results['date']}  {command}")
    print(f"machine: {results['machine']}  code: {results['code']}")
    print(table(results["baseline"], results["cases"]))
    for line in verdicts(results["cases"], results["promotion"]):
        print(line)
    for c in results["cases"]:
        per_tick = ", ".join(
            f"{k} {v / c['ticks']:.2f}" for k, v in c["api_calls"].items() if c["ticks"]
        )
        print(
            f"{c['canaries']} canaries: API calls per tick: {per_tick}; queries counted by the "
            f"analyzer {c['analyzer_reported_queries']:.0f}, by Prometheus "
            f"{c['prometheus_queries']:.0f}; weight gained {c['weight_gained_mean']:.1f} per "
            f"canary (of {c['window_seconds'] / c['interval_s']:.1f} intervals); skipped "
            f"{c['scheduler']['skipped']}; tick p99 {_ms(c['tick_duration_p99_s'])}; /metrics "
            f"{c['metrics_scrape_bytes'] / 1e6:.2f} MB in {c['metrics_scrape_seconds']:.2f}s; "
            f"peak RSS +{c['rss_kb_per_canary']:.0f} KB per canary"
        )
    if results["promotion"]:
        for run in results["promotion"]["runs"]:
            print(
                f"promotion: {run['advance_to_succeeded_s']:.2f}s from the first Advance to "
                f"Succeeded (ideal {results['promotion']['ideal_s']:g}s), overhead "
                f"{run['overhead_s']:.2f}s; status conflicts {run['conflicts_logged']}; saved "
                f"stable template {run['stable_template_images']} "
                f"({'old, right' if run['stable_template_is_old'] else 'NOT the old one'})"
            )
    for case in results["cases"]:
        if "profile" in case:
            print(f"profile, {case['canaries']} canaries (GIL holder, share of samples):")
            for name, share in case["profile"].get("self", []):
                print(f"  self {share:6.1%}  {name}")
            for name, share in case["profile"].get("inclusive", []):
                print(f"  incl {share:6.1%}  {name}")
    print(f"elapsed {results['elapsed_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
