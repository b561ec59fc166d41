"""The shared training loop and the batch augmentation in both layouts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tta_norm.training import augment_batch, fit, lr_at


def _problem(n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 3, generator=g), torch.randint(0, 2, (n,), generator=g)
    return x, y


def test_fit_equals_a_hand_written_loop():
    x, y = _problem()
    torch.manual_seed(0)
    model, ref = nn.Linear(3, 2), nn.Linear(3, 2)
    ref.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    seen = []

    def loss_fn(idx):
        seen.append(idx.clone())
        return F.cross_entropy(model(x[idx]), y[idx])

    result = fit(opt, loss_fn, n=10, batch_size=4, epochs=2, generator=torch.Generator().manual_seed(3),
                 lr=lambda step, total: lr_at(step, total, 1, 0.1), progress=False)  # fmt: skip
    assert result.steps == result.total == 6 and not result.stopped_early  # ceil(10 / 4) = 3 per epoch
    assert [len(i) for i in seen] == [4, 4, 2] * 2
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    g, step = torch.Generator().manual_seed(3), 0
    for _ in range(2):
        perm = torch.randperm(10, generator=g)
        for i in range(0, 10, 4):
            idx = perm[i : i + 4]
            for group in ref_opt.param_groups:
                group["lr"] = lr_at(step, 6, 1, 0.1)
            ref_opt.zero_grad()
            F.cross_entropy(ref(x[idx]), y[idx]).backward()
            ref_opt.step()
            step += 1
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)


def test_fit_records_epoch_means_and_drops_partial_batches():
    x, y = _problem(n=9)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    losses = []

    def loss_fn(idx):
        loss = F.cross_entropy(model(x[idx]), y[idx])
        losses.append(float(loss.detach()) * len(idx))
        return loss, {"correct": (model(x[idx]).argmax(1) == y[idx]).sum(), "count": torch.tensor(len(idx))}

    result = fit(opt, loss_fn, n=9, batch_size=4, epochs=1, generator=torch.Generator().manual_seed(0),
                 drop_last=True, progress=False)  # fmt: skip
    assert result.steps == 2 and len(result.history) == 1
    record = result.history[0]
    assert record["count"] == 1.0 and 0 <= record["correct"] <= 1
    assert math.isclose(record["train_loss"], sum(losses) / 8, rel_tol=1e-6)


def test_fit_scheduler_callbacks_and_time_budget():
    x, y = _problem()
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    steps, epochs = [], []
    result = fit(opt, lambda idx: F.cross_entropy(model(x[idx]), y[idx]), n=10, batch_size=5, epochs=3,
                 generator=torch.Generator().manual_seed(0), scheduler=sched,
                 after_step=lambda step, loss, sums: steps.append(step),
                 on_epoch_end=lambda record: epochs.append(record["epoch"]), progress=False)  # fmt: skip
    assert result.steps == 6 and steps == list(range(6)) and epochs == [1, 2, 3] and opt.param_groups[0]["lr"] == 0.5**6
    short = fit(opt, lambda idx: F.cross_entropy(model(x[idx]), y[idx]), n=10, batch_size=5, epochs=3,
                generator=torch.Generator().manual_seed(0), max_minutes=0.0, progress=False)  # fmt: skip
    assert short.stopped_early and short.steps == 1 and len(short.history) == 1


@pytest.mark.parametrize("pad_mode", ["zeros", "reflect"])
def test_augment_nchw_equals_nhwc(pad_mode):
    images = torch.rand(16, 6, 6, 3)
    a = augment_batch(images, torch.Generator().manual_seed(2), pad=2, pad_mode=pad_mode)
    b = augment_batch(images.permute(0, 3, 1, 2), torch.Generator().manual_seed(2), pad=2, pad_mode=pad_mode,
                      layout="NCHW")  # fmt: skip
    assert torch.equal(a.permute(0, 3, 1, 2), b)
    with pytest.raises(ValueError, match="layout"):
        augment_batch(images, torch.Generator(), layout="CHW")


def test_augment_offsets_are_drawn_per_sample():
    images = torch.arange(64, dtype=torch.float32).view(1, 8, 8, 1).repeat(64, 1, 1, 1)
    out = augment_batch(images, torch.Generator().manual_seed(0), pad=2)
    distinct = {tuple(o.flatten().tolist()) for o in out}
    assert len(distinct) > 20  # 25 offsets x 2 flips: one offset per batch would give at most 2
