"""A metric check of the analysis: a builtin or your own, its accepted range, the primary.

A metric is judged by its ``thresholdRange`` (or the early ``threshold``, :mod:`perch.spec.early`),
by ``primary`` (beyond Flagger: against the primary over the same window), or by both. A builtin
(``request-success-rate``, ``request-duration``, or an early name for them) has Perch's query and
unit; a metric of your own has a ``query`` or a ``templateRef`` to a MetricTemplate.
"""

from __future__ import annotations

import json
import re
from typing import Annotated

from pydantic import Field, model_validator

from perch.spec import early
from perch.spec.base import SpecModel, documented_default
from perch.spec.messages import Refusal, one_of, short
from perch.spec.result import (
    EMPTY,
    CrossNamespaceRef,
    FrozenDict,
    Metric,
    PrimaryComparison,
    ThresholdRange,
)
from perch.spec.values import (
    DNS_LABEL,
    DNS_SUBDOMAIN,
    Choice,
    Duration,
    DurationValue,
    Number,
    String,
    StringMap,
)
from perch.spec.vocabulary import (
    BUILTIN_METRICS,
    DEFAULT_METRIC_INTERVAL,
    DEFAULT_ON_NO_DATA,
    NO_DATA_POLICIES,
    BuiltinMetric,
    HistogramUnit,
    NoDataPolicy,
)

__all__ = ["MetricModel", "RefModel"]

# A templateVariables key, as a query template can name it: {{ variables.<key> }}.
_TEMPLATE_VARIABLE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_NEEDS_THRESHOLD = (
    "a metric needs thresholdRange (min or max), primary (maxDelta or maxRatio) to judge it "
    "against the primary, or both"
)


class RefModel(SpecModel):
    """A reference by name, in the Deployment's namespace unless ``namespace`` is given."""

    name: Annotated[str, String(DNS_SUBDOMAIN)] = Field(description="The object's name.")
    namespace: Annotated[str | None, String(DNS_LABEL)] = Field(
        None, description="Its namespace; default the Deployment's."
    )

    def result(self) -> CrossNamespaceRef:
        return CrossNamespaceRef(name=self.name, namespace=self.namespace)


class ThresholdRangeModel(SpecModel):
    """Accepted values of the metric, bounds inclusive."""

    min: Annotated[float | None, Number()] = Field(
        None, description="The lowest accepted value (inclusive)."
    )
    max: Annotated[float | None, Number()] = Field(
        None, description="The highest accepted value (inclusive)."
    )


class PrimaryModel(SpecModel):
    """How much worse than the primary's, over the same window, the canary's value may be; with
    both limits, both must hold."""

    maxDelta: Annotated[float | None, Number(minimum=0)] = Field(
        None,
        description=(
            "How much worse than the primary's value the canary's may be, in the metric's "
            "unit (request-success-rate: points of error rate)."
        ),
    )
    maxRatio: Annotated[float | None, Number(minimum=0)] = Field(
        None,
        description=(
            "How many times the primary's value the canary's may be (request-success-rate: of "
            "its error rate)."
        ),
    )

    @model_validator(mode="after")
    def _a_limit(self) -> PrimaryModel:
        if self.maxDelta is None and self.maxRatio is None:
            raise Refusal(
                "give maxDelta (how much worse than the primary, in the metric's unit), maxRatio "
                "(how many times the primary's value), or both"
            )
        return self


class MetricModel(SpecModel):
    """One metric check."""

    name: Annotated[str, String()] = Field(
        description=(
            "A builtin check (request-success-rate, request-duration) or, with query or "
            "templateRef, the name of your own."
        )
    )
    interval: Annotated[Duration | None, DurationValue()] = documented_default(
        DEFAULT_METRIC_INTERVAL,
        description="The window the metric is computed over ({{ interval }} in a query).",
    )
    thresholdRange: ThresholdRangeModel | None = Field(
        None,
        description=(
            "Accepted values, bounds inclusive: percent for request-success-rate, "
            "milliseconds for request-duration, the query's unit otherwise."
        ),
    )
    threshold: Annotated[float | None, Number()] = Field(
        None,
        json_schema_extra={"deprecated": True},
        description=(
            "Flagger's early form of thresholdRange: a minimum for the success rate, "
            "otherwise a maximum."
        ),
    )
    query: Annotated[str | None, String()] = Field(
        None, description="A PromQL query for a metric of your own."
    )
    templateRef: RefModel | None = Field(
        None,
        description="A MetricTemplate whose query is sent to its Prometheus-compatible server.",
    )
    templateVariables: Annotated[FrozenDict[str] | None, StringMap()] = Field(
        None,
        description=(
            "String values for {{ variables.<key> }} in the template's (or the query's) text."
        ),
    )
    primary: PrimaryModel | None = Field(
        None, description="Also judge the canary against the primary over the same window."
    )
    onNoData: Annotated[NoDataPolicy, Choice(NO_DATA_POLICIES, "onNoData policy")] = Field(
        DEFAULT_ON_NO_DATA,
        description=(
            "What a window without data means: a failed check, a pass, or no verdict (skip)."
        ),
    )

    def builtin(self) -> tuple[BuiltinMetric, HistogramUnit | None] | None:
        if self.query is not None or self.templateRef is not None:
            return None
        return early.builtin_metric(self.name)

    @model_validator(mode="after")
    def _consistent(self) -> MetricModel:
        if self.query is not None and self.templateRef is not None:
            raise Refusal("give either query or templateRef, not both", "query")
        builtin = self.builtin()
        if builtin is None and self.query is None and self.templateRef is None:
            reason = one_of(self.name, BUILTIN_METRICS, "builtin metric")
            raise Refusal(reason + "; for a custom metric give query or templateRef", "name")
        if self.threshold is not None and self.thresholdRange is not None:
            raise Refusal(early.THRESHOLD_AND_RANGE, "threshold")
        self._check_range(self.threshold_range(), None if builtin is None else builtin[0])
        if self.templateVariables:
            if builtin is not None:
                raise Refusal(
                    "templateVariables only apply to a metric with templateRef or query, not to "
                    f"the builtin {builtin[0]}",
                    "templateVariables",
                )
            for key in self.templateVariables:
                if not _TEMPLATE_VARIABLE.fullmatch(key):
                    raise Refusal(
                        f"{json.dumps(short(key))} cannot be named in a query as "
                        "{{ variables.<key> }}: use letters, digits, '_', '-' and '.'",
                        "templateVariables",
                        key,
                    )
        return self

    def _check_range(self, bounds: ThresholdRange, builtin: BuiltinMetric | None) -> None:
        where = "thresholdRange" if self.threshold is None else "threshold"
        low, high = bounds.min, bounds.max
        if low is None and high is None:
            if self.thresholdRange is not None and self.primary is not None:
                # Written but empty: a mistake, not a request for the comparison alone.
                raise Refusal(
                    "thresholdRange needs min or max; leave it out to judge the metric against "
                    "the primary alone",
                    where,
                )
            if self.primary is None:
                raise Refusal(_NEEDS_THRESHOLD, where)
        if low is not None and high is not None and low > high:
            raise Refusal(f"min {low:g} is more than max {high:g}", where)
        if builtin == "request-success-rate" and any(
            bound is not None and not 0 <= bound <= 100 for bound in (low, high)
        ):
            raise Refusal("a success rate is a percentage from 0 to 100", where)
        if builtin == "request-duration" and any(
            bound is not None and bound < 0 for bound in (low, high)
        ):
            raise Refusal("a duration in milliseconds cannot be negative", where)

    def threshold_range(self) -> ThresholdRange:
        if self.threshold is not None:
            builtin = self.builtin()
            return early.threshold_range(self.threshold, None if builtin is None else builtin[0])
        if self.thresholdRange is not None:
            return ThresholdRange(min=self.thresholdRange.min, max=self.thresholdRange.max)
        return ThresholdRange()

    def result(self, path: str, warnings: list[str]) -> Metric:
        builtin, unit = self.builtin() or (None, None)
        if self.threshold is not None and builtin is None:
            warnings.append(early.threshold_note(f"{path}.threshold"))
        interval = self.interval or Duration.of(DEFAULT_METRIC_INTERVAL)
        return Metric(
            name=builtin or self.name,
            threshold_range=self.threshold_range(),
            interval=interval.text,
            interval_seconds=interval.seconds,
            builtin=builtin,
            histogram_unit=unit,
            query=self.query,
            template_ref=None if self.templateRef is None else self.templateRef.result(),
            template_variables=self.templateVariables or EMPTY,
            primary=None
            if self.primary is None
            else PrimaryComparison(
                max_delta=self.primary.maxDelta, max_ratio=self.primary.maxRatio
            ),
            on_no_data=self.onNoData,
        )
