"""AuxBN / SaAuxBN: equal to the source BN after conversion, per-domain statistics, the sandwich formula by hand;
the earlier "branch" names warn and behave as the "domain" ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tests.attacks.nets import conv_bn_net
from tta_norm.layers import AuxBatchNorm2d, SaAuxBatchNorm2d, convert_to_aux_bn, domain_layers, set_domain, use_domain


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
def test_from_batchnorm_equals_the_source_on_every_domain(cls, train):
    bn = _bn()
    layer = cls.from_batchnorm(bn, 2)
    x = torch.randn(5, 3, 4, 4)
    bn.train(train)
    layer.train(train)
    ref = bn(x.clone())
    for k in range(2):
        layer.domain = k
        assert torch.allclose(layer(x), ref, atol=1e-6)


@pytest.mark.parametrize("cls", [AuxBatchNorm2d, SaAuxBatchNorm2d])
@pytest.mark.parametrize("variant", [{"affine": False}, {"track_running_stats": False}, {"dtype": torch.float64}])
def test_from_batchnorm_keeps_the_source_kind_of_batchnorm(cls, variant):
    """A BatchNorm without running statistics (batch statistics in eval too), without affine, or in float64
    converts into a layer that computes the same, in its dtype."""
    variant = dict(variant)  # (the parameter dict is shared between the cases)
    dtype = variant.pop("dtype", torch.float32)
    bn = nn.BatchNorm2d(3, **variant).to(dtype)
    if bn.affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-1.0, 1.0)
    if bn.track_running_stats:
        with torch.no_grad():
            bn.running_mean.uniform_(-1.0, 1.0)
    x = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(3), dtype=dtype)
    for train in (False, True):
        bn.train(train)
        layer = cls.from_batchnorm(bn, 2)
        assert layer.training is train
        for k in range(2):
            layer.domain = k
            out = layer(x)
            assert out.dtype == dtype
            torch.testing.assert_close(out, bn(x), atol=1e-6, rtol=1e-6)


def test_saaux_formula_by_hand():
    layer = SaAuxBatchNorm2d(2, 2).eval()
    with torch.no_grad():
        layer.bns[1].running_mean.copy_(torch.tensor([1.0, -1.0]))
        layer.bns[1].running_var.copy_(torch.tensor([4.0, 1.0]))
        layer.shared_weight.copy_(torch.tensor([2.0, 3.0]))
        layer.shared_bias.copy_(torch.tensor([0.5, 0.0]))
        layer.domain_weight.copy_(torch.tensor([[1.0, 1.0], [0.5, 2.0]]))
        layer.domain_bias.copy_(torch.tensor([[0.0, 0.0], [1.0, -1.0]]))
    layer.domain = 1
    x = torch.tensor([3.0, 0.0]).view(1, 2, 1, 1)
    x_hat = torch.tensor([(3 - 1) / (4 + 1e-5) ** 0.5, (0 + 1) / (1 + 1e-5) ** 0.5])
    expect = torch.tensor([0.5, 2.0]) * (torch.tensor([2.0, 3.0]) * x_hat + torch.tensor([0.5, 0.0]))
    expect = expect + torch.tensor([1.0, -1.0])
    assert torch.allclose(layer(x).flatten(), expect, atol=1e-6)


@pytest.mark.parametrize("cls", [AuxBatchNorm2d, SaAuxBatchNorm2d])
def test_domains_keep_separate_statistics_and_gradients(cls):
    layer = cls(3, 2).train()
    x = torch.randn(8, 3, 4, 4) * 3 + 2
    layer.domain = 1
    layer(x).square().sum().backward()
    assert torch.equal(layer.bns[0].running_mean, torch.zeros(3))
    assert not torch.equal(layer.bns[1].running_mean, torch.zeros(3))
    if cls is SaAuxBatchNorm2d:
        assert layer.shared_weight.grad is not None and layer.shared_weight.grad.abs().sum() > 0
        assert torch.equal(layer.domain_weight.grad[0], torch.zeros(3))  # domain 0's affine is untouched
        assert layer.domain_weight.grad[1].abs().sum() > 0
    else:
        assert layer.bns[0].weight.grad is None and layer.bns[1].weight.grad is not None


@pytest.mark.parametrize("kind", ["aux", "saaux"])
def test_convert_model_and_route_domains(kind):
    model = conv_bn_net()
    x = torch.rand(4, 3, 4, 4)
    with torch.no_grad():
        ref = model(x)
    names = convert_to_aux_bn(model, kind)
    assert names == ["bn"]
    assert domain_layers(model) == [model.bn] and model.bn.num_domains == 2
    with torch.no_grad():
        for k in (0, 1):
            with use_domain(model, k):
                assert model.bn.domain == k
                assert torch.allclose(model(x), ref, atol=1e-5)
    assert model.bn.domain == 0
    set_domain(model, 1)
    assert model.bn.domain == 1
    for bad in (2, -1, 0.7, True, "1"):  # out of range, or not an integer: refused, nothing changed
        with pytest.raises(ValueError, match=r"out of range: an integer in 0\.\.1"):
            set_domain(model, bad)
        assert model.bn.domain == 1
    set_domain(model, np.int64(0))
    assert model.bn.domain == 0 and type(model.bn.domain) is int
    with pytest.raises(ValueError, match="no nn.BatchNorm2d"):
        convert_to_aux_bn(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="kind"):
        convert_to_aux_bn(conv_bn_net(), "sandwich")


def test_channel_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="channels"):
        SaAuxBatchNorm2d(3)(torch.randn(2, 4, 2, 2))


# ------------------------------------------------------------------------------------ the deprecated "branch" names


def _trained_saaux(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = conv_bn_net(seed)
    convert_to_aux_bn(model, "saaux", num_domains=3)
    with torch.no_grad():
        model.bn.domain_weight.normal_()
        model.bn.domain_bias.normal_()
    return model


def test_old_function_names_warn_and_route_as_the_new_ones():
    from tta_norm.layers import set_branch, use_branch
    from tta_norm.layers.aux_batch_norm import branch_layers

    x = torch.rand(4, 3, 4, 4)
    old, new = _trained_saaux(0), _trained_saaux(0)
    with pytest.warns(DeprecationWarning, match="set_branch is deprecated; use set_domain"):
        set_branch(old, 2)
    set_domain(new, 2)
    assert torch.equal(old(x), new(x))
    with pytest.warns(DeprecationWarning, match="use_branch is deprecated; use use_domain"):
        with use_branch(old, 1):
            with use_domain(new, 1):
                assert torch.equal(old(x), new(x)) and old.bn.domain == 1
    assert old.bn.domain == new.bn.domain == 2
    with pytest.warns(DeprecationWarning, match="branch_layers is deprecated; use domain_layers"):
        assert branch_layers(old) == [old.bn]
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="out of range"):
        set_branch(old, 3)


@pytest.mark.parametrize("cls", [AuxBatchNorm2d, SaAuxBatchNorm2d])
def test_old_keyword_and_attribute_names_warn_and_mean_the_new_ones(cls):
    with pytest.warns(DeprecationWarning, match=r"num_branches=\.\.\.\) is deprecated; use num_domains="):
        torch.manual_seed(0)
        old = cls(3, num_branches=3)
    torch.manual_seed(0)
    new = cls(3, num_domains=3)
    assert old.num_domains == 3
    assert all(torch.equal(a, b) for a, b in zip(old.parameters(), new.parameters(), strict=True))
    with pytest.warns(DeprecationWarning, match="num_branches is deprecated"):
        assert old.num_branches == 3
    with pytest.warns(DeprecationWarning, match="branch is deprecated; use .domain"):
        old.branch = 2
    assert old.domain == 2
    with pytest.warns(DeprecationWarning, match="branch is deprecated"):
        assert old.branch == 2
    with pytest.raises(TypeError, match="both num_branches= and num_domains="):
        cls(3, num_domains=2, num_branches=2)
    with pytest.warns(DeprecationWarning, match="num_branches"):
        converted = cls.from_batchnorm(_bn(), num_branches=4)
    assert converted.num_domains == 4
    with pytest.warns(DeprecationWarning, match="num_branches"):
        convert_to_aux_bn(model := conv_bn_net(), "aux" if cls is AuxBatchNorm2d else "saaux", num_branches=3)
    assert isinstance(model.bn, cls) and model.bn.num_domains == 3


def test_saaux_branch_affine_names_and_old_state_dicts():
    layer = SaAuxBatchNorm2d(3, 2)
    with pytest.warns(DeprecationWarning, match="branch_weight is deprecated; use .domain_weight"):
        assert layer.branch_weight is layer.domain_weight
    with pytest.warns(DeprecationWarning, match="branch_bias is deprecated"):
        assert layer.branch_bias is layer.domain_bias
    # a state dict saved before the rename (keys bn.branch_weight / bn.branch_bias) loads into the new names
    source = _trained_saaux(1)
    old_keys = {k.replace("domain_", "branch_"): v for k, v in source.state_dict().items()}
    assert "bn.branch_weight" in old_keys and "bn.domain_weight" not in old_keys
    target = _trained_saaux(2)
    with pytest.warns(DeprecationWarning) as caught:
        target.load_state_dict(old_keys)
    assert sorted(str(w.message) for w in caught) == [
        "state dict key 'bn.branch_bias' is deprecated; use 'bn.domain_bias'",
        "state dict key 'bn.branch_weight' is deprecated; use 'bn.domain_weight'",
    ]
    x = torch.rand(4, 3, 4, 4)
    with use_domain(source, 1), use_domain(target, 1):
        assert torch.equal(source(x), target(x))


def test_integer_index_reads_ints_and_refuses_bools_and_floats():
    import numpy as np

    from tta_norm._integers import integer_index

    assert [integer_index(v) for v in (0, 3, np.int64(2), torch.tensor(1), np.uint8(4))] == [0, 3, 2, 1, 4]
    assert [integer_index(v) for v in (True, False, 1.0, torch.tensor(1.0), "1", None)] == [None] * 6
