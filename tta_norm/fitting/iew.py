"""Choose the inference-example-weighing weight of a model by a 1-D sweep on held-out source data.

Inference example weighing (Summers & Dinneen, "Four Things Everyone Should Know to Improve Batch
Normalization", ICLR 2020; preset ``iew``) mixes each example's own statistics into the population statistics
with weight ``a`` (``NormSpec.example_weight``) by the mixture rule.  During training an example contributes
``1 / B_train`` to its own statistics, so ``a = 1 / B_train`` is the natural default
(:func:`default_example_weight`); the paper tunes ``a`` post hoc on held-out data with a cheap sweep and no
retraining, which :func:`sweep_example_weight` does.

Our choices: the default grid is ``{0} U {2^-k, k = 1..10} U {1 / B_train}``; the selected weight minimises the
held-out top-1 error, ties broken by the lower mean cross-entropy (NLL) and then by the closeness to
``1 / B_train`` on a log scale (``criterion="nll"`` minimises the NLL instead).  ``a`` does not depend on the
test batch (per-example statistics and fixed population statistics), so the evaluation batch size only
affects speed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tta_norm.device import resolve_device
from tta_norm.fitting._data import ImageArray, as_image_tensor, as_labels, to_model_input


def default_example_weight(train_batch_size: int) -> float:
    """``1 / B_train``: the weight an example had in its own normalisation statistics during training."""
    if train_batch_size < 1:
        raise ValueError(f"train_batch_size must be >= 1, got {train_batch_size}")
    return 1.0 / train_batch_size


def default_grid(train_batch_size: int = 128) -> list[float]:
    """``{0} U {2^-k, k = 1..10} U {1 / B_train}``, sorted."""
    return sorted({0.0, *(2.0**-k for k in range(1, 11)), default_example_weight(train_batch_size)})


@dataclass
class IEWSweep:
    """The sweep's grid, held-out error and NLL per grid point, the selected weight and the 1/B_train default."""

    grid: list[float]
    errors: list[float]
    nll: list[float]
    best: float
    default: float
    criterion: str

    def error_at(self, a: float) -> float:
        return self.errors[self.grid.index(a)]

    def table(self) -> str:
        rows = ["| a | error % | NLL |", "|---|---|---|"]
        for a, e, n in zip(self.grid, self.errors, self.nll, strict=True):
            mark = " (best)" if a == self.best else (" (1/B_train)" if a == self.default else "")
            rows.append(f"| {a:.5g}{mark} | {100 * e:.2f} | {n:.4f} |")
        return "\n".join(rows)


@torch.no_grad()
def evaluate_example_weight(
    model: nn.Module,
    images: ImageArray,
    labels: Tensor | Sequence[int],
    example_weight: float,
    *,
    batch_size: int = 200,
    device: torch.device | str | None = None,
    preset: str = "iew",
) -> tuple[float, float]:
    """Top-1 error and mean cross-entropy of ``adapt(model, preset, example_weight=a)`` on the data."""
    import tta_norm

    device = resolve_device(device, model)
    images = as_image_tensor(images)
    y_all = as_labels(labels, len(images))
    tta = tta_norm.adapt(model, preset, device=device, example_weight=float(example_weight))
    wrong, nll = 0, 0.0
    for lo in range(0, len(images), batch_size):
        x = to_model_input(images[lo : lo + batch_size], device)
        y = y_all[lo : lo + batch_size].to(device)
        logits = tta(x).float()
        wrong += int((logits.argmax(1) != y).sum())
        nll += float(F.cross_entropy(logits, y, reduction="sum"))
    return wrong / len(images), nll / len(images)


def sweep_example_weight(
    model: nn.Module,
    images: ImageArray,
    labels: Tensor | Sequence[int],
    *,
    grid: Sequence[float] | None = None,
    train_batch_size: int = 128,
    criterion: Literal["error", "nll"] = "error",
    batch_size: int = 200,
    device: torch.device | str | None = None,
    preset: str = "iew",
    progress: bool = False,
) -> IEWSweep:
    """Sweep ``example_weight`` over ``grid`` (default :func:`default_grid`) on held-out source data.

    ``images``: uint8 NHWC or float NCHW in [0, 1] (held out from the data the model was trained on).  Returns an
    :class:`IEWSweep`; use ``tta_norm.adapt(model, "iew", example_weight=sweep.best)``."""
    from tqdm.auto import tqdm

    if criterion not in ("error", "nll"):
        raise ValueError(f"criterion must be 'error' or 'nll', got {criterion!r}")
    grid = sorted({float(a) for a in (grid if grid is not None else default_grid(train_batch_size))})
    bad = [a for a in grid if not 0.0 <= a <= 1.0]
    if bad or not grid:
        raise ValueError(f"example weights must be in [0, 1], got {bad or grid}")
    default = default_example_weight(train_batch_size)
    errors, nlls = [], []
    for a in tqdm(grid, desc="iew sweep", disable=not progress):
        e, n = evaluate_example_weight(model, images, labels, a, batch_size=batch_size, device=device, preset=preset)
        errors.append(e)
        nlls.append(n)

    def closeness(a: float) -> float:
        return abs(math.log(max(a, 1e-12)) - math.log(default))

    if criterion == "error":
        key = [(errors[i], nlls[i], closeness(a)) for i, a in enumerate(grid)]
    else:
        key = [(nlls[i], errors[i], closeness(a)) for i, a in enumerate(grid)]
    best = grid[min(range(len(grid)), key=key.__getitem__)]
    return IEWSweep(grid, errors, nlls, best, default, criterion)
