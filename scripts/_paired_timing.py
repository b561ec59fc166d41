"""Paired timing for the speed scripts: every timing of a variant is divided by a timing of the plain forward
taken right before it, and the figure is the median over rounds of these ratios (the machine's speed drifts by
10-25 % over minutes; adjacent pairs cancel most of that)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

CLOCKS: dict[str, Callable[[], float]] = {"process": time.process_time, "wall": time.perf_counter}


def time_call(
    fn: Callable[[torch.Tensor], object], x: torch.Tensor, inner: int, grad: bool, clock: Callable[[], float]
) -> float:
    """Seconds per call of ``fn(x)``, averaged over ``inner`` calls, with autograd on or off."""
    with torch.set_grad_enabled(grad):
        start = clock()
        for _ in range(inner):
            fn(x)
        return (clock() - start) / inner


def paired_medians(
    fns: dict[str, Callable[[torch.Tensor], object]],
    x: torch.Tensor,
    *,
    inner: int,
    rounds: int,
    clock: Callable[[], float],
    grad_keys: tuple[str, ...] = ("tent",),
) -> tuple[dict[str, float], dict[str, float]]:
    """``(median seconds per call, median paired ratio to fns["plain"])`` of every variant in ``fns``."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    ratios: dict[str, list[float]] = {k: [] for k in fns if k != "plain"}
    for _ in range(rounds):
        for key, fn in fns.items():
            if key == "plain":
                continue
            reference = time_call(fns["plain"], x, inner, False, clock)
            t = time_call(fn, x, inner, key in grad_keys, clock)
            samples["plain"].append(reference)
            samples[key].append(t)
            ratios[key].append(t / reference)
    return {k: statistics.median(v) for k, v in samples.items()}, {k: statistics.median(v) for k, v in ratios.items()}
