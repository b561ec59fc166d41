"""Metrics of the evaluation harness: pure functions plus a batch-by-batch accumulator."""

from tta_norm.metrics.accumulator import BatchTimer, MetricsAccumulator, PeakMemory, synchronize
from tta_norm.metrics.functional import (
    calibration_bins,
    error_rate,
    expected_calibration_error,
    grouped_error,
    latency_stats,
    mean_entropy,
    online_error_curve,
    predictions,
    softmax_confidence,
    softmax_entropy,
    wilson_interval,
)

__all__ = [
    "BatchTimer",
    "MetricsAccumulator",
    "PeakMemory",
    "calibration_bins",
    "error_rate",
    "expected_calibration_error",
    "grouped_error",
    "latency_stats",
    "mean_entropy",
    "online_error_curve",
    "predictions",
    "softmax_confidence",
    "softmax_entropy",
    "synchronize",
    "wilson_interval",
]
