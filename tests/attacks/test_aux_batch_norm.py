"""AuxBN / SaAuxBN: equal to the source BN after conversion, per-branch statistics, the sandwich formula by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tta_norm.layers import AuxBatchNorm2d, SaAuxBatchNorm2d, convert_to_aux_bn, set_branch, use_branch

from .nets import conv_bn_net


def _bn(seed: int = 0, c: int = 3) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
        bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(c, generator=g))
    return bn


@pytest.mark.parametrize("cls", [AuxBatchNorm2d, SaAuxBatchNorm2d])
@pytest.mark.parametrize("train", [False, True])
def test_from_batchnorm_equals_the_source_on_every_branch(cls, train):
    bn = _bn()
    layer = cls.from_batchnorm(bn, 2)
    x = torch.randn(5, 3, 4, 4)
    bn.train(train)
    layer.train(train)
    ref = bn(x.clone())
    for b in range(2):
        layer.branch = b
        assert torch.allclose(layer(x), ref, atol=1e-6)


def test_saaux_formula_by_hand():
    layer = SaAuxBatchNorm2d(2, 2).eval()
    with torch.no_grad():
        layer.bns[1].running_mean.copy_(torch.tensor([1.0, -1.0]))
        layer.bns[1].running_var.copy_(torch.tensor([4.0, 1.0]))
        layer.shared_weight.copy_(torch.tensor([2.0, 3.0]))
        layer.shared_bias.copy_(torch.tensor([0.5, 0.0]))
        layer.branch_weight.copy_(torch.tensor([[1.0, 1.0], [0.5, 2.0]]))
        layer.branch_bias.copy_(torch.tensor([[0.0, 0.0], [1.0, -1.0]]))
    layer.branch = 1
    x = torch.tensor([3.0, 0.0]).view(1, 2, 1, 1)
    x_hat = torch.tensor([(3 - 1) / (4 + 1e-5) ** 0.5, (0 + 1) / (1 + 1e-5) ** 0.5])
    expect = torch.tensor([0.5, 2.0]) * (torch.tensor([2.0, 3.0]) * x_hat + torch.tensor([0.5, 0.0]))
    expect = expect + torch.tensor([1.0, -1.0])
    assert torch.allclose(layer(x).flatten(), expect, atol=1e-6)


@pytest.mark.parametrize("cls", [AuxBatchNorm2d, SaAuxBatchNorm2d])
def test_branches_keep_separate_statistics_and_gradients(cls):
    layer = cls(3, 2).train()
    x = torch.randn(8, 3, 4, 4) * 3 + 2
    layer.branch = 1
    layer(x).square().sum().backward()
    assert torch.equal(layer.bns[0].running_mean, torch.zeros(3))
    assert not torch.equal(layer.bns[1].running_mean, torch.zeros(3))
    if cls is SaAuxBatchNorm2d:
        assert layer.shared_weight.grad is not None and layer.shared_weight.grad.abs().sum() > 0
        assert torch.equal(layer.branch_weight.grad[0], torch.zeros(3))  # branch 0's affine is untouched
        assert layer.branch_weight.grad[1].abs().sum() > 0
    else:
        assert layer.bns[0].weight.grad is None and layer.bns[1].weight.grad is not None


@pytest.mark.parametrize("kind", ["aux", "saaux"])
def test_convert_model_and_route_branches(kind):
    model = conv_bn_net()
    x = torch.rand(4, 3, 4, 4)
    with torch.no_grad():
        ref = model(x)
    names = convert_to_aux_bn(model, kind)
    assert names == ["bn"]
    with torch.no_grad():
        for b in (0, 1):
            with use_branch(model, b):
                assert model.bn.branch == b
                assert torch.allclose(model(x), ref, atol=1e-5)
    assert model.bn.branch == 0
    set_branch(model, 1)
    assert model.bn.branch == 1
    with pytest.raises(ValueError, match="out of range"):
        set_branch(model, 2)
    with pytest.raises(ValueError, match="no nn.BatchNorm2d"):
        convert_to_aux_bn(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="kind"):
        convert_to_aux_bn(conv_bn_net(), "sandwich")


def test_channel_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="channels"):
        SaAuxBatchNorm2d(3)(torch.randn(2, 4, 2, 2))
