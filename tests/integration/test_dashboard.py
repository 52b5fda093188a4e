"""The Grafana dashboard (charts/perch/dashboards/perch.json) against a real Prometheus server.

Every PromQL expression of the dashboard is run, with Grafana's variables substituted, against
series backfilled with promtool: Istio's for two canaries (podinfo in namespace test, cart in
namespace shop), and Perch's own, rendered by the product's real registries (analyzer.telemetry's
Telemetry and webhook.telemetry's request metrics) with prometheus_client's OpenMetrics exposition
at every step of a fixed past window. A renamed or relabelled metric therefore breaks these tests,
not the dashboard of a user. Queries are evaluated at a fixed instant inside the window, so the
numbers are the same on every run.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client import REGISTRY
from prometheus_client.openmetrics.exposition import generate_latest

from analyzer.telemetry import Telemetry
from tests.support.prometheus import PrometheusServer, Traffic, istio_openmetrics, missing_binaries
from webhook.telemetry import observe_request

pytestmark = pytest.mark.skipif(missing_binaries() is not None, reason=str(missing_binaries()))

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD_FILE = ROOT / "charts" / "perch" / "dashboards" / "perch.json"
DASHBOARD: dict[str, Any] = json.loads(DASHBOARD_FILE.read_text())
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

# Generous deadline for a broken server; never a measurement.
ANSWER_DEADLINE = 60.0

T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
END = T0 + timedelta(minutes=30)
AT = T0 + timedelta(minutes=20)
STEP_SECONDS = 15.0
# What Grafana puts for $__rate_interval / $__interval with a 15 s scrape interval.
RATE_INTERVAL = "1m"
INTERVAL = "15s"

# podinfo (namespace test) is progressing: a healthy primary, a canary answering 5 % of its
# requests with 500 and 2 % of them in 1.5 s. frontend (namespace test too) was promoted: only its
# primary gets traffic. cart (namespace shop) failed: its canary answers nothing but 500s.
SLOW = {50.0: 0.98, 1500.0: 0.02}
TRAFFIC = [
    Traffic("podinfo", namespace="test"),
    Traffic("podinfo-canary", namespace="test", error_ratio=0.05, latencies_ms=SLOW),
    Traffic("frontend", namespace="test", requests_per_second=20),
    Traffic("cart", namespace="shop"),
    Traffic("cart-canary", namespace="shop", requests_per_second=10, error_ratio=1.0),
]
CANARIES = [("test", "podinfo"), ("test", "frontend"), ("shop", "cart")]
MISSING = "no-such-canary"


def canary_state(name: str, step: int) -> tuple[str, int, int]:
    """(phase, canary weight, failed checks) the analyzer records at ``step`` of the window."""
    if name == "podinfo":
        return "Progressing", min(50, 10 * (1 + step // 20)), step // 60
    if name == "frontend":
        return "Succeeded", 0, 0
    return "Failed", 0, 5


STATUS = {"podinfo": 0, "frontend": 1, "cart": 2}


# --- Perch's own series, from the product's registries -------------------------------------------


def _stamp(text: str, at: float, into: dict[str, list[str]], *, prefix: str = "perch_") -> None:
    """Append one OpenMetrics exposition's samples, timestamped ``at``, family by family."""
    family = ""
    for line in text.splitlines():
        if line.startswith("# EOF"):
            break
        if line.startswith(("# HELP ", "# TYPE ", "# UNIT ")):
            family = line.split()[2]
            if family.startswith(prefix) and line not in into.setdefault(family, []):
                into[family].append(line)
            continue
        if not family.startswith(prefix):
            continue
        name = re.split(r"[{ ]", line, maxsplit=1)[0]
        # _created holds the wall clock of this test run, not a time inside the window.
        if not name.endswith("_created"):
            into[family].append(f"{line} {at:.3f}")


def perch_openmetrics() -> tuple[str, dict[str, set[str]]]:
    """Perch's series over the window, and the sample names of every exported family."""
    telemetry = Telemetry()
    kube_calls = {"ticks": 0, "cache-list": 0, "cache-watch": 0}
    prometheus_queries = [0]
    lags: list[float] = []
    telemetry.count_calls(
        kubernetes=lambda: dict(kube_calls), prometheus=lambda: prometheus_queries[0]
    )
    telemetry.watch_lags(lambda: list(lags))
    dropped = {"late": 0, "overlapping": 0}
    telemetry.watch_dropped_ticks(lambda: dict(dropped))
    telemetry.watch_canaries(
        lambda: [{"metadata": {"namespace": ns, "name": name}} for ns, name in CANARIES]
    )
    telemetry.leader.set(1)

    families: dict[str, list[str]] = {}
    start, end = T0.timestamp(), END.timestamp()
    for step in range(int((end - start) // STEP_SECONDS) + 1):
        # What a step of the analyzer and the webhook would count, through their own code.
        for namespace, name in CANARIES:
            phase, weight, failed = canary_state(name, step)
            telemetry.record_canary(
                name=name, namespace=namespace, phase=phase, weight=weight, failed=failed
            )
            telemetry.duration.labels(name, namespace).observe(0.02 + 0.01 * (step % 3))
            telemetry.ticks.labels("progressed" if name == "podinfo" else "idle").inc()
        kube_calls["ticks"] += 3
        kube_calls["cache-watch"] += 1
        prometheus_queries[0] += 2
        lags.append(0.001 * (step % 7))
        del lags[:-100]
        dropped["late"] += step % 2
        dropped["overlapping"] += 1 if step % 5 == 0 else 0
        observe_request(decision="observe", seconds=0.004)
        observe_request(decision="not-opted-in", seconds=0.001)
        at = start + step * STEP_SECONDS
        _stamp(generate_latest(telemetry.registry).decode(), at, families)
        # The webhook's metrics live in prometheus_client's default registry.
        _stamp(generate_latest(REGISTRY).decode(), at, families, prefix="perch_webhook_")

    exported = {
        family: {re.split(r"[{ ]", line, maxsplit=1)[0] for line in lines if line[0] != "#"}
        for family, lines in families.items()
    }
    body = [line for lines in families.values() for line in lines]
    return "\n".join([*body, "# EOF"]) + "\n", exported


@pytest.fixture(scope="module")
def exported() -> dict[str, set[str]]:
    return perch_openmetrics()[1]


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    server = PrometheusServer(tmp_path_factory.mktemp("prometheus"))
    server.backfill(istio_openmetrics(TRAFFIC, start=T0, end=END, step_seconds=STEP_SECONDS))
    server.backfill(perch_openmetrics()[0])
    with server:
        yield server


# --- the dashboard ------------------------------------------------------------------------------


def panels() -> list[dict[str, Any]]:
    found = []
    for panel in DASHBOARD["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))  # collapsed rows hold their panels
    return found


def targets() -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{panel['title']}/{target['refId']}", target)
        for panel in panels()
        for target in panel.get("targets", [])
    ]


def variable(name: str) -> dict[str, Any]:
    found = [v for v in DASHBOARD["templating"]["list"] if v["name"] == name]
    assert len(found) == 1, f"variable {name}: {len(found)} definitions"
    return found[0]


def panel_titled(title: str) -> dict[str, Any]:
    found = [p for p in panels() if p["title"] == title]
    assert len(found) == 1, f"panel {title!r}: {len(found)} found"
    return found[0]


GRAFANA_VARIABLE = re.compile(r"\$\{?(\w+)\}?|\[\[(\w+)\]\]")


def substitute(expr: str, *, namespace: str, canary: str) -> str:
    values = {
        "namespace": namespace,
        "canary": canary,
        "datasource": "prometheus",
        "__rate_interval": RATE_INTERVAL,
        "__interval": INTERVAL,
        "__range": "1h",
    }

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in values, f"unknown Grafana variable ${name} in {expr}"
        return values[name]

    return GRAFANA_VARIABLE.sub(value, expr)


def query(server: PrometheusServer, expr: str) -> list[dict[str, Any]]:
    response = requests.get(
        f"{server.url}/api/v1/query",
        params={"query": expr, "time": AT.timestamp()},
        timeout=ANSWER_DEADLINE,
    )
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
    result = body["data"]["result"]
    if body["data"]["resultType"] == "scalar":
        return [{"metric": {}, "value": result}]
    assert body["data"]["resultType"] == "vector", f"{expr}: {body['data']['resultType']}"
    return list(result)


def by_label(result: list[dict[str, Any]], label: str) -> dict[str, float]:
    return {series["metric"].get(label, ""): float(series["value"][1]) for series in result}


def panel_values(
    server: PrometheusServer, title: str, label: str, *, namespace: str, canary: str
) -> dict[str, float]:
    (target,) = panel_titled(title)["targets"]
    expr = substitute(target["expr"], namespace=namespace, canary=canary)
    return by_label(query(server, expr), label)


# --- structure ----------------------------------------------------------------------------------


def test_dashboard_structure() -> None:
    assert DASHBOARD["schemaVersion"] >= 36
    assert DASHBOARD["uid"] and DASHBOARD["title"]
    ids = [panel["id"] for panel in panels()]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(ids)}"

    datasource = variable("datasource")
    assert (datasource["type"], datasource["query"]) == ("datasource", "prometheus")
    for name in ("namespace", "canary"):
        assert variable(name)["type"] == "query"
        assert variable(name)["datasource"] == DATASOURCE

    for panel in panels():
        if panel["type"] == "row":
            continue
        where = f"panel {panel['title']!r}"
        assert panel.get("datasource") == DATASOURCE, where
        assert panel.get("targets"), f"{where} has no queries"
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), f"{where}: duplicate refIds {refs}"
        for target in panel["targets"]:
            assert target.get("datasource") == DATASOURCE, f"{where}/{target['refId']}"
            assert target.get("expr", "").strip(), f"{where}/{target['refId']} has no expr"


def test_panels_fit_the_grid_without_overlapping() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in DASHBOARD["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]


def test_the_issue_panels_are_there() -> None:
    exprs = " ".join(target["expr"] for _, target in targets())
    for needed in (
        "perch_canary_status",
        "perch_canary_weight",
        "perch_canary_failed_checks",
        "perch_canary_duration_seconds_bucket",
        "istio_requests_total",
        "istio_request_duration_milliseconds_bucket",
    ):
        assert needed in exprs, f"no panel queries {needed}"
    # Primary and canary side by side: Perch names them <name> and <name>-canary.
    assert '"$canary|$canary-canary"' in exprs


def test_every_perch_metric_on_the_dashboard_is_exported(exported: dict[str, set[str]]) -> None:
    names = set(re.findall(r"\bperch_\w+", " ".join(t["expr"] for _, t in targets())))
    samples = set().union(*exported.values())
    assert names <= samples, f"not exported by Perch: {sorted(names - samples)}"
    # And every family Perch exports has a panel.
    missing = [family for family, fam_samples in exported.items() if not fam_samples & names]
    assert not missing, f"exported but on no panel: {missing}"


# --- every query returns data -------------------------------------------------------------------


@pytest.mark.parametrize(("namespace", "canary"), CANARIES)
@pytest.mark.parametrize(("where", "target"), targets(), ids=[w for w, _ in targets()])
def test_every_query_returns_data(
    prometheus: PrometheusServer, where: str, target: dict[str, Any], namespace: str, canary: str
) -> None:
    expr = substitute(target["expr"], namespace=namespace, canary=canary)
    result = query(prometheus, expr)
    assert result, f"{where}: no data for {expr}"
    # NaN is what a quantile of a series with no traffic looks like; one real value is needed.
    values = [float(series["value"][1]) for series in result]
    assert any(math.isfinite(v) for v in values), f"{where}: only NaN {result} for {expr}"


@pytest.mark.parametrize(("where", "target"), targets(), ids=[w for w, _ in targets()])
def test_queries_follow_the_variables(
    prometheus: PrometheusServer, where: str, target: dict[str, Any]
) -> None:
    """A query that names $canary or $namespace shows nothing for a canary that does not exist:
    the variable really selects the series (a query ignoring it would show another canary's)."""
    expr = target["expr"]
    if "$canary" in expr:
        assert not query(prometheus, substitute(expr, namespace="test", canary=MISSING)), where
    if "$namespace" in expr:
        assert not query(prometheus, substitute(expr, namespace=MISSING, canary="podinfo")), where


def test_success_rate_shows_primary_and_canary(prometheus: PrometheusServer) -> None:
    rates = panel_values(
        prometheus,
        "Request success rate",
        "destination_workload",
        namespace="test",
        canary="podinfo",
    )
    assert rates == pytest.approx({"podinfo": 100.0, "podinfo-canary": 95.0})
    # A canary answering only 500s is a line at 0 %, not a gap in the graph.
    rates = panel_values(
        prometheus, "Request success rate", "destination_workload", namespace="shop", canary="cart"
    )
    assert rates == pytest.approx({"cart": 100.0, "cart-canary": 0.0})


def test_p99_latency_shows_primary_and_canary(prometheus: PrometheusServer) -> None:
    p99 = panel_values(
        prometheus,
        "Request duration p99",
        "destination_workload",
        namespace="test",
        canary="podinfo",
    )
    # Istio's buckets: every primary request in (25, 50] ms; 2 % of the canary's in (1000, 2500].
    assert p99 == pytest.approx({"podinfo": 49.75, "podinfo-canary": 1750.0})


def test_weights_and_status_show_the_analyzers_state(prometheus: PrometheusServer) -> None:
    step = int((AT - T0).total_seconds() // STEP_SECONDS)
    panel = panel_titled("Traffic weight: primary vs canary")
    for namespace, canary in CANARIES:
        _, weight, failed = canary_state(canary, step)
        weights = {}
        for target in panel["targets"]:
            expr = substitute(target["expr"], namespace=namespace, canary=canary)
            weights.update(by_label(query(prometheus, expr), "track"))
        assert weights == {"primary": 100 - weight, "canary": weight}
        status = panel_values(prometheus, "Status", "name", namespace=namespace, canary=canary)
        assert status == {canary: STATUS[canary]}
        checks = panel_values(
            prometheus, "Failed checks", "name", namespace=namespace, canary=canary
        )
        assert checks == {canary: failed}


def test_variable_queries_list_namespaces_and_canaries(prometheus: PrometheusServer) -> None:
    """Grafana runs label_values(selector, label) as /api/v1/label/<label>/values?match[]=..."""

    def label_values(name: str, namespace: str) -> set[str]:
        definition = variable(name)["query"]
        if isinstance(definition, dict):  # Grafana 10's query editor stores an object
            definition = definition["query"]
        found = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", definition.strip())
        assert found, f"${name}: {definition}"
        selector = substitute(found.group(1), namespace=namespace, canary="")
        response = requests.get(
            f"{prometheus.url}/api/v1/label/{found.group(2)}/values",
            params={"match[]": selector, "start": T0.timestamp(), "end": END.timestamp()},
            timeout=ANSWER_DEADLINE,
        )
        assert response.status_code == 200, response.text
        return set(response.json()["data"])

    assert label_values("namespace", "") == {"test", "shop"}
    for name in ("namespace", "canary"):
        # Grafana shows the definition and runs the query: they must not drift apart.
        assert variable(name)["definition"] == variable(name)["query"], name
    assert label_values("canary", "test") == {"podinfo", "frontend"}
    assert label_values("canary", "shop") == {"cart"}
