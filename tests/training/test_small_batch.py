"""The small-batch study's models: the variants' layers and the training recipe."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tta_norm.layers import BatchGroupNorm, GhostBatchNorm2d, GroupNormProxyAct
from tta_norm.models import cifar_resnet
from tta_norm.training.small_batch import (
    VARIANTS,
    build_variant,
    ghost_size,
    groups_of_four,
    train_variant,
)

CPU = torch.device("cpu")


def _images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n)


def _norm_types(model: nn.Module) -> set[type]:
    kinds = (nn.BatchNorm2d, nn.GroupNorm, BatchGroupNorm, GroupNormProxyAct)
    return {type(m) for m in model.modules() if isinstance(m, kinds)}


def test_ghost_batch_and_groups_follow_the_study_rules():
    assert [ghost_size(b) for b in (1, 2, 8, 64, 128, 512)] == [2, 2, 2, 16, 16, 16]
    assert [groups_of_four(c) for c in (2, 16, 32, 64)] == [1, 4, 8, 16]


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_has_its_normalisation_layers(variant):
    torch.manual_seed(0)
    model = build_variant(variant, 8, depth=8)
    found = _norm_types(model)
    expect = {
        "bn": {nn.BatchNorm2d},
        "bn-decay": {nn.BatchNorm2d},
        "ghost": {GhostBatchNorm2d},
        "bgn": {BatchGroupNorm},
        "gn": {nn.GroupNorm},
        "gnpn": {GroupNormProxyAct, nn.GroupNorm},  # bn2 of a block feeds the residual sum: plain GN
    }[variant]
    assert found == expect
    if variant == "ghost":
        assert {m.ghost_batch_size for m in model.modules() if isinstance(m, GhostBatchNorm2d)} == {ghost_size(8)}
    grouped = [m for m in model.modules() if isinstance(m, (nn.GroupNorm, BatchGroupNorm))]
    assert all(m.num_groups == groups_of_four(getattr(m, "num_channels", None) or m.num_features) for m in grouped)
    out = model.eval()(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_the_gn_variant_is_the_inline_conversion_it_replaces():
    """GN with groups of 4 channels and the BN's gamma/beta copied, as the study first wrote it by hand."""
    torch.manual_seed(0)
    ref = cifar_resnet(8)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    source = {k: v.clone() for k, v in ref.state_dict().items()}
    for name, bn in [(n, m) for n, m in ref.named_modules() if isinstance(m, nn.BatchNorm2d)]:
        parent = ref.get_submodule(name.rpartition(".")[0]) if "." in name else ref
        gn = nn.GroupNorm(groups_of_four(bn.num_features), bn.num_features)
        with torch.no_grad():
            gn.weight.copy_(bn.weight)
            gn.bias.copy_(bn.bias)
        setattr(parent, name.rpartition(".")[2], gn)

    from tta_norm.layers import convert_to_group_norm

    model = cifar_resnet(8)
    model.load_state_dict(source)
    model = convert_to_group_norm(model, groups_of_four)
    assert model.state_dict().keys() == ref.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values(), strict=True))
    assert [repr(m) for m in model.modules()] == [repr(m) for m in ref.modules()]
    x = torch.rand(3, 3, 32, 32)
    assert torch.equal(model.train()(x), ref.train()(x))


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="unknown variant"):
        build_variant("ln", 8, depth=8)


def _trained(variant: str, weight_decay: float = 5e-4, batch_size: int = 4) -> tuple[nn.Module, dict]:
    images, labels = _images(12)
    torch.manual_seed(0)
    model = build_variant(variant, batch_size, depth=8)
    rec = train_variant(model, variant, torch.from_numpy(images), torch.from_numpy(labels), batch_size, epochs=1,
                        base_lr=0.1, weight_decay=weight_decay, seed=3, device=CPU)  # fmt: skip
    return model, rec


def test_train_variant_runs_full_batches_at_the_scaled_lr_and_is_seeded():
    model, rec = _trained("bn")
    assert rec["steps"] == 3 and rec["peak_lr"] == pytest.approx(0.1 * 4 / 128)
    assert np.isfinite(rec["train_loss"]) and rec["train_seconds"] >= 0 and not model.training
    again, rec2 = _trained("bn")
    assert rec2["train_loss"] == rec["train_loss"]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))


def test_bn_decay_decays_gamma_and_beta_and_bn_does_not():
    """One step (batch 12 of 12 images, lr = peak, Nesterov 0.9): only bn-decay adds wd * gamma to gamma's gradient,
    so its gamma ends ``lr * (1 + 0.9) * wd * gamma`` lower; beta (0) and the conv weights (decayed in both) agree."""
    plain, rec = _trained("bn", weight_decay=5.0, batch_size=12)
    decayed, _ = _trained("bn-decay", weight_decay=5.0, batch_size=12)
    assert rec["steps"] == 1
    expect = torch.full_like(plain.bn1.weight, rec["peak_lr"] * 1.9 * 5.0)
    torch.testing.assert_close(plain.bn1.weight - decayed.bn1.weight, expect)
    assert torch.equal(plain.bn1.bias, decayed.bn1.bias) and torch.equal(plain.conv1.weight, decayed.conv1.weight)
