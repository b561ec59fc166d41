"""Pure metric functions on predictions (numpy or torch inputs; results are Python floats / numpy arrays).

Conventions:

- errors are fractions in [0, 1] (reports multiply by 100);
- confidence = maximum softmax probability; entropy = softmax entropy in nats;
- expected calibration error (Naeini et al. 2015; Guo et al. 2017): ``n_bins`` (default 15) equal-width
  confidence bins ``B_b = ((b-1)/n_bins, b/n_bins]`` for b = 1..n_bins (confidence 0 goes to the first bin),
  ``ECE = sum_b |B_b| / N * |acc(B_b) - conf(B_b)|``, where acc and conf are the bin's mean accuracy and mean
  confidence; empty bins contribute 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch


def _np(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def predictions(logits_or_pred) -> np.ndarray:
    """Class predictions from logits (N, C) or already-predicted labels (N,)."""
    a = _np(logits_or_pred)
    return a.argmax(1) if a.ndim == 2 else a.astype(np.int64)


def error_rate(logits_or_pred, labels) -> float:
    """Fraction of wrong top-1 predictions."""
    pred, y = predictions(logits_or_pred), _np(labels)
    if pred.shape != y.shape:
        raise ValueError(f"predictions {pred.shape} and labels {y.shape} differ in shape")
    if len(y) == 0:
        return float("nan")
    return float((pred != y).mean())


def grouped_error(correct, groups, names: Sequence[str] | None = None) -> dict:
    """Error per group id (``groups[i]`` is sample i's group); keys are ``names[group]`` when given.

    Groups are reported in increasing id order; only groups with samples appear."""
    c, g = _np(correct).astype(bool), _np(groups).astype(np.int64)
    if c.shape != g.shape:
        raise ValueError(f"correct {c.shape} and groups {g.shape} differ in shape")
    out = {}
    for gid in np.unique(g):
        key = names[gid] if names is not None else int(gid)
        out[key] = float(1.0 - c[g == gid].mean())
    return out


def online_error_curve(correct) -> np.ndarray:
    """Cumulative error after each sample: ``curve[t] = mean(1 - correct[:t + 1])``."""
    wrong = 1.0 - _np(correct).astype(np.float64)
    return np.cumsum(wrong) / np.arange(1, len(wrong) + 1)


def softmax_confidence(logits) -> np.ndarray:
    """Maximum softmax probability per sample."""
    t = torch.as_tensor(_np(logits), dtype=torch.float64)
    return torch.softmax(t, dim=1).max(1).values.numpy()


def softmax_entropy(logits) -> np.ndarray:
    """Softmax entropy per sample, in nats."""
    t = torch.as_tensor(_np(logits), dtype=torch.float64)
    logp = torch.log_softmax(t, dim=1)
    return -(logp.exp() * logp).sum(1).numpy()


def mean_entropy(logits) -> float:
    """Mean softmax entropy (nats)."""
    return float(softmax_entropy(logits).mean())


def calibration_bins(confidence, correct, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Per-bin ``count``, mean ``accuracy`` and mean ``confidence`` (NaN for empty bins) and the ``edges``,
    with the binning of the module docstring."""
    conf = _np(confidence).astype(np.float64)
    corr = _np(correct).astype(np.float64)
    if conf.shape != corr.shape:
        raise ValueError(f"confidence {conf.shape} and correct {corr.shape} differ in shape")
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    if len(conf) and (conf.min() < 0 or conf.max() > 1):
        raise ValueError("confidences must lie in [0, 1]")
    b = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(b, minlength=n_bins).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.bincount(b, weights=corr, minlength=n_bins) / count
        mconf = np.bincount(b, weights=conf, minlength=n_bins) / count
    return {"edges": np.linspace(0.0, 1.0, n_bins + 1), "count": count, "accuracy": acc, "confidence": mconf}


def expected_calibration_error(confidence, correct, n_bins: int = 15) -> float:
    """ECE with ``n_bins`` equal-width bins (module docstring). Inputs: confidence in [0, 1], correctness."""
    bins = calibration_bins(confidence, correct, n_bins)
    n = bins["count"].sum()
    if n == 0:
        return float("nan")
    nz = bins["count"] > 0
    gap = np.abs(bins["accuracy"][nz] - bins["confidence"][nz])
    return float((bins["count"][nz] / n * gap).sum())


def latency_stats(seconds) -> dict[str, float]:
    """``median``, ``p95`` (linear interpolation), ``mean`` and ``total`` of per-batch latencies, in ms."""
    s = _np(seconds).astype(np.float64) * 1000.0
    if len(s) == 0:
        return {"median_ms": float("nan"), "p95_ms": float("nan"), "mean_ms": float("nan"), "total_ms": 0.0}
    return {
        "median_ms": float(np.median(s)),
        "p95_ms": float(np.percentile(s, 95)),
        "mean_ms": float(s.mean()),
        "total_ms": float(s.sum()),
    }


def wilson_interval(successes: int, trials: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval of a binomial rate ``successes / trials`` (95 % by default).

    ``(p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)`` (Wilson, JASA 1927): unlike the normal
    approximation it stays inside [0, 1] and is not empty at 0 or n successes.  ``trials == 0`` gives
    ``(0.0, 1.0)``: no evidence either way.
    """
    if trials < 0 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials, got {successes} of {trials}")
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    z2n = z * z / trials
    centre = (p + z2n / 2) / (1 + z2n)
    half = z * math.sqrt(p * (1 - p) / trials + z2n / (4 * trials)) / (1 + z2n)
    lo = 0.0 if successes == 0 else max(0.0, centre - half)  # exact at the ends, where rounding leaves 1e-17
    hi = 1.0 if successes == trials else min(1.0, centre + half)
    return lo, hi
