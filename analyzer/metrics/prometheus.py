"""The Prometheus metric provider, through prometheus-api-client's ``custom_query``.

Every query is bounded: one attempt (the client's default retries three times with back-off,
which would hold a tick for tens of seconds while Prometheus is down) and a connect and read
timeout of ``timeout_seconds`` (5 s by default, as Flagger), which Prometheus is also given as
its own evaluation timeout. The read timeout bounds each wait for bytes, not the whole answer: a
server trickling a byte every few seconds could hold a query longer, which Prometheus does not
do. Whatever goes wrong on the way (refused connection, timeout, HTTP error, a malformed answer)
becomes an "error" result with "Prometheus query failed: <reason>", never an exception and never
a pass.

Builtin checks for several targets in one namespace go out as one batched query (see
:mod:`analyzer.metrics.queries`); custom queries are rendered and sent per target, because a
user's PromQL cannot be rewritten safely to aggregate by target.
"""

from __future__ import annotations

import ast
import contextlib
import json
import logging
import math
import os
import re
import tempfile
import threading
import weakref
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, cast

import requests
from prometheus_api_client import PrometheusConnect
from prometheus_api_client.exceptions import PrometheusApiClientException
from urllib3.util.retry import Retry

from analyzer.metrics.base import DEFAULT_TIMEOUT_SECONDS, ProviderSettings, register_provider
from analyzer.metrics.judge import judge, judge_relative, no_data, query_failed
from analyzer.metrics.queries import (
    QUERY_SETS,
    QuerySetName,
    TemplateError,
    builtin_query,
    render_template,
)
from analyzer.model import MetricResult
from perch.names import CANARY_SUFFIX
from perch.spec import Metric

__all__ = ["PrometheusProvider", "QueryError"]

_LOG = logging.getLogger(__name__)

# A measured value in the metric's unit, or the result that replaces it (no-data, error).
Measurement = float | MetricResult


class QueryError(Exception):
    """A query Prometheus did not answer usefully; ``str()`` is the reason for the message."""


class PrometheusProvider:
    """Evaluates metric checks against one Prometheus server.

    Shared by the analyzer's concurrent ticks: the call counter is locked, and requests' Session
    hands each thread its own pooled connection.
    """

    type = "prometheus"

    def __init__(
        self,
        url: str,
        *,
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
        headers: Mapping[str, str] | None = None,
        verify_tls: bool = True,
        ca_bundle: str | None = None,
    ) -> None:
        if not timeout_seconds > 0:
            raise ValueError(f"timeout_seconds must be more than 0, got {timeout_seconds!r}")
        self.url = url.rstrip("/")
        self.timeout_seconds = timeout_seconds
        session = requests.Session()
        self._ca_file: str | None = None
        if verify_tls and ca_bundle:
            # requests verifies against a file: the bundle (certificates, nothing secret) is
            # written to a private temporary file that close() removes.
            descriptor, self._ca_file = tempfile.mkstemp(prefix="perch-ca-", suffix=".pem")
            with os.fdopen(descriptor, "w") as out:
                out.write(ca_bundle)
            # A provider dropped without close() (a replaced template's) removes it too.
            self._ca_cleanup = weakref.finalize(self, _remove_file, self._ca_file)
            session.verify = self._ca_file
        else:
            session.verify = verify_tls
        self._client = PrometheusConnect(
            url=self.url,
            headers=dict(headers) if headers else None,
            session=session,
            # One attempt. read=False re-raises a read timeout as itself, so requests reports a
            # ReadTimeout rather than a generic ConnectionError from exhausted retries.
            retry=Retry(total=0, read=False),
        )
        self._calls = 0
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: ProviderSettings) -> PrometheusProvider:
        return cls(
            settings.address,
            timeout_seconds=settings.timeout_seconds,
            headers=settings.headers,
            verify_tls=settings.verify_tls,
            ca_bundle=settings.ca_bundle,
        )

    @property
    def calls(self) -> int:
        with self._lock:
            return self._calls

    def close(self) -> None:
        self._client.close()
        if self._ca_file is not None:
            self._ca_cleanup()
            self._ca_file = None

    # -- raw queries -------------------------------------------------------------------------

    def query(self, promql: str, *, at: datetime | None = None) -> list[Any]:
        """Send one instant query; the raw ``data.result``. Raises :class:`QueryError`."""
        # Prometheus stops evaluating at the same deadline, so an expensive query does not run on
        # after the analyzer has given up on it.
        params: dict[str, str] = {"timeout": f"{self.timeout_seconds:g}"}
        if at is not None:
            if at.tzinfo is None:
                # A naive time would be read as the analyzer's local time: refuse the ambiguity.
                raise ValueError("at must be timezone-aware")
            params["time"] = f"{at.timestamp():.3f}"
        with self._lock:
            self._calls += 1
        _LOG.debug("prometheus query at=%s: %s", params.get("time", "now"), promql)
        try:
            # The library annotates timeout as int; requests takes any number of seconds, and a
            # (connect, read) pair bounds both the handshake and the wait for an answer.
            timeout = cast(int, (self.timeout_seconds, self.timeout_seconds))
            result = self._client.custom_query(promql, params=params, timeout=timeout)
        except requests.Timeout:
            raise QueryError(f"timeout after {self.timeout_seconds:g}s ({self.url})") from None
        except requests.JSONDecodeError:
            # A 200 that is not Prometheus's JSON (a proxy's or a login page).
            raise QueryError(f"malformed answer from {self.url}: not JSON") from None
        except requests.ConnectionError as error:
            raise QueryError(f"cannot connect to {self.url}: {_root_cause(error)}") from None
        except requests.RequestException as error:
            raise QueryError(f"{type(error).__name__}: {_root_cause(error)}") from None
        except PrometheusApiClientException as error:
            raise QueryError(_http_error(str(error))) from None
        except (ValueError, KeyError, TypeError) as error:
            # JSON without data.result.
            raise QueryError(f"malformed answer from {self.url}: {error}") from None
        if not isinstance(result, list):
            raise QueryError(f"malformed answer from {self.url}: result is not a list")
        return result

    # -- measuring ---------------------------------------------------------------------------

    def measure(
        self,
        namespace: str,
        metric: Metric,
        targets: Sequence[str],
        *,
        at: datetime | None = None,
        query_set: QuerySetName = "istio",
        template: str | None = None,
    ) -> dict[str, Measurement]:
        """The metric's value per target, in its unit, unjudged; or the no-data/error result.

        One query for a builtin whatever the number of targets; one per target for a custom
        query. Targets keep their order; duplicates are measured once.
        """
        unique = tuple(dict.fromkeys(targets))
        if not unique:
            return {}
        if metric.builtin is not None:
            return self._measure_builtin(namespace, metric, unique, at=at, query_set=query_set)
        text = metric.query if metric.query is not None else template
        if text is None:
            ref = metric.template_ref
            where = f"{ref.name}.{ref.namespace or namespace}" if ref else "(none)"
            failure = MetricResult(
                name=metric.name,
                outcome="error",
                value=None,
                message=f"metric {metric.name}: MetricTemplate {where} is not available",
            )
            return dict.fromkeys(unique, failure)
        return {
            target: self._measure_custom(namespace, metric, target, text=text, at=at)
            for target in unique
        }

    def _measure_builtin(
        self,
        namespace: str,
        metric: Metric,
        targets: tuple[str, ...],
        *,
        at: datetime | None,
        query_set: QuerySetName,
    ) -> dict[str, Measurement]:
        assert metric.builtin is not None
        query = builtin_query(
            metric.builtin,
            namespace=namespace,
            targets=targets,
            interval=metric.interval,
            histogram_unit=metric.histogram_unit,
            query_set=QUERY_SETS[query_set],
        )
        try:
            series = self.query(query.promql, at=at)
            if query.target_label is None:
                values = {targets[0]: _single_value(series)}
            else:
                values = _values_by_label(series, query.target_label, targets)
        except QueryError as error:
            return dict.fromkeys(targets, query_failed(metric.name, str(error)))
        return {target: _scaled(values.get(target), query.scale, metric.name) for target in targets}

    def _measure_custom(
        self,
        namespace: str,
        metric: Metric,
        target: str,
        *,
        text: str,
        at: datetime | None,
    ) -> Measurement:
        try:
            promql = render_template(
                text,
                namespace=namespace,
                target=target,
                interval=metric.interval,
                name=target.removesuffix(CANARY_SUFFIX),
                variables=metric.template_variables,
            )
        except TemplateError as error:
            return MetricResult(
                name=metric.name,
                outcome="error",
                value=None,
                message=f"metric {metric.name}: cannot render its query: {error}",
            )
        try:
            value = _single_value(self.query(promql, at=at))
        except QueryError as error:
            return query_failed(metric.name, str(error))
        return _scaled(value, 1.0, metric.name)

    # -- judging -----------------------------------------------------------------------------

    def evaluate(
        self,
        namespace: str,
        metric: Metric,
        targets: Sequence[str],
        *,
        at: datetime | None = None,
        query_set: QuerySetName = "istio",
        template: str | None = None,
    ) -> dict[str, MetricResult]:
        """Judge the metric's thresholdRange for every target: ``{target: result}``."""
        measured = self.measure(
            namespace, metric, targets, at=at, query_set=query_set, template=template
        )
        return {
            target: value if isinstance(value, MetricResult) else judge(metric, value)
            for target, value in measured.items()
        }

    def evaluate_one(
        self,
        namespace: str,
        metric: Metric,
        target: str,
        *,
        at: datetime | None = None,
        query_set: QuerySetName = "istio",
        template: str | None = None,
    ) -> MetricResult:
        """:meth:`evaluate` for a single target."""
        results = self.evaluate(
            namespace, metric, [target], at=at, query_set=query_set, template=template
        )
        return results[target]

    def compare(
        self,
        namespace: str,
        metric: Metric,
        *,
        canary: str,
        primary: str,
        max_delta: float | None = None,
        max_ratio: float | None = None,
        at: datetime | None = None,
        query_set: QuerySetName = "istio",
        template: str | None = None,
    ) -> MetricResult:
        """Judge the canary against the primary over the same window (see ``judge_relative``).

        A builtin costs one query for both; a custom query one each.
        """
        measured = self.measure(
            namespace, metric, [canary, primary], at=at, query_set=query_set, template=template
        )
        canary_value, primary_value = measured[canary], measured[primary]
        if isinstance(canary_value, MetricResult):
            return canary_value
        if isinstance(primary_value, MetricResult):
            if primary_value.outcome == "no-data":
                return no_data(metric.name, of="primary")
            return primary_value
        return judge_relative(
            canary_value,
            primary_value,
            metric=metric,
            max_delta=max_delta,
            max_ratio=max_ratio,
        )


register_provider("prometheus", PrometheusProvider.from_settings)


def _remove_file(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


# --------------------------------------------------------------------------------------------
# Reading answers
# --------------------------------------------------------------------------------------------


def _sample_value(sample: object) -> float:
    # A sample is [timestamp, "value"]; Prometheus writes NaN and ±Inf as "NaN", "+Inf", "-Inf",
    # which float() reads.
    if not isinstance(sample, list | tuple) or len(sample) != 2:
        raise QueryError(f"malformed sample {sample!r}")
    try:
        return float(sample[1])
    except (TypeError, ValueError):
        raise QueryError(f"the query returned {sample[1]!r}, not a number") from None


def _is_scalar(result: list[Any]) -> bool:
    return len(result) == 2 and not isinstance(result[0], dict)


def _single_value(result: list[Any]) -> float | None:
    """The value of a query meant to return one number: None when it returned nothing."""
    if _is_scalar(result):
        return _sample_value(result)
    if not result:
        return None
    if len(result) > 1:
        # Flagger silently takes the last series; which one that is depends on Prometheus's
        # order, so a check would pass or fail by accident.
        raise QueryError(
            f"the query returned {len(result)} series, expected one: aggregate it "
            "(e.g. with sum(...))"
        )
    series = result[0]
    if not isinstance(series, dict):
        raise QueryError(f"malformed series {series!r}")
    return _sample_value(series.get("value"))


def _values_by_label(
    result: list[Any], label: str, targets: tuple[str, ...]
) -> dict[str, float | None]:
    values: dict[str, float | None] = {}
    wanted = set(targets)
    for series in result:
        if not isinstance(series, dict) or not isinstance(series.get("metric"), dict):
            raise QueryError(f"malformed series {series!r}")
        target = series["metric"].get(label)
        if target in wanted:
            values[target] = _sample_value(series.get("value"))
    return values


def _scaled(value: float | None, scale: float, name: str) -> Measurement:
    # NaN is what a ratio or a quantile over a window without requests gives: no data.
    if value is None or not math.isfinite(value):
        return no_data(name)
    return value * scale


# prometheus-api-client raises "HTTP Status Code 400 (b'<body>')" with the body's repr.
_HTTP_ERROR = re.compile(r"HTTP Status Code (\d+) \((b(?:'.*'|\".*\"))\)", re.DOTALL)
_MAX_REASON = 300


def _http_error(text: str) -> str:
    """'HTTP 400: <Prometheus's error>' from the client's exception text."""
    match = _HTTP_ERROR.fullmatch(text)
    if match is None:
        return text[:_MAX_REASON]
    try:
        # literal_eval only reads literals: the repr of the body the client quoted.
        body = ast.literal_eval(match.group(2))
    except (ValueError, SyntaxError):
        body = b""
    text_body = body.decode("utf-8", "replace").strip() if isinstance(body, bytes) else ""
    try:
        reason = str(json.loads(text_body)["error"])
    except (ValueError, TypeError, KeyError):
        # Not Prometheus's JSON (a proxy in between): its text, if any.
        reason = " ".join(text_body.split())
    if not reason:
        return f"HTTP {match.group(1)}"
    if len(reason) > _MAX_REASON:
        reason = reason[:_MAX_REASON] + "…"
    return f"HTTP {match.group(1)}: {reason}"


def _root_cause(error: BaseException) -> str:
    """The innermost OS error ("Connection refused") rather than urllib3's wrapper chain."""
    seen: set[int] = set()
    stack: list[BaseException] = [error]
    found: OSError | None = None
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.strerror:
            found = current
        stack.extend(arg for arg in current.args if isinstance(arg, BaseException))
        for linked in (current.__cause__, current.__context__):
            if linked is not None:
                stack.append(linked)
        reason = getattr(current, "reason", None)
        if isinstance(reason, BaseException):
            stack.append(reason)
    if found is not None:
        return str(found.strerror)
    return str(error)
