"""Flagger's early form of the spec, as the seed article wrote it, read with its original meaning.

The early form differs from the current one in three places, and a spec pasted from the article
must mean exactly what it meant there:

* ``canaryAnalysis`` instead of ``analysis`` (the same fields);
* each metric with a single ``threshold`` instead of ``thresholdRange``: a minimum in percent for
  the success rate, a maximum for everything else (for the latency histograms, in milliseconds);
* the metric names ``istio_requests_total`` and ``istio_request_duration_seconds_bucket`` (or the
  ``milliseconds`` one) for the builtin checks ``request-success-rate`` and ``request-duration``.
  The histogram named is kept (:attr:`Metric.histogram_unit`): the analyzer must query the series
  that Istio exports, and the seed's Istio exported the seconds one.

(Webhooks without ``type``, also the article's, are rollout gates in both forms.)

The early form is normalised to the current one, and kubectl is told how it was read, through the
notes below, which become admission warnings. :attr:`CanarySpec.form` records which form was
written.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from perch.spec.result import ThresholdRange
from perch.spec.vocabulary import DEFAULT_HISTOGRAM_UNIT, BuiltinMetric, HistogramUnit

__all__ = [
    "BOTH_FORMS",
    "CANARY_ANALYSIS_NOTE",
    "EARLY_METRIC_NAMES",
    "THRESHOLD_AND_RANGE",
    "builtin_metric",
    "threshold_note",
    "threshold_range",
]

# The early form's metric names, normalised to the builtins; the histogram unit is kept.
EARLY_METRIC_NAMES: Final[Mapping[str, tuple[BuiltinMetric, HistogramUnit | None]]] = {
    "istio_requests_total": ("request-success-rate", None),
    "istio_request_duration_seconds_bucket": ("request-duration", "seconds"),
    "istio_request_duration_milliseconds_bucket": ("request-duration", "milliseconds"),
}
_METRIC_NAMES: Final[Mapping[str, tuple[BuiltinMetric, HistogramUnit | None]]] = {
    "request-success-rate": ("request-success-rate", None),
    "request-duration": ("request-duration", DEFAULT_HISTOGRAM_UNIT),
    **EARLY_METRIC_NAMES,
}

BOTH_FORMS: Final = "give either analysis or canaryAnalysis (Flagger's early name for it), not both"
THRESHOLD_AND_RANGE: Final = (
    "give either threshold (Flagger's early form) or thresholdRange, not both"
)
CANARY_ANALYSIS_NOTE: Final = (
    "perch.dev/spec: canaryAnalysis is Flagger's early name for analysis and is read as analysis"
)


def builtin_metric(name: str) -> tuple[BuiltinMetric, HistogramUnit | None] | None:
    """The builtin check a metric name (current or early) stands for, and its histogram."""
    return _METRIC_NAMES.get(name)


def threshold_range(threshold: float, builtin: BuiltinMetric | None) -> ThresholdRange:
    """Flagger's early single threshold: a minimum success rate, otherwise a maximum."""
    if builtin == "request-success-rate":
        return ThresholdRange(min=threshold)
    return ThresholdRange(max=threshold)


def threshold_note(path: str) -> str:
    """The note for an early threshold on a custom metric, where min or max is not obvious."""
    return f"perch.dev/spec: {path} is read as thresholdRange.max"
