"""Adversarial fine-tuning with BN / AuxBN / SaAuxBN on a tiny model; robustness evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tta_norm.attacks.adv_train import AdvTrainConfig, adversarial_finetune, augment, craft, evaluate_robustness
from tta_norm.layers import AuxBatchNorm2d, SaAuxBatchNorm2d

from .nets import conv_bn_net


def _data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 4, 4, 3), dtype=np.uint8), rng.integers(0, 4, size=n)


def test_config_validation():
    with pytest.raises(ValueError, match="kind"):
        AdvTrainConfig(kind="gn")
    with pytest.raises(ValueError):
        AdvTrainConfig(batch_size=1)


def test_augment_shapes_and_determinism():
    x = torch.rand(6, 3, 8, 8)
    a = augment(x, torch.Generator().manual_seed(1))
    b = augment(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b)


def test_craft_respects_budget_and_restores_mode():
    model = conv_bn_net().train()
    x, y = torch.rand(8, 3, 4, 4), torch.randint(0, 4, (8,))
    cfg = AdvTrainConfig(kind="bn", steps=3, craft_mode="eval")
    x_adv = craft(model, x, y, cfg, torch.Generator().manual_seed(0), branch=None)
    assert (x_adv - x).abs().max() <= cfg.eps + 1e-6 and model.training
    running = model.bn.running_mean.clone()
    craft(model, x, y, cfg, torch.Generator().manual_seed(0), branch=None)
    assert torch.equal(running, model.bn.running_mean)  # eval-mode crafting leaves the statistics alone
    model.eval()
    official = AdvTrainConfig(kind="bn", steps=3)  # train mode: the statistics see the adversarial examples
    craft(model, x, y, official, torch.Generator().manual_seed(0), branch=None)
    assert not torch.equal(running, model.bn.running_mean) and not model.training
    with pytest.raises(ValueError, match="craft_mode"):
        AdvTrainConfig(craft_mode="test")


def test_augment_draws_a_crop_offset_per_sample():
    x = torch.rand(64, 3, 8, 8) + 1.0  # no zeros inside the image: zeros mark the padding
    out = augment(x, torch.Generator().manual_seed(0))
    pad_rows = (out == 0).all(dim=(1, 3)).sum(1)  # all-zero rows per sample = its vertical offset from 4
    assert len(set(pad_rows.tolist())) > 1
    for i in range(64):  # each sample is a crop of its own (possibly flipped) padded image
        padded = torch.nn.functional.pad(x[i], (4, 4, 4, 4))
        flipped = torch.nn.functional.pad(x[i].flip(2), (4, 4, 4, 4))
        assert any(torch.equal(out[i], p[:, dy : dy + 8, dx : dx + 8])
                   for p in (padded, flipped) for dy in range(9) for dx in range(9))  # fmt: skip


@pytest.mark.parametrize("kind,cls", [("bn", torch.nn.BatchNorm2d), ("aux", AuxBatchNorm2d),
                                      ("saaux", SaAuxBatchNorm2d)])  # fmt: skip
def test_finetune_runs_and_separates_branches(kind, cls):
    images, labels = _data()
    model = conv_bn_net()
    cfg = AdvTrainConfig(kind=kind, steps=2, batch_size=8, epochs=1, lr=0.05)
    model, history = adversarial_finetune(model, images, labels, cfg, progress=False)
    assert isinstance(model.bn, cls) and len(history) == 4
    assert all(np.isfinite(h["loss"]) for h in history)
    if kind != "bn":  # clean statistics from clean inputs, adversarial statistics from adversarial inputs
        assert not torch.equal(model.bn.bns[0].running_mean, model.bn.bns[1].running_mean)
    for branch in (None,) if kind == "bn" else (0, 1):
        res = evaluate_robustness(model, images, labels, branch=branch, pgd_steps=(2,), eps=0.3, step_size=0.1,
                                  batch_size=16)  # fmt: skip
        assert res["n"] == 32 and 0 <= res["pgd2"] <= res["clean"] <= 1
