"""Adversarial fine-tuning with BN / AuxBN / SaAuxBN on a tiny model; robustness evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tta_norm.attacks.adv_train import AdvTrainConfig, adversarial_finetune, craft, evaluate_robustness
from tta_norm.layers import AuxBatchNorm2d, SaAuxBatchNorm2d

from .nets import batch, conv_bn_net


def _data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 4, 4, 3), dtype=np.uint8), rng.integers(0, 4, size=n)


def test_config_validation():
    with pytest.raises(ValueError, match="kind"):
        AdvTrainConfig(kind="gn")
    with pytest.raises(ValueError):
        AdvTrainConfig(batch_size=1)
    with pytest.raises(ValueError, match="craft_mode"):
        AdvTrainConfig(craft_mode="test")


@pytest.mark.parametrize(
    "bad", [{"eps": -1.0}, {"step_size": float("nan")}, {"lr": 0.0}, {"lr": float("inf")}, {"momentum": 1.5},
            {"weight_decay": -1e-4}, {"steps": 2.5}, {"batch_size": 8.0}],
)  # fmt: skip
def test_settings_are_checked_when_made(bad):
    """eps = -1 failed at the first PGD step, after the model was converted in place; a NaN step size trained to
    NaN weights with no error."""
    with pytest.raises(ValueError, match="must be"):
        AdvTrainConfig(**bad)


def test_each_pgd_figure_is_independent_of_the_others_asked_for():
    """One generator served every k: PGD-1 alone and PGD-1 after PGD-2 differed; a repeated k was counted twice
    (pgd0 0.58 for a clean accuracy of 0.29)."""
    x, y = batch(200, seed=3, size=8)
    model = conv_bn_net(3).eval()
    alone = evaluate_robustness(model, x, y, pgd_steps=(1,), eps=0.5, step_size=0.02, batch_size=50, seed=0)
    both = evaluate_robustness(model, x, y, pgd_steps=(2, 1), eps=0.5, step_size=0.02, batch_size=50, seed=0)
    assert alone["pgd1"] == both["pgd1"] and alone["clean"] == both["clean"]
    for bad in ((0, 0), (1, -1), (1.5,)):
        with pytest.raises(ValueError, match="distinct integers"):
            evaluate_robustness(model, x, y, pgd_steps=bad, batch_size=8)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_craft_respects_budget_and_restores_mode(mode):
    x, y = torch.rand(8, 3, 4, 4), torch.randint(0, 4, (8,))
    cfg = AdvTrainConfig(kind="bn", steps=3, craft_mode=mode)
    for was_training in (True, False):
        model = conv_bn_net().train(was_training)
        running = model.bn.running_mean.clone()
        x_adv = craft(model, x, y, cfg, torch.Generator().manual_seed(0), domain=None)
        assert (x_adv - x).abs().max() <= cfg.eps + 1e-6 and model.training == was_training
        # train-mode crafting (official) moves the running statistics once per PGD forward; eval mode does not
        assert torch.equal(running, model.bn.running_mean) == (mode == "eval")


def test_craft_mode_train_uses_batch_statistics():
    """The first PGD gradient of train-mode crafting equals a hand-written one through batch statistics."""
    model = conv_bn_net()
    x, y = torch.rand(8, 3, 4, 4), torch.randint(0, 4, (8,))
    cfg = AdvTrainConfig(kind="bn", steps=1, eps=0.1, step_size=0.1, craft_mode="train")
    g = torch.Generator().manual_seed(5)
    x_adv = craft(model, x, y, cfg, g, domain=None)
    start = x + (torch.rand(x.shape, generator=torch.Generator().manual_seed(5)) * 2 - 1) * 0.1
    ref_model = conv_bn_net()
    ref_model.load_state_dict(model.state_dict())
    ref_model.train()
    xs = start.clamp(0, 1).requires_grad_(True)
    torch.nn.functional.cross_entropy(ref_model(xs), y).backward()
    expect = (xs.detach() + 0.1 * xs.grad.sign()).clamp(x - 0.1, x + 0.1).clamp(0, 1)
    assert torch.allclose(x_adv, expect, atol=1e-6)


@pytest.mark.parametrize("kind,cls", [("bn", torch.nn.BatchNorm2d), ("aux", AuxBatchNorm2d),
                                      ("saaux", SaAuxBatchNorm2d)])  # fmt: skip
def test_finetune_runs_and_separates_domains(kind, cls):
    images, labels = _data()
    model = conv_bn_net()
    cfg = AdvTrainConfig(kind=kind, steps=2, batch_size=8, epochs=1, lr=0.05)
    model, history = adversarial_finetune(model, images, labels, cfg, progress=False)
    assert isinstance(model.bn, cls) and len(history) == 4
    assert all(np.isfinite(h["loss"]) for h in history)
    if kind != "bn":  # clean statistics from clean inputs, adversarial statistics from adversarial inputs
        assert not torch.equal(model.bn.bns[0].running_mean, model.bn.bns[1].running_mean)
    for domain in (None,) if kind == "bn" else (0, 1):
        res = evaluate_robustness(model, images, labels, domain=domain, pgd_steps=(2,), eps=0.3, step_size=0.1,
                                  batch_size=16)  # fmt: skip
        assert res["n"] == 32 and res["domain"] == domain and 0 <= res["pgd2"] <= res["clean"] <= 1


def test_branch_keyword_warns_and_means_domain():
    images, labels = _data(16)
    model = conv_bn_net()
    model, _ = adversarial_finetune(model, images, labels, AdvTrainConfig(kind="saaux", steps=1, batch_size=8),
                                    progress=False)  # fmt: skip
    x, y = torch.rand(8, 3, 4, 4), torch.randint(0, 4, (8,))
    cfg = AdvTrainConfig(kind="saaux", steps=2)
    new = craft(model, x, y, cfg, torch.Generator().manual_seed(0), domain=0)
    with pytest.warns(DeprecationWarning, match=r"craft\(branch=\.\.\.\) is deprecated; use domain="):
        old = craft(model, x, y, cfg, torch.Generator().manual_seed(0), branch=0)
    assert torch.equal(old, new)
    kwargs = {"pgd_steps": (1,), "eps": 0.3, "step_size": 0.1}
    expect = evaluate_robustness(model, images, labels, domain=1, **kwargs)
    with pytest.warns(DeprecationWarning, match="evaluate_robustness"):
        assert evaluate_robustness(model, images, labels, branch=1, **kwargs) == expect
