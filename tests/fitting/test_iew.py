"""The inference-example-weighing sweep on a toy problem where the example's own statistics are what matters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tta_norm
from tta_norm.fitting.iew import default_example_weight, default_grid, evaluate_example_weight, sweep_example_weight


def toy_model() -> nn.Module:
    """BN (population mean 0, var 100) -> ReLU -> logits [0, 5 (r0 - r1)] over the two pixels."""
    bn = nn.BatchNorm2d(1)
    with torch.no_grad():
        bn.running_var.fill_(100.0)
    lin = nn.Linear(2, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.0, 0.0], [5.0, -5.0]]))
        lin.bias.zero_()
    return nn.Sequential(bn, nn.ReLU(), nn.Flatten(), lin).eval()


def toy_data(n: int = 400, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two pixels ``o +- 1`` with a large per-example offset ``o ~ N(0, 10^2)``; label 1 iff pixel 0 is higher.

    Normalising with the example's own statistics removes ``o``; the population statistics do not, and for
    ``o < -1`` both pixels vanish in the ReLU (a tie, predicted as class 0)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    o = 10 * torch.randn(n, generator=g)
    s = torch.where(y == 1, 1.0, -1.0)
    x = torch.stack([o + s, o - s], dim=1).view(n, 1, 1, 2)
    return x, y


def test_default_weight_and_grid():
    assert default_example_weight(128) == 1 / 128
    grid = default_grid(100)
    assert grid[0] == 0.0 and 0.01 in grid and grid[-1] == 0.5 and grid == sorted(grid)
    with pytest.raises(ValueError):
        default_example_weight(0)


def test_sweep_finds_the_best_weight_on_the_toy():
    model = toy_model()
    x, y = toy_data()
    grid = [0.0, 0.25, 0.5, 0.9, 1.0]
    sweep = sweep_example_weight(model, x, y, grid=grid, train_batch_size=4)
    assert sweep.best == 1.0
    assert sweep.error_at(1.0) == 0.0
    assert sweep.error_at(0.0) > 0.15  # about a quarter of the examples are ties at a = 0
    assert sweep.errors[0] >= sweep.errors[2] >= sweep.errors[-1]
    # the reported numbers are those of the preset applied directly
    tta = tta_norm.adapt(model, "iew", example_weight=0.25)
    with torch.no_grad():
        direct = float((tta(x).argmax(1) != y).float().mean())
    assert sweep.error_at(0.25) == pytest.approx(direct)
    assert "(best)" in sweep.table()


def test_ties_are_broken_by_nll_then_closeness_to_default():
    model = toy_model()
    x, y = toy_data(200, seed=1)
    sweep = sweep_example_weight(model, x, y, grid=[0.99, 1.0], train_batch_size=128)
    assert sweep.errors == [0.0, 0.0]
    assert sweep.nll[0] != sweep.nll[1]
    assert sweep.best == (0.99 if sweep.nll[0] < sweep.nll[1] else 1.0)
    by_nll = sweep_example_weight(model, x, y, grid=[0.5, 1.0], criterion="nll")
    assert by_nll.best == [0.5, 1.0][int(by_nll.nll[1] < by_nll.nll[0])]
    flat = toy_model()
    with torch.no_grad():
        flat[3].weight.zero_()  # constant logits: every weight has the same error and NLL
    tie = sweep_example_weight(flat, x, y, grid=[0.0, 1 / 256, 1 / 16, 0.5], train_batch_size=32)
    assert len(set(tie.errors)) == 1 and len(set(tie.nll)) == 1
    assert tie.best == 1 / 16  # nearest to 1/32 on a log scale (1/256 is 3 octaves away, 1/16 one)


def test_evaluate_accepts_batches_of_any_size():
    model = toy_model()
    x, y = toy_data(50)
    assert evaluate_example_weight(model, x, y, 0.5, batch_size=7) == pytest.approx(
        evaluate_example_weight(model, x, y, 0.5, batch_size=50)
    )


def test_bad_grid():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sweep_example_weight(toy_model(), *toy_data(10), grid=[1.5])
