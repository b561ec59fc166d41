"""The methods' optimiser namespace: optimizer= and optim=, the authors' defaults, ambiguous names rejected."""

from __future__ import annotations

import pytest
import torch

import tta_norm
from tests.nets import tiny_net
from tta_norm.methods.base import OPTIM_DEFAULTS, paper_sgd_lr

X = torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(0))


def group(tta):
    return tta.method.optimizer.param_groups[0]


def test_default_is_adam_with_tent_cifar_setting() -> None:
    tta = tta_norm.adapt(tiny_net(), "tbn", "tent")
    assert isinstance(tta.method.optimizer, torch.optim.Adam)
    assert group(tta)["lr"] == 1e-3 and group(tta)["betas"] == (0.9, 0.999) and group(tta)["weight_decay"] == 0


def test_sgd_defaults_are_the_authors_imagenet_setting() -> None:
    tta = tta_norm.adapt(tiny_net(), "tbn", "sar", optimizer="sgd")
    assert isinstance(tta.method.optimizer, torch.optim.SGD)
    assert group(tta)["lr"] == OPTIM_DEFAULTS["sgd"]["lr"] == 2.5e-4
    assert group(tta)["momentum"] == 0.9 and not group(tta)["nesterov"]


def test_the_papers_sgd_lr_per_batch_size_and_family() -> None:
    """SAR's ImageNet main.py: ResNet 0.00025 (x b/32 below 32), ViT 0.001 * b / 64."""
    assert paper_sgd_lr(64) == paper_sgd_lr(32) == OPTIM_DEFAULTS["sgd"]["lr"]
    assert paper_sgd_lr(1) == pytest.approx(7.8125e-6) and paper_sgd_lr(16) == pytest.approx(1.25e-4)
    assert paper_sgd_lr(64, vit=True) == pytest.approx(1e-3) and paper_sgd_lr(1, vit=True) == pytest.approx(1.5625e-5)
    with pytest.raises(ValueError):
        paper_sgd_lr(0)


def test_sgd_momentum_reaches_the_optimiser_and_spec_momentum_the_statistics() -> None:
    tta = tta_norm.adapt(tiny_net(), "ema", "tent", optimizer="sgd", optim={"momentum": 0.5, "lr": 0.01})
    assert group(tta)["momentum"] == 0.5 and group(tta)["lr"] == 0.01
    assert tta.spec.momentum == 0.05  # the preset's EMA momentum is untouched
    stats_only = tta_norm.adapt(tiny_net(), "ema", momentum=0.2)  # no method: momentum is the spec's
    assert stats_only.spec.momentum == 0.2


@pytest.mark.parametrize("key", ["momentum", "eps"])
def test_a_name_both_could_claim_is_rejected_with_a_method(key: str) -> None:
    with pytest.raises(TypeError, match=rf"{key}= is ambiguous.*optim="):
        tta_norm.adapt(tiny_net(), "tbn", "tent", **{key: 0.9})


def test_direct_lr_and_optim_lr_together_are_rejected() -> None:
    with pytest.raises(TypeError, match="lr is given twice"):
        tta_norm.adapt(tiny_net(), "tbn", "tent", lr=0.1, optim={"lr": 0.2})


def test_unknown_optimiser_setting_names_the_accepted_ones() -> None:
    with pytest.raises(ValueError, match="optimizer 'adam' takes no setting.*momentum.*accepts"):
        tta_norm.adapt(tiny_net(), "tbn", "tent", optim={"momentum": 0.9})
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'"):
        tta_norm.adapt(tiny_net(), "tbn", "tent", optimizer="rmsprop")


def test_sgd_momentum_moves_the_weights_without_a_new_gradient() -> None:
    tta = tta_norm.adapt(tiny_net(), "tbn", "tent", optimizer="sgd", optim={"lr": 0.1, "momentum": 0.9})
    tta(X)
    buf = tta.method.optimizer.state[tta.method.params[0]]["momentum_buffer"].clone()
    before = tta.method.params[0].detach().clone()
    tta.method.params[0].grad = torch.zeros_like(before)
    tta.method.optimizer.step()
    torch.testing.assert_close(tta.method.params[0].detach(), before - 0.1 * 0.9 * buf)
