"""Streaming accumulation of the harness metrics, fed batch by batch by the bench loop.

Per batch, :meth:`MetricsAccumulator.update` reduces the logits on their device to four per-sample vectors
(prediction, label, confidence, entropy) and copies them to the CPU in one transfer; nothing of size
(N, classes) is kept. :meth:`MetricsAccumulator.summary` computes everything at the end.

Memory (:class:`PeakMemory`): on CUDA, ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats`` (bytes held by tensors at the peak, excluding the caching allocator's reserve).
On CPU, the process's peak resident set size from ``resource.getrusage(RUSAGE_SELF).ru_maxrss``: we report
the absolute peak and its increase during the measured block. The OS keeps only a high-water mark, so the
increase is a lower bound (0 if the block stayed below an earlier peak of the same process); measure in a fresh
process for a clean number. (``tracemalloc`` does not see torch's allocations and is not used.)
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

import numpy as np
import torch

from tta_norm.metrics.functional import (
    calibration_bins,
    expected_calibration_error,
    grouped_error,
    latency_stats,
    online_error_curve,
)


def _max_rss_bytes() -> int | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # bytes on macOS, KiB on Linux


class PeakMemory:
    """Context manager measuring peak memory of a block on ``device`` (see the module docstring)."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.start: int | None = None
        self.result: dict = {}

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            self.start = _max_rss_bytes()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            self.result = {
                "kind": "cuda_max_memory_allocated",
                "peak_bytes": int(peak),
                "delta_bytes": int(peak - (self.start or 0)),
            }
        else:
            peak = _max_rss_bytes()
            self.result = {
                "kind": "cpu_max_rss",
                "peak_bytes": peak,
                "delta_bytes": None if peak is None or self.start is None else int(peak - self.start),
            }


def synchronize(device: torch.device | str | None) -> None:
    """Wait for queued kernels on a CUDA device (no-op on CPU), so that wall-clock timings are honest."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class BatchTimer:
    """``with timer: ...`` records the block's wall time (CUDA-synchronized) into ``timer.times``."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = device
        self.times: list[float] = []
        self._t0 = 0.0

    def __enter__(self) -> BatchTimer:
        synchronize(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        self.times.append(time.perf_counter() - self._t0)

    @property
    def last(self) -> float:
        return self.times[-1]


class MetricsAccumulator:
    """Collects per-sample outcomes and per-batch latencies of one run.

    ``domain_names[d]`` / ``domain_severity[d]`` describe domain id ``d`` (e.g. from
    :meth:`from_plan`); ``clean_domains`` are excluded from the mean over domains."""

    def __init__(
        self,
        domain_names: Sequence[str] | None = None,
        domain_severity: Sequence[int | None] | None = None,
        *,
        segment_names: Sequence[str] | None = None,
        clean_domains: Sequence[int] = (),
        n_bins: int = 15,
    ) -> None:
        if domain_names is not None and domain_severity is not None and len(domain_severity) != len(domain_names):
            raise ValueError(f"{len(domain_names)} domain names but {len(domain_severity)} severities")
        self.domain_names = list(domain_names) if domain_names is not None else None
        self.domain_severity = list(domain_severity) if domain_severity is not None else None
        self.segment_names = list(segment_names) if segment_names is not None else None
        self.clean_domains = set(clean_domains)
        self.n_bins = n_bins
        self._parts: dict[str, list[np.ndarray]] = {
            k: [] for k in ("pred", "label", "conf", "entropy", "domain", "segment")
        }
        self.latencies: list[float] = []
        self.steps_skipped = 0
        self.batches = 0
        self.memory: dict = {}

    @classmethod
    def from_plan(cls, plan, n_bins: int = 15) -> MetricsAccumulator:
        """Accumulator labelled with a :class:`~tta_norm.streams.StreamPlan`'s domains and segments."""
        from tta_norm.streams.plan import CLEAN, domain_name

        return cls(
            [domain_name(k) for k in plan.domains],
            [None if k == CLEAN else int(k[1]) for k in plan.domains],
            segment_names=[s.name for s in plan.segments],
            clean_domains=[d for d, k in enumerate(plan.domains) if k == CLEAN],
            n_bins=n_bins,
        )

    @torch.no_grad()
    def update(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        domain: torch.Tensor | np.ndarray | int | None = None,
        *,
        latency: float | None = None,
        skipped: int = 0,
        segment: int | None = None,
    ) -> None:
        """Add one batch: ``logits`` (B, C) on any device, ``labels`` (B,), ``domain`` ids (B,) or one id,
        the batch's ``latency`` in seconds, the number of adaptation steps the method ``skipped``, and the
        stream ``segment`` index."""
        logits = logits.detach()
        if logits.ndim != 2:
            raise ValueError(f"logits must be (batch, classes), got {tuple(logits.shape)}")
        n, num_classes = logits.shape
        labels = torch.as_tensor(labels, device=logits.device)
        if labels.shape != (n,):
            raise ValueError(f"{n} logits but labels of shape {tuple(labels.shape)}")
        if domain is None:
            dom = np.zeros(n, dtype=np.int64)
        elif isinstance(domain, (int, np.integer)):
            dom = np.full(n, int(domain), dtype=np.int64)
        else:
            dom = np.asarray(domain.cpu() if isinstance(domain, torch.Tensor) else domain, dtype=np.int64)
            if dom.shape != (n,):
                raise ValueError(f"{n} logits but domain ids of shape {dom.shape}")
        if n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(
                f"labels {int(labels.min())}..{int(labels.max())} do not fit the model's {num_classes} outputs "
                "(a model for another dataset?)"
            )
        if not bool(torch.isfinite(logits).all()):
            raise ValueError("logits contain NaN or Inf: their predictions cannot be scored")
        known = self.domain_names if self.domain_names is not None else self.domain_severity
        if n and ((known is not None and not (0 <= dom.min() and dom.max() < len(known))) or dom.min() < 0):
            raise ValueError(f"domain ids {int(dom.min())}..{int(dom.max())} do not name a domain "
                             f"({'0..' + str(len(known) - 1) if known is not None else 'ids are >= 0'})")  # fmt: skip
        if segment is not None and not (
            0 <= int(segment) and (self.segment_names is None or int(segment) < len(self.segment_names))
        ):
            raise ValueError(f"segment {segment} does not name a segment of the stream"
                             + (f" (0..{len(self.segment_names) - 1})" if self.segment_names is not None else ""))
        # every check passed: only now is the batch added (a refused batch leaves the accumulator as it was)
        logp = torch.log_softmax(logits.float(), dim=1)
        conf, pred = logp.max(1)
        ent = -(logp.exp() * logp).sum(1)
        packed = torch.stack([pred.double(), labels.double(), conf.exp().double(), ent.double()]).cpu().numpy()
        self._parts["pred"].append(packed[0].astype(np.int64))
        self._parts["label"].append(packed[1].astype(np.int64))
        self._parts["conf"].append(packed[2])
        self._parts["entropy"].append(packed[3])
        self._parts["domain"].append(dom)
        self._parts["segment"].append(np.full(n, -1 if segment is None else int(segment), dtype=np.int64))
        if latency is not None:
            self.latencies.append(float(latency))
        self.steps_skipped += int(skipped)
        self.batches += 1

    def _cat(self, key: str) -> np.ndarray:
        parts = self._parts[key]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float64 if key == "conf" else np.int64)

    @property
    def correct(self) -> np.ndarray:
        return self._cat("pred") == self._cat("label")

    def __len__(self) -> int:
        return int(sum(len(p) for p in self._parts["pred"]))

    def online_curve(self, points: int | None = 200) -> dict[str, list]:
        """Cumulative error vs number of samples seen, subsampled to about ``points`` positions (all if
        ``None``); always includes the last position."""
        curve = online_error_curve(self.correct)
        if len(curve) == 0:
            return {"samples": [], "error": []}
        if points is None or len(curve) <= points:
            pos = np.arange(len(curve))
        else:
            pos = np.unique(np.r_[np.linspace(0, len(curve) - 1, points).round().astype(np.int64), len(curve) - 1])
        return {"samples": (pos + 1).tolist(), "error": curve[pos].tolist()}

    def summary(self, curve_points: int | None = 200) -> dict:
        """All metrics as a JSON-friendly dict (errors as fractions)."""
        correct = self.correct
        dom = self._cat("domain")
        seg = self._cat("segment")
        conf = self._cat("conf")
        names = self.domain_names
        per_domain = grouped_error(correct, dom, names)
        corrupt_ids = [d for d in np.unique(dom) if int(d) not in self.clean_domains]
        dom_errors = [1.0 - correct[dom == d].mean() for d in corrupt_ids]
        out: dict = {
            "samples": int(len(correct)),
            "batches": self.batches,
            "error": float(1.0 - correct.mean()) if len(correct) else float("nan"),
            "mean_domain_error": float(np.mean(dom_errors)) if dom_errors else float("nan"),
            "per_domain": per_domain,
        }
        if self.domain_severity is not None:
            sev = np.array([-1 if s is None else s for s in self.domain_severity], dtype=np.int64)[dom]
            keep = sev >= 0
            out["per_severity"] = {int(k): v for k, v in grouped_error(correct[keep], sev[keep]).items()}
        if (seg >= 0).any():
            rows = []
            for s in np.unique(seg[seg >= 0]):
                m = seg == s
                name = self.segment_names[s] if self.segment_names is not None else str(int(s))
                rows.append({"segment": int(s), "name": name, "samples": int(m.sum()),
                             "error": float(1.0 - correct[m].mean())})  # fmt: skip
            out["per_segment"] = rows
            if self.clean_domains:
                clean_ids = list(self.clean_domains)
                out["clean_segments"] = [r for r in rows if int(np.unique(dom[seg == r["segment"]])[0]) in clean_ids]
        out["ece"] = expected_calibration_error(conf, correct, self.n_bins) if len(conf) else float("nan")
        out["ece_bins"] = self.n_bins
        out["reliability"] = {k: v.tolist() for k, v in calibration_bins(conf, correct, self.n_bins).items()}
        out["mean_entropy"] = float(self._cat("entropy").mean()) if len(correct) else float("nan")
        out["mean_confidence"] = float(conf.mean()) if len(conf) else float("nan")
        out["latency"] = latency_stats(self.latencies)
        out["steps_skipped"] = self.steps_skipped
        if self.memory:
            out["memory"] = dict(self.memory)
        out["online_error"] = self.online_curve(curve_points)
        return out
