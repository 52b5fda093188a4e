"""Admission latency through a real kube-apiserver, with Perch registered and without.

    .venv/bin/python benchmarks/admission_on_cluster.py [--rounds 3] [--requests 400] \
        [--spawns 32] [--out FILE.json]

A real control plane (../shared/kube, or PERCH_KUBE_ASSETS), Perch installed as the cluster tier
installs it (the chart's CRDs and RBAC, the webhook's ServiceAccount token), ``perch-webhook``
(gunicorn, 2 workers x 4 threads, TLS) registered by URL with the chart's matchConditions. The
client sends Deployment PATCHes as kubectl does (``application/strategic-merge-patch+json``, one
keep-alive connection per client thread, admin credentials) and times each from the first byte
sent to the last byte of the answer. No kubelet runs: pods stay Pending, which changes nothing
admission does.

The cases, each run with Perch registered and, in the same round, without it (the
MutatingWebhookConfiguration deleted, and its absence confirmed by a dry-run), on the same objects:

- (a) not opted in: a Deployment without ``perch.dev/enabled``; the patch alternates its replicas
  and a label. The API server must make no call to Perch: the webhook's own request counter
  (``perch_webhook_requests_total``) is read before and after and must not move;
- (b) opted-in pass-through: the seed Deployment (opted in, Canary Initialized); the patch
  alternates replicas and a label, the template unchanged. matchConditions keep these away from
  Perch too, which the counter checks;
- (c) canary spawn: a new image (``kubectl set image``) on an opted-in Deployment that has never
  been released (Canary Initialized, its HPA present): with Perch, the primary keeps its template
  and Perch writes the Canary object, creates the canary Deployment and its HPA; without, the
  Deployment just takes the image. One client (``spawn x1``) and eight at once (``spawn x8``),
  each request on a Deployment of its own.

Rounds alternate which side goes first. Reported: p50/p90/p99 per case and side, the difference
Perch makes (p50 and p99, with minus without, median over rounds), the webhook's calls per case,
and for the spawns the webhook's own time per request (its duration histogram).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import urllib3  # noqa: E402
from kubernetes import client  # noqa: E402
from kubernetes.client.exceptions import ApiException  # noqa: E402

from perch.kube import load_api_client  # noqa: E402
from tests.seed import IMAGE_NEW, SEED_SPEC_CURRENT, podinfo  # noqa: E402
from tests.support import controlplane  # noqa: E402
from tests.support.install import install  # noqa: E402
from tests.support.webhook_server import PERCH_APP, Server, start_server  # noqa: E402
from webhook.registration import registration  # noqa: E402

NAMESPACE = "bench"
CONFIGURATION = "zz-perch-bench.perch.dev"
SMP = "application/strategic-merge-patch+json"
CONCURRENCY = 8


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = q / 100 * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


class Client:
    """PATCHes as kubectl sends them, on one keep-alive connection per thread."""

    def __init__(self, api: client.ApiClient) -> None:
        conf = api.configuration
        parts = urllib3.util.parse_url(conf.host)
        self._pool = urllib3.HTTPSConnectionPool(
            parts.host,
            port=parts.port,
            maxsize=CONCURRENCY * 2,
            cert_file=conf.cert_file,
            key_file=conf.key_file,
            ca_certs=conf.ssl_ca_cert,
            cert_reqs="CERT_REQUIRED",
            retries=False,
            timeout=urllib3.Timeout(connect=10, read=30),
        )

    def patch(
        self, name: str, body: dict[str, Any], *, dry_run: bool = False
    ) -> tuple[float, urllib3.BaseHTTPResponse]:
        path = f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/{name}"
        if dry_run:
            path += "?dryRun=All"
        data = json.dumps(body).encode()
        start = time.perf_counter()
        response = self._pool.urlopen(
            "PATCH", path, body=data, headers={"Content-Type": SMP, "Accept": "application/json"}
        )
        elapsed = time.perf_counter() - start
        if response.status != 200:
            raise RuntimeError(f"PATCH {name}: HTTP {response.status}: {response.data[:300]!r}")
        return elapsed, response

    def warm(self, threads: int) -> None:
        # Open the connections (TLS handshakes) before any clock starts.
        connections = [self._pool._get_conn() for _ in range(threads)]
        for conn in connections:
            conn.connect()
        for conn in connections:
            self._pool._put_conn(conn)


def webhook_counts(server: Server) -> dict[str, float]:
    """perch_webhook_requests_total and the duration sums, summed over the workers."""
    text = server.get("/metrics").text
    counts: dict[str, float] = {"requests": 0.0, "seconds": 0.0}
    for line in text.splitlines():
        if line.startswith("perch_webhook_requests_total{"):
            counts["requests"] += float(line.rsplit(" ", 1)[1])
        elif line.startswith("perch_webhook_request_duration_seconds_sum{"):
            counts["seconds"] += float(line.rsplit(" ", 1)[1])
    return counts


@dataclass
class Case:
    name: str
    latencies: list[float] = field(default_factory=list)
    webhook_requests: float = 0.0
    webhook_seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        ms = [x * 1000 for x in self.latencies]
        out: dict[str, Any] = {
            "requests": len(ms),
            "p50_ms": round(percentile(ms, 50), 2),
            "p90_ms": round(percentile(ms, 90), 2),
            "p99_ms": round(percentile(ms, 99), 2),
            "webhook_requests": self.webhook_requests,
        }
        if self.webhook_requests:
            out["webhook_ms_per_request"] = round(
                1000 * self.webhook_seconds / self.webhook_requests, 2
            )
        return out


class Bench:
    def __init__(self, api: client.ApiClient, server: Server, ca_bundle: str) -> None:
        self.api = api
        self.apps = client.AppsV1Api(api)
        self.server = server
        self.ca_bundle = ca_bundle
        self.client = Client(api)
        self.client.warm(CONCURRENCY)
        self.serial = 0

    # --- objects ---------------------------------------------------------------------------------

    def deployment(self, name: str, *, opted_in: bool) -> None:
        dep = podinfo(spec=SEED_SPEC_CURRENT if opted_in else None, enabled=opted_in, uid=None)
        dep["metadata"]["name"] = name
        dep["metadata"]["namespace"] = NAMESPACE
        for key in ("resourceVersion", "generation", "uid", "creationTimestamp"):
            dep["metadata"].pop(key, None)
        dep.pop("status", None)
        labels = {"app": name}
        dep["metadata"]["labels"] = {**dep["metadata"]["labels"], **labels}
        dep["spec"]["selector"] = {"matchLabels": labels}
        dep["spec"]["template"]["metadata"]["labels"] = labels
        dep["spec"]["replicas"] = 1
        self.apps.create_namespaced_deployment(NAMESPACE, dep)

    def fresh(self, count: int, prefix: str) -> list[str]:
        """Opted-in Deployments never released, each with its Canary object (Initialized)."""
        names = [f"{prefix}-{i:04d}" for i in range(count)]
        for name in names:
            self.deployment(name, opted_in=True)
        self.fresh_wait(names, seconds=120)
        return names

    def fresh_wait(self, names: list[str], *, seconds: float) -> None:
        """Waits for the Canary object of each; ApiException 404 when one is missing."""
        custom = client.CustomObjectsApi(self.api)
        deadline = time.monotonic() + seconds
        for name in names:
            while True:
                try:
                    custom.get_namespaced_custom_object(
                        "perch.dev", "v1alpha1", NAMESPACE, "canaries", name
                    )
                    break
                except ApiException as exc:
                    if exc.status != 404 or time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)

    def autoscaler(self) -> None:
        """The HPA the seed's autoscalerRef names: every spawn reads it and copies it."""
        client.AutoscalingV2Api(self.api).create_namespaced_horizontal_pod_autoscaler(
            NAMESPACE,
            {
                "metadata": {"name": "podinfo"},
                "spec": {
                    "scaleTargetRef": {
                        "apiVersion": "apps/v1",
                        "kind": "Deployment",
                        "name": "podinfo",
                    },
                    "minReplicas": 1,
                    "maxReplicas": 4,
                },
            },
        )

    # --- registration ----------------------------------------------------------------------------

    def register(self, on: bool, *, probe: bool = True) -> None:
        admission = client.AdmissionregistrationV1Api(self.api)
        if on:
            config = registration(
                namespace="perch",
                url=f"https://127.0.0.1:{self.server.port}/mutate",
                ca_bundle=self.ca_bundle,
                name=CONFIGURATION,
                timeout_seconds=10,
            )
            try:
                admission.create_mutating_webhook_configuration(config)
            except ApiException as exc:
                if exc.status != 409:
                    raise
        else:
            try:
                admission.delete_mutating_webhook_configuration(CONFIGURATION)
            except ApiException as exc:
                if exc.status != 404:
                    raise
        if not probe:
            return
        # The API server picks the change up asynchronously: a dry-run release of the sentinel
        # tells which side it is on (with Perch, the primary keeps its template).
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            self.serial += 1
            _, response = self.client.patch(
                "sentinel", set_image(f"{IMAGE_NEW}-{self.serial}"), dry_run=True
            )
            image = json.loads(response.data)["spec"]["template"]["spec"]["containers"][0]["image"]
            if (image != f"{IMAGE_NEW}-{self.serial}") == on:
                time.sleep(0.5)  # every API server watch of the configuration has caught up
                return
            time.sleep(0.1)
        raise RuntimeError(f"registration {'on' if on else 'off'} not in effect after 30 s")

    # --- cases -----------------------------------------------------------------------------------

    def run(self, case: Case, bodies: list[tuple[str, dict[str, Any]]], threads: int) -> None:
        before = webhook_counts(self.server)
        lock = threading.Lock()
        queue = list(reversed(bodies))
        errors: list[BaseException] = []

        def worker() -> None:
            while True:
                with lock:
                    if not queue:
                        return
                    name, body = queue.pop()
                try:
                    elapsed, _ = self.client.patch(name, body)
                except BaseException as exc:
                    errors.append(exc)
                    return
                with lock:
                    case.latencies.append(elapsed)

        pool = [threading.Thread(target=worker) for _ in range(threads)]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join()
        if errors:
            raise errors[0]
        after = webhook_counts(self.server)
        case.webhook_requests += after["requests"] - before["requests"]
        case.webhook_seconds += after["seconds"] - before["seconds"]


def set_image(image: str) -> dict[str, Any]:
    return {"spec": {"template": {"spec": {"containers": [{"name": "podinfod", "image": image}]}}}}


def pass_through_bodies(name: str, count: int, tag: str) -> list[tuple[str, dict[str, Any]]]:
    """Alternately a scale and a label change, as `kubectl scale` and `kubectl label` send."""
    bodies: list[tuple[str, dict[str, Any]]] = []
    for i in range(count):
        if i % 2:
            bodies.append((name, {"spec": {"replicas": 1 + (i // 2) % 2}}))
        else:
            bodies.append((name, {"metadata": {"labels": {"bench": f"{tag}-{i}"}}}))
    return bodies


def one_round(
    bench: Bench, index: int, *, requests: int, spawns: int, cases: dict[str, Case]
) -> None:
    sides = [True, False] if index % 2 == 0 else [False, True]
    # Fresh Deployments for both sides, made while Perch is registered (so they are Initialized).
    bench.register(True)
    fresh = {
        on: {
            "spawn x1": bench.fresh(spawns, f"r{index}-{'p' if on else 'n'}-one"),
            "spawn x8": bench.fresh(spawns * 2, f"r{index}-{'p' if on else 'n'}-eight"),
        }
        for on in (True, False)
    }
    for on in sides:
        side = "with perch" if on else "without"
        bench.register(on)
        tag = f"r{index}-{'p' if on else 'n'}"
        plan: list[tuple[str, list[tuple[str, dict[str, Any]]], int]] = [
            ("(a) not opted in", pass_through_bodies("plain", requests, tag), 1),
            ("(b) opted-in pass-through", pass_through_bodies("podinfo", requests, tag), 1),
            (
                "(c) spawn x1",
                [(name, set_image(IMAGE_NEW)) for name in fresh[on]["spawn x1"]],
                1,
            ),
            (
                "(c) spawn x8",
                [(name, set_image(IMAGE_NEW)) for name in fresh[on]["spawn x8"]],
                CONCURRENCY,
            ),
        ]
        for label, bodies, threads in plan:
            case = cases.setdefault(f"{label} | {side} | {index}", Case(label))
            bench.run(case, bodies, threads)
            print(f"round {index} {side:10} {label:28} {case.summary()}", file=sys.stderr)
    verify_spawns(bench, [name for names in fresh[True].values() for name in names])


def verify_spawns(bench: Bench, names: list[str]) -> None:
    """Every spawn with Perch made its canary Deployment and left the primary's template alone."""
    for name in names:
        canary = bench.apps.read_namespaced_deployment(f"{name}-canary", NAMESPACE)
        image = canary.spec.template.spec.containers[0].image
        primary = bench.apps.read_namespaced_deployment(name, NAMESPACE)
        if image != IMAGE_NEW or primary.spec.template.spec.containers[0].image == IMAGE_NEW:
            raise RuntimeError(f"spawn of {name} did not happen as designed")


def report(cases: dict[str, Case], rounds: int) -> dict[str, Any]:
    labels = list(dict.fromkeys(c.name for c in cases.values()))
    table: dict[str, Any] = {}
    print(
        f"\n{'case':28} {'side':10} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} "
        f"{'requests':>8} {'calls':>6} {'webhook ms/call':>15}"
    )
    for label in labels:
        entry: dict[str, Any] = {}
        for side in ("without", "with perch"):
            merged = Case(label)
            for index in range(rounds):
                case = cases[f"{label} | {side} | {index}"]
                merged.latencies += case.latencies
                merged.webhook_requests += case.webhook_requests
                merged.webhook_seconds += case.webhook_seconds
            summary = merged.summary()
            entry[side] = summary
            print(
                f"{label:28} {side:10} {summary['p50_ms']:8.2f} {summary['p90_ms']:8.2f} "
                f"{summary['p99_ms']:8.2f} {summary['requests']:8d} "
                f"{summary['webhook_requests']:6.0f} "
                f"{summary.get('webhook_ms_per_request', 0):15.2f}"
            )
        for q in ("p50", "p99"):
            deltas = [
                percentile(
                    [x * 1000 for x in cases[f"{label} | with perch | {i}"].latencies], int(q[1:])
                )
                - percentile(
                    [x * 1000 for x in cases[f"{label} | without | {i}"].latencies], int(q[1:])
                )
                for i in range(rounds)
            ]
            entry[f"added_{q}_ms_per_round"] = [round(d, 2) for d in deltas]
            entry[f"added_{q}_ms_median"] = round(statistics.median(deltas), 2)
        table[label] = entry
    print("\nwhat Perch adds (with minus without, median of the rounds; per round in brackets):")
    for label, entry in table.items():
        print(
            f"  {label:28} p50 {entry['added_p50_ms_median']:+7.2f} ms "
            f"{entry['added_p50_ms_per_round']}   p99 {entry['added_p99_ms_median']:+7.2f} ms "
            f"{entry['added_p99_ms_per_round']}"
        )
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=400, help="per pass-through case")
    parser.add_argument("--spawns", type=int, default=32, help="spawn x1 requests; x8 gets twice")
    parser.add_argument(
        "--out", type=Path, default=REPO / "benchmarks" / "admission_on_cluster.last.json"
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="perch-adm-"))
    session = controlplane.start(work / "kube")
    server = None
    try:
        plane = session.plane
        api = load_api_client(str(plane.kubeconfig))
        installed = install(api, admin_kubeconfig=plane.kubeconfig, directory=work)
        server = start_server(
            work / "webhook", app=PERCH_APP, env={"KUBECONFIG": str(installed.webhook.kubeconfig)}
        )
        client.CoreV1Api(api).create_namespace({"metadata": {"name": NAMESPACE}})
        ca_bundle = base64.b64encode(server.certs.ca.read_bytes()).decode()
        bench = Bench(api, server, ca_bundle)
        bench.deployment("plain", opted_in=False)
        bench.autoscaler()
        # The first registration cannot be probed with the sentinel (which needs Perch to be
        # registered when it is created): wait until a created Deployment gets its Canary object.
        bench.register(True, probe=False)
        deadline = time.monotonic() + 30
        while True:
            name = f"first-{bench.serial}"
            bench.serial += 1
            bench.deployment(name, opted_in=True)
            try:
                bench.fresh_wait([name], seconds=1)
                break
            except ApiException:
                if time.monotonic() > deadline:
                    raise
        bench.deployment("sentinel", opted_in=True)
        bench.deployment("podinfo", opted_in=True)
        bench.fresh_wait(["sentinel", "podinfo"], seconds=30)
        cases: dict[str, Case] = {}
        # A warm-up round, not reported: the API server's caches, the webhook's spec cache.
        one_round(bench, 99, requests=50, spawns=4, cases={})
        for index in range(args.rounds):
            one_round(bench, index, requests=args.requests, spawns=args.spawns, cases=cases)
        table = report(cases, args.rounds)
        result = {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "commit": os.popen(f"git -C {REPO} rev-parse --short HEAD").read().strip(),
            "load_average": os.getloadavg(),
            "rounds": args.rounds,
            "requests_per_pass_through_case": args.requests,
            "spawns": {"x1": args.spawns, "x8": args.spawns * 2},
            "cases": table,
        }
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.out}")
        return 0
    finally:
        if server is not None:
            server.terminate()
        session.stop()


if __name__ == "__main__":
    sys.exit(main())
