"""The metric checks against a real Prometheus server, with series backfilled at fixed past times.

Every value here is computed by Prometheus from Istio-shaped (and Envoy-shaped) series that
tests/support/prometheus.py writes with promtool; queries are evaluated ``at`` fixed instants, so
the numbers are the same on every run. The failure tests kill the server or put a socket that never
answers in its place: the outcome must be "error" within the provider's timeout, never "pass".
"""

from __future__ import annotations

import base64
import http.server
import ipaddress
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import pytest
from kubernetes.client.exceptions import ApiException
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from analyzer.metrics import (
    PrometheusProvider,
    ProviderSettings,
    QueryError,
    QuerySetName,
    create_provider,
)
from analyzer.metrics.resolver import TemplateResolver
from analyzer.model import Event, MetricResult, Observations, Workload
from analyzer.service import MetricBatcher
from analyzer.step import step
from certs.issue import IssuedCertificate, issue
from perch.spec import (
    CanarySpec,
    CrossNamespaceRef,
    FrozenDict,
    Metric,
    ThresholdRange,
    parse_spec,
)
from perch.status import analysis_started, initialized
from tests.seed import SEED_SPEC_CURRENT, SEED_SPEC_EARLY
from tests.support.prometheus import (
    BearerProxy,
    PrometheusServer,
    Traffic,
    WebConfig,
    envoy_openmetrics,
    istio_openmetrics,
    missing_binaries,
)

pytestmark = pytest.mark.skipif(missing_binaries() is not None, reason=str(missing_binaries()))

T = TypeVar("T")

# Generous deadlines for a broken setup; never measurements.
ANSWER_DEADLINE = 60.0
SCRAPE_DEADLINE = 60.0

# The seed's podinfo.test: the primary is healthy for three hours, and its canary is healthy in
# the first window, answers 38.61 % of requests with 500 in the second, and takes 1.5 s for 1.5 %
# of its requests (so p99 is 1.5 s) in the third.
T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
WINDOW = timedelta(minutes=10)
HEALTHY_AT = T0 + timedelta(minutes=9)
ERRORS_AT = T0 + timedelta(hours=1, minutes=9)
SLOW_AT = T0 + timedelta(hours=2, minutes=9)
BEFORE_ANY_DATA = T0 - timedelta(days=1)
SLOW = {50.0: 0.985, 1500.0: 0.015}

# Namespace shop, first window only: canaries side by side, for batching.
SHOP_TRAFFIC = [
    Traffic("frontend", namespace="shop", error_ratio=0.001),
    Traffic("frontend-canary", namespace="shop", error_ratio=0.002),
    Traffic("cart-canary", namespace="shop", error_ratio=0.3861),
    Traffic("backend-canary", namespace="shop", requests_per_second=200, latencies_ms=SLOW),
    Traffic("broken-canary", namespace="shop", error_ratio=1.0),
]
SHOP_CANARIES = ["frontend-canary", "cart-canary", "backend-canary", "idle-canary"]


def success_rate(minimum: float = 99, *, interval: str = "1m") -> Metric:
    return Metric(
        name="request-success-rate",
        builtin="request-success-rate",
        interval=interval,
        threshold_range=ThresholdRange(min=minimum),
    )


def duration(maximum: float = 500, *, unit: str = "milliseconds", interval: str = "1m") -> Metric:
    return Metric(
        name="request-duration",
        builtin="request-duration",
        histogram_unit="seconds" if unit == "seconds" else "milliseconds",
        interval=interval,
        threshold_range=ThresholdRange(max=maximum),
    )


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    server = PrometheusServer(tmp_path_factory.mktemp("prometheus"))
    primary = Traffic("podinfo", error_ratio=0.001)
    server.backfill(istio_openmetrics([primary], start=T0, end=T0 + timedelta(hours=3)))
    for start, canary in (
        (T0, Traffic("podinfo-canary", error_ratio=0.002)),
        (T0 + timedelta(hours=1), Traffic("podinfo-canary", error_ratio=0.3861)),
        (T0 + timedelta(hours=2), Traffic("podinfo-canary", latencies_ms=SLOW)),
    ):
        server.backfill(istio_openmetrics([canary], start=start, end=start + WINDOW))
    server.backfill(istio_openmetrics(SHOP_TRAFFIC, start=T0, end=T0 + WINDOW))
    server.backfill(envoy_openmetrics(SHOP_TRAFFIC, start=T0, end=T0 + WINDOW))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def provider(prometheus: PrometheusServer) -> Iterator[PrometheusProvider]:
    client = PrometheusProvider(prometheus.url)
    yield client
    client.close()


def within(deadline: float, call: Callable[[], T]) -> T:
    """Run ``call`` in a thread; fail (instead of hanging the suite) if it outlives ``deadline``."""
    box: list[T] = []
    worker = threading.Thread(target=lambda: box.append(call()), daemon=True)
    worker.start()
    worker.join(deadline)
    assert not worker.is_alive(), f"still waiting after {deadline}s: the call is not bounded"
    assert box, "the call raised (see the thread's traceback above)"
    return box[0]


# --- the seed story --------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [SEED_SPEC_EARLY, SEED_SPEC_CURRENT], ids=["early", "current"])
def test_seed_canary_passes_then_halts_on_errors_then_on_latency(
    provider: PrometheusProvider, spec: str
) -> None:
    rate, latency = parse_spec(spec).analysis.metrics

    def check(metric: Metric, at: datetime) -> MetricResult:
        return provider.evaluate_one("test", metric, "podinfo-canary", at=at)

    assert check(rate, HEALTHY_AT).outcome == "pass"
    assert check(rate, HEALTHY_AT).message == "success rate 99.80%"
    assert check(latency, HEALTHY_AT).outcome == "pass"
    assert check(latency, HEALTHY_AT).value == pytest.approx(49.75)

    errors = check(rate, ERRORS_AT)
    assert (errors.outcome, errors.message) == ("fail", "success rate 61.39% < 99%")
    assert errors.value == pytest.approx(61.39)
    assert check(latency, ERRORS_AT).outcome == "pass"

    assert check(rate, SLOW_AT).outcome == "pass"
    slow = check(latency, SLOW_AT)
    assert (slow.outcome, slow.message) == ("fail", "request duration 1.500s > 500ms")
    assert slow.value == pytest.approx(1500.0)


def test_both_latency_histograms_give_milliseconds(provider: PrometheusProvider) -> None:
    seconds = provider.evaluate_one("test", duration(unit="seconds"), "podinfo-canary", at=SLOW_AT)
    millis = provider.evaluate_one("test", duration(), "podinfo-canary", at=SLOW_AT)
    assert seconds.value == pytest.approx(1500.0)
    assert millis.value == pytest.approx(1500.0)
    assert seconds.message == millis.message == "request duration 1.500s > 500ms"


def test_a_window_without_traffic_is_no_data(provider: PrometheusProvider) -> None:
    for metric in (success_rate(), duration()):
        result = provider.evaluate_one("test", metric, "podinfo-canary", at=BEFORE_ANY_DATA)
        assert result.outcome == "no-data"
        assert result.value is None
        assert result.message == f"no data for metric {metric.name}"


def test_a_workload_prometheus_never_saw_is_no_data(provider: PrometheusProvider) -> None:
    result = provider.evaluate_one("test", success_rate(), "nobody-canary", at=HEALTHY_AT)
    assert result.outcome == "no-data"
    assert result.message == "no data for metric request-success-rate"


@pytest.mark.parametrize("query_set", ["istio", "envoy"])
def test_a_canary_answering_only_500s_reads_0_percent_not_no_data(
    provider: PrometheusProvider, query_set: QuerySetName
) -> None:
    # Flagger's query has no non-5xx series to divide, so it has no value at all: "no values
    # found", for the worst canary there is. The guarded numerator makes it 0 %, alone and in
    # the batched query (where the other canaries keep their own rates).
    alone = provider.evaluate_one(
        "shop", success_rate(), "broken-canary", at=HEALTHY_AT, query_set=query_set
    )
    batched = provider.evaluate(
        "shop",
        success_rate(),
        ["broken-canary", "frontend-canary", "idle-canary"],
        at=HEALTHY_AT,
        query_set=query_set,
    )
    for result in (alone, batched["broken-canary"]):
        assert (result.outcome, result.value) == ("fail", 0.0)
        assert result.message == "success rate 0.00% < 99%"
    assert batched["frontend-canary"].value == pytest.approx(99.8)
    # No request at all is still no data: the guard only fills in where requests were made.
    assert batched["idle-canary"].outcome == "no-data"


def test_flaggers_unguarded_query_has_no_value_for_that_canary(
    provider: PrometheusProvider,
) -> None:
    flagger = (
        'sum(rate(istio_requests_total{reporter="destination",destination_workload_namespace='
        '"shop",destination_workload=~"broken-canary",response_code!~"5.*"}[1m])) / '
        'sum(rate(istio_requests_total{reporter="destination",destination_workload_namespace='
        '"shop",destination_workload=~"broken-canary"}[1m])) * 100'
    )
    assert provider.query(flagger, at=HEALTHY_AT) == []


# --- batching --------------------------------------------------------------------------------


@pytest.mark.parametrize("query_set", ["istio", "envoy"])
def test_one_query_serves_every_canary_in_the_namespace(
    provider: PrometheusProvider, query_set: QuerySetName
) -> None:
    before = provider.calls
    rates = provider.evaluate(
        "shop", success_rate(), SHOP_CANARIES, at=HEALTHY_AT, query_set=query_set
    )
    assert provider.calls == before + 1
    latencies = provider.evaluate(
        "shop", duration(), SHOP_CANARIES, at=HEALTHY_AT, query_set=query_set
    )
    assert provider.calls == before + 2

    assert list(rates) == SHOP_CANARIES
    assert {name: r.outcome for name, r in rates.items()} == {
        "frontend-canary": "pass",
        "cart-canary": "fail",
        "backend-canary": "pass",
        "idle-canary": "no-data",
    }
    assert rates["frontend-canary"].value == pytest.approx(99.8)
    assert rates["cart-canary"].message == "success rate 61.39% < 99%"
    assert rates["idle-canary"].message == "no data for metric request-success-rate"
    assert {name: r.outcome for name, r in latencies.items()} == {
        "frontend-canary": "pass",
        "cart-canary": "pass",
        "backend-canary": "fail",
        "idle-canary": "no-data",
    }
    assert latencies["backend-canary"].message == "request duration 1.500s > 500ms"


@pytest.mark.parametrize("query_set", ["istio", "envoy"])
def test_batched_values_equal_one_query_per_canary(
    provider: PrometheusProvider, query_set: QuerySetName
) -> None:
    for metric in (success_rate(), duration()):
        batched = provider.evaluate(
            "shop", metric, SHOP_CANARIES, at=HEALTHY_AT, query_set=query_set
        )
        for canary in SHOP_CANARIES:
            alone = provider.evaluate_one(
                "shop", metric, canary, at=HEALTHY_AT, query_set=query_set
            )
            assert batched[canary].outcome == alone.outcome
            assert batched[canary].message == alone.message
            if alone.value is not None:
                assert batched[canary].value == pytest.approx(alone.value)


def test_targets_in_another_namespace_are_not_mixed_in(provider: PrometheusProvider) -> None:
    # podinfo-canary has data in namespace test only.
    results = provider.evaluate(
        "shop", success_rate(), ["podinfo-canary", "frontend-canary"], at=HEALTHY_AT
    )
    assert results["podinfo-canary"].outcome == "no-data"
    assert results["frontend-canary"].outcome == "pass"


# --- comparative checks ----------------------------------------------------------------------


def test_canary_judged_against_the_primary_in_one_query(provider: PrometheusProvider) -> None:
    before = provider.calls
    errors = provider.compare(
        "test", success_rate(), canary="podinfo-canary", primary="podinfo", max_delta=1,
        at=ERRORS_AT,
    )  # fmt: skip
    assert provider.calls == before + 1
    assert errors.outcome == "fail"
    assert errors.message == (
        "error rate 38.61% is 38.51 points above the primary's 0.10% (max 1 point)"
    )
    healthy = provider.compare(
        "test", success_rate(), canary="podinfo-canary", primary="podinfo", max_delta=1,
        at=HEALTHY_AT,
    )  # fmt: skip
    assert healthy.outcome == "pass"
    slow = provider.compare(
        "test", duration(), canary="podinfo-canary", primary="podinfo", max_ratio=2, at=SLOW_AT
    )
    assert slow.outcome == "fail"
    assert slow.message == "request duration 1.500s is 30.15× the primary's 49.75ms (max 2×)"


def test_comparison_without_primary_data_is_no_data(provider: PrometheusProvider) -> None:
    result = provider.compare(
        "shop", success_rate(), canary="cart-canary", primary="cart", max_delta=1, at=HEALTHY_AT
    )
    assert result.outcome == "no-data"
    assert result.message == "no data for metric request-success-rate of the primary"


# --- custom queries --------------------------------------------------------------------------

ERROR_PERCENT = (
    'sum(rate(istio_requests_total{destination_workload_namespace="{{ namespace }}",'
    'destination_workload="{{ target }}",response_code=~"{{ variables.codes }}"}'
    "[{{ interval }}])) / "
    'sum(rate(istio_requests_total{destination_workload_namespace="{{ namespace }}",'
    'destination_workload="{{ target }}"}[{{ interval }}])) * 100'
)


def custom(query: str | None, *, template: bool = False) -> Metric:
    return Metric(
        name="error-percent",
        query=None if template else query,
        template_ref=CrossNamespaceRef(name="error-percent") if template else None,
        template_variables=FrozenDict({"codes": "5.."}),
        interval="1m",
        threshold_range=ThresholdRange(max=2),
    )


def test_custom_query_is_rendered_and_judged_per_target(provider: PrometheusProvider) -> None:
    before = provider.calls
    results = provider.evaluate(
        "shop", custom(ERROR_PERCENT), ["cart-canary", "frontend-canary"], at=HEALTHY_AT
    )
    # A user's PromQL cannot be safely re-aggregated: one query per target.
    assert provider.calls == before + 2
    assert results["cart-canary"].outcome == "fail"
    assert results["cart-canary"].message == "error-percent 38.61 > 2"
    assert results["frontend-canary"].outcome == "pass"
    assert results["frontend-canary"].value == pytest.approx(0.2)


def test_template_ref_uses_the_template_text_the_caller_resolved(
    provider: PrometheusProvider,
) -> None:
    metric = custom(None, template=True)
    result = provider.evaluate_one(
        "shop", metric, "cart-canary", at=HEALTHY_AT, template=ERROR_PERCENT
    )
    assert result.message == "error-percent 38.61 > 2"
    missing = provider.evaluate_one("shop", metric, "cart-canary", at=HEALTHY_AT)
    assert missing.outcome == "error"
    assert (
        missing.message
        == "metric error-percent: MetricTemplate error-percent.shop is not available"
    )


def test_unknown_placeholder_is_an_error_before_any_query(provider: PrometheusProvider) -> None:
    before = provider.calls
    result = provider.evaluate_one(
        "shop", custom('sum(x{a="{{ nmespace }}"})'), "cart-canary", at=HEALTHY_AT
    )
    assert result.outcome == "error"
    assert "{{ nmespace }}" in result.message
    assert provider.calls == before


def test_custom_query_returning_several_series_is_an_error(provider: PrometheusProvider) -> None:
    result = provider.evaluate_one(
        "shop",
        custom(
            'sum by (response_code) (rate(istio_requests_total{destination_workload="{{ target }}"}[1m]))'
        ),
        "cart-canary",
        at=HEALTHY_AT,
    )
    assert result.outcome == "error"
    assert "returned 2 series, expected one" in result.message


def test_custom_scalar_result_is_read(provider: PrometheusProvider) -> None:
    result = provider.evaluate_one(
        "shop", custom("scalar(vector(3.2))"), "cart-canary", at=HEALTHY_AT
    )
    assert (result.outcome, result.message) == ("fail", "error-percent 3.20 > 2")


def test_invalid_promql_is_prometheus_own_error(provider: PrometheusProvider) -> None:
    result = provider.evaluate_one("shop", custom("sum(rate(x[1m]"), "cart-canary", at=HEALTHY_AT)
    assert result.outcome == "error"
    assert result.message.startswith("Prometheus query failed: HTTP 400: ")
    assert "parse error" in result.message


# --- Prometheus down or hanging --------------------------------------------------------------


def test_a_killed_prometheus_is_an_error_never_a_pass(tmp_path: Path) -> None:
    server = PrometheusServer(tmp_path)
    server.backfill(istio_openmetrics([Traffic("podinfo-canary")], start=T0, end=T0 + WINDOW))
    server.start()
    provider = create_provider("prometheus", ProviderSettings(server.url))
    assert (
        provider.evaluate("test", success_rate(), ["podinfo-canary"], at=HEALTHY_AT)[
            "podinfo-canary"
        ].outcome
        == "pass"
    )

    server.kill()
    for metric in (success_rate(), duration()):
        results = within(
            ANSWER_DEADLINE,
            partial(
                provider.evaluate,
                "test",
                metric,
                ["podinfo-canary", "other-canary"],
                at=HEALTHY_AT,
            ),
        )
        for result in results.values():
            assert result.outcome == "error"
            assert result.value is None
            assert result.message.startswith(
                f"Prometheus query failed: cannot connect to {server.url}: "
            )


@pytest.fixture
def silent_server() -> Iterator[tuple[str, list[socket.socket]]]:
    """Accepts TCP connections and never answers; the list holds every connection accepted."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            accepted.append(connection)

    worker = threading.Thread(target=accept, daemon=True)
    worker.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}", accepted
    stop.set()
    worker.join(ANSWER_DEADLINE)
    for connection in accepted:
        connection.close()
    listener.close()


def test_a_prometheus_that_never_answers_is_an_error_within_the_timeout(
    silent_server: tuple[str, list[socket.socket]],
) -> None:
    url, accepted = silent_server
    provider = create_provider("prometheus", ProviderSettings(url, timeout_seconds=1))
    results = within(
        ANSWER_DEADLINE,
        lambda: provider.evaluate(
            "test", success_rate(), ["podinfo-canary", "other-canary"], at=HEALTHY_AT
        ),
    )
    for result in results.values():
        assert result.outcome == "error"
        assert result.message == f"Prometheus query failed: timeout after 1s ({url})"
    # One attempt: the client's default of three retries with back-off would hold the tick for
    # four timeouts and more.
    assert len(accepted) == 1
    assert provider.calls == 1


# --- live scraping ---------------------------------------------------------------------------


class SteadyTraffic(Collector):
    """Istio's counter for a workload serving 90 requests/s fine and 10/s with 500, since start."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def collect(self) -> Iterator[CounterMetricFamily]:
        elapsed = time.monotonic() - self.start
        family = CounterMetricFamily(
            "istio_requests",
            "requests",
            labels=[
                "reporter", "destination_workload_namespace", "destination_workload",
                "response_code",
            ],
        )  # fmt: skip
        family.add_metric(["destination", "live", "web-canary", "200"], 90 * elapsed)
        family.add_metric(["destination", "live", "web-canary", "500"], 10 * elapsed)
        yield family


def test_live_scrape_of_an_exporter_evaluated_now(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    registry.register(SteadyTraffic())
    exporter, _ = start_http_server(0, addr="127.0.0.1", registry=registry)
    server = PrometheusServer(tmp_path, scrape_interval="1s")
    try:
        server.scrape(f"127.0.0.1:{exporter.server_port}").start()
        provider = PrometheusProvider(server.url)
        metric = success_rate(interval="10s")
        until = time.monotonic() + SCRAPE_DEADLINE
        result = provider.evaluate_one("live", metric, "web-canary")
        while result.outcome == "no-data" and time.monotonic() < until:
            time.sleep(0.5)
            result = provider.evaluate_one("live", metric, "web-canary")
        assert result.outcome == "fail"
        assert result.message == "success rate 90.00% < 99%"
    finally:
        server.stop()
        exporter.shutdown()


class NotPrometheus(http.server.BaseHTTPRequestHandler):
    """A login page where Prometheus should be (a proxy, an ingress with auth)."""

    def do_GET(self) -> None:
        body = b"<html>Please log in</html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_an_answer_that_is_not_prometheus_json_is_an_error() -> None:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotPrometheus)
    worker = threading.Thread(target=httpd.serve_forever, daemon=True)
    worker.start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        provider = PrometheusProvider(url)
        result = provider.evaluate_one("test", success_rate(), "podinfo-canary", at=HEALTHY_AT)
        assert result.outcome == "error"
        assert result.message == f"Prometheus query failed: malformed answer from {url}: not JSON"
    finally:
        httpd.shutdown()
        httpd.server_close()


# --- MetricTemplates: a Prometheus that requires basic auth and TLS ---------------------------
#
# The server runs with a --web.config.file (bcrypt-hashed basic auth users, a certificate from
# certs.issue for 127.0.0.1 signed by a CA of its own). A template names it with a Secret holding
# Flagger's keys; the analyzer's MetricBatcher resolves the template (TemplateResolver) and sends
# the query there. The API side (the watch cache, the Secret's GET, RBAC) is shown on a real
# control plane in tests/cluster/test_metric_templates.py; here the templates and Secrets come
# from memory.

USER, PASSWORD, TOKEN = "perch", "correct horse battery", "ey.perch-test-token"


def b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


class Templates:
    """MetricTemplates by (namespace, name), as the analyzer's watch cache hands them out."""

    def __init__(self) -> None:
        self.objs: dict[tuple[str, str], dict[str, Any]] = {}

    def add(self, namespace: str, name: str, *, query: str, **provider: Any) -> None:
        self.objs[(namespace, name)] = {
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"provider": provider, "query": query},
        }

    def get(self, namespace: str, name: str, *, kind: Any = "MetricTemplate") -> Any:
        return self.objs.get((namespace, name))

    def covers(self, namespace: str) -> bool:
        return True


class Secrets:
    """Secrets by name; an int answers with that HTTP status (403: not granted)."""

    def __init__(self, **secrets: dict[str, str] | int) -> None:
        self.secrets = secrets

    def get(self, res: Any, namespace: str, name: str) -> Any:
        found = self.secrets.get(name)
        if isinstance(found, int):
            raise ApiException(status=found, reason="Forbidden")
        return None if found is None else {"data": found}


@dataclass
class Secured:
    server: PrometheusServer
    tls: IssuedCertificate
    proxy: BearerProxy

    def auth(self, password: str = PASSWORD, *, ca: bool = True) -> dict[str, str]:
        data = {"username": b64(USER), "password": b64(password)}
        if ca:
            data["ca.crt"] = b64(self.tls.ca_crt)
        return data


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    tls = issue(
        service="prometheus", namespace="monitoring", ips=[ipaddress.ip_address("127.0.0.1")]
    )
    server = PrometheusServer(
        tmp_path_factory.mktemp("secured"), web=WebConfig(users={USER: PASSWORD}, tls=tls)
    )
    server.backfill(istio_openmetrics(SHOP_TRAFFIC, start=T0, end=T0 + WINDOW))
    server.start()
    proxy = BearerProxy(server, token=TOKEN).start()
    yield Secured(server, tls, proxy)
    proxy.stop()
    server.stop()


def template_metric(
    name: str = "error-percent", *, namespace: str | None = None, **variables: str
) -> Metric:
    return Metric(
        name="error-percent",
        template_ref=CrossNamespaceRef(name=name, namespace=namespace),
        template_variables=FrozenDict(variables or {"codes": "5.."}),
        interval="1m",
        threshold_range=ThresholdRange(max=2),
    )


SHOP_SPEC = parse_spec("service: {port: 9898}\nanalysis: {threshold: 3}\n")


def judged_with(
    provider: PrometheusProvider, templates: Templates, secrets: Secrets, metric: Metric,
    target: str = "cart-canary",
) -> tuple[MetricResult, TemplateResolver]:  # fmt: skip
    resolver = TemplateResolver(
        templates=templates, secrets=secrets, default=ProviderSettings(provider.url)
    )
    batcher = MetricBatcher(provider, canaries=lambda ns: [target], templates=resolver)
    return batcher.evaluate("shop", SHOP_SPEC, metric, target=target, at=HEALTHY_AT), resolver


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_prometheus_refuses_a_client_without_the_password_or_the_ca(secured: Secured) -> None:
    # The web config is in force: what the templates below pass, a plain client does not.
    plain = PrometheusProvider(secured.server.url, timeout_seconds=5)
    with pytest.raises(QueryError, match="CERTIFICATE_VERIFY_FAILED"):
        plain.query("vector(1)")
    insecure = PrometheusProvider(secured.server.url, verify_tls=False)
    with pytest.raises(QueryError, match="HTTP 401: Unauthorized"):
        insecure.query("vector(1)")


@pytest.mark.parametrize("where", ["shop", "monitoring"])
def test_a_template_with_variables_behind_basic_auth_and_tls_is_judged(
    provider: PrometheusProvider, secured: Secured, where: str
) -> None:
    templates = Templates()
    # In the canary's namespace, or in another one (its Secret lives beside it, as in Flagger).
    templates.add(
        where, "error-percent", query=ERROR_PERCENT, type="prometheus",
        address=secured.server.url, secretRef={"name": "prom-auth"},
    )  # fmt: skip
    metric = template_metric(namespace=None if where == "shop" else where)
    before = provider.calls
    result, resolver = judged_with(
        provider, templates, Secrets(**{"prom-auth": secured.auth()}), metric
    )
    assert (result.outcome, result.message) == ("fail", "error-percent 38.61 > 2")
    assert result.value == pytest.approx(38.61)
    # It went to the template's server, not to the analyzer's own Prometheus.
    assert provider.calls == before
    assert resolver.calls == 1
    healthy, _ = judged_with(
        provider, templates, Secrets(**{"prom-auth": secured.auth()}), metric, "frontend-canary"
    )
    assert healthy.outcome == "pass" and healthy.value == pytest.approx(0.2)
    resolver.close()


def test_a_bearer_token_reaches_a_server_behind_a_token_proxy(
    provider: PrometheusProvider, secured: Secured
) -> None:
    templates = Templates()
    templates.add(
        "shop", "error-percent", query=ERROR_PERCENT, address=secured.proxy.url,
        secretRef={"name": "prom-token"},
    )  # fmt: skip
    refused = secured.proxy.refused
    secrets = Secrets(**{"prom-token": {"token": b64(TOKEN + "\n")}})
    result, _ = judged_with(provider, templates, secrets, template_metric())
    assert result.message == "error-percent 38.61 > 2"
    assert secured.proxy.refused == refused
    wrong = Secrets(**{"prom-token": {"token": b64("ey.someone-else")}})
    result, _ = judged_with(provider, templates, wrong, template_metric())
    assert (result.outcome, result.message) == (
        "error",
        "Prometheus query failed: HTTP 401: Unauthorized",
    )
    assert secured.proxy.refused == refused + 1


@pytest.mark.parametrize(
    ("secret", "insecure", "outcome", "fragment"),
    [
        pytest.param("wrong password", False, "error", "Prometheus query failed: HTTP 401: Unauthorized", id="wrong-password"),
        pytest.param("no ca", False, "error", "CERTIFICATE_VERIFY_FAILED", id="untrusted-ca"),
        pytest.param("no ca", True, "fail", "error-percent 38.61 > 2", id="insecure-skip-verify"),
    ],
)  # fmt: skip
@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_wrong_credentials_or_an_untrusted_ca_fail_the_check_never_pass(
    provider: PrometheusProvider, secured: Secured, secret: str, insecure: bool, outcome: str,
    fragment: str,
) -> None:  # fmt: skip
    templates = Templates()
    templates.add(
        "shop", "error-percent", query=ERROR_PERCENT, address=secured.server.url,
        secretRef={"name": "prom-auth"}, insecureSkipVerify=insecure,
    )  # fmt: skip
    data = secured.auth("nope") if secret == "wrong password" else secured.auth(ca=False)
    result, _ = judged_with(provider, templates, Secrets(**{"prom-auth": data}), template_metric())
    assert result.outcome == outcome
    assert fragment in result.message


@pytest.mark.parametrize(
    ("case", "halt"),
    [
        pytest.param(
            "missing",
            "metric error-percent: MetricTemplate error-percent.shop not found",
            id="missing-template",
        ),
        pytest.param(
            "unknown-variable",
            "metric error-percent: MetricTemplate error-percent.shop: unknown placeholder "
            "{{ variables.codes }} (known: interval, name, namespace, target, variables.code)",
            id="unknown-variable",
        ),
        pytest.param(
            "forbidden",
            "metric error-percent: cannot read Secret prom-auth.shop of MetricTemplate "
            "error-percent.shop: Kubernetes API answered 403 Forbidden (the analyzer may read "
            "only the Secrets the chart names in analyzer.secretNames)",
            id="secret-not-granted",
        ),
        pytest.param(
            "no-password",
            "metric error-percent: Secret prom-auth.shop of MetricTemplate error-percent.shop: "
            "it has a username but no password",
            id="secret-without-password",
        ),
    ],
)
def test_a_template_that_cannot_be_used_halts_saying_which_and_sends_no_query(
    provider: PrometheusProvider, secured: Secured, case: str, halt: str
) -> None:
    templates = Templates()
    if case != "missing":
        templates.add(
            "shop", "error-percent", query=ERROR_PERCENT, address=secured.server.url,
            secretRef={"name": "prom-auth"},
        )  # fmt: skip
    secret: dict[str, str] | int = secured.auth()
    if case == "forbidden":
        secret = 403
    elif case == "no-password":
        secret = {"username": b64(USER)}
    metric = template_metric(code="5..") if case == "unknown-variable" else template_metric()
    result, resolver = judged_with(provider, templates, Secrets(**{"prom-auth": secret}), metric)
    assert (result.outcome, result.value, result.message) == ("error", None, halt)
    assert resolver.calls == 0
    spec = parse_spec(
        "service: {port: 9898}\nanalysis:\n  threshold: 3\n  metrics:\n"
        "  - {name: error-percent, templateRef: {name: error-percent}, thresholdRange: {max: 2}}\n"
    )
    assert halt_lines(spec, (result,)) == [f"Halt podinfo.test advancement {halt}"]


def test_a_canary_answering_only_500s_halts_at_0_percent(provider: PrometheusProvider) -> None:
    spec = parse_spec(
        "service: {port: 9898}\nanalysis:\n  threshold: 3\n  metrics:\n"
        "  - {name: request-success-rate, thresholdRange: {min: 99}}\n"
    )
    batcher = MetricBatcher(provider, canaries=lambda ns: ["broken-canary", "frontend-canary"])
    (metric,) = spec.analysis.metrics
    result = batcher.evaluate("shop", spec, metric, target="broken-canary", at=HEALTHY_AT)
    assert halt_lines(spec, (result,)) == ["Halt podinfo.test advancement success rate 0.00% < 99%"]


def halt_lines(spec: CanarySpec, results: tuple[MetricResult, ...]) -> list[str]:
    """The warnings step() emits for a canary at 10 % whose interval has elapsed; it never
    advances on them."""
    begun = analysis_started(initialized(revision="v1-stable", at=T0), revision="v1-new", at=T0)
    status = replace(begun, canary_weight=10, analysed_revision="v1-new")
    ready = Workload(desired=2, ready=2, updated=2, rolled_out=True, revision="v1-new")
    obs = Observations(
        now=T0 + timedelta(minutes=5),
        canary=ready,
        primary=replace(ready, revision="v1-stable"),
        route_weights=(90, 10),
        metrics=results,
    )
    after, actions = step(spec, status, obs, name="podinfo", namespace="test")
    assert after.canary_weight == 10
    assert after.failed_checks == 1
    return [a.message for a in actions if isinstance(a, Event) and a.type == "Warning"]
