"""Batch-group normalization (BN + GN) against BatchNorm and hand computations."""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tta_norm.layers import BatchGroupNorm, convert_to_batch_group_norm

ATOL = 1e-5


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _set_affine(layer: nn.Module, seed: int) -> None:
    g = _gen(seed)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(layer.weight.shape, generator=g) + 0.5)
        layer.bias.copy_(torch.randn(layer.bias.shape, generator=g))


@pytest.mark.parametrize("shape", [(5, 4), (5, 4, 3), (3, 4, 3, 2), (2, 4, 2, 2, 2)])
def test_groups_equal_channels_is_batchnorm(shape) -> None:
    bn_cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[len(shape)]
    bn = bn_cls(4, momentum=0.3)
    bgn = BatchGroupNorm(4, 4, momentum=0.3)
    _set_affine(bn, 0)
    bgn.load_state_dict(bn.state_dict())  # same keys and shapes when G = C
    for step in range(3):
        x = torch.randn(*shape, generator=_gen(step)) * 3 - 1
        torch.testing.assert_close(bgn(x), bn(x), atol=ATOL, rtol=0)
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(bgn, key), getattr(bn, key), atol=ATOL, rtol=0)
    bn.eval()
    bgn.eval()
    x = torch.randn(*shape, generator=_gen(9))
    torch.testing.assert_close(bgn(x), bn(x), atol=ATOL, rtol=0)


def test_one_group_by_hand() -> None:
    x = torch.randn(2, 3, 2, 2, generator=_gen(1)) + 2
    layer = BatchGroupNorm(3, 1, momentum=0.25, eps=1e-3)
    _set_affine(layer, 2)
    out = layer(x)
    mean = x.mean()
    var = ((x - mean) ** 2).mean()
    expected = (x - mean) / torch.sqrt(var + 1e-3) * layer.weight.view(1, 3, 1, 1) + layer.bias.view(1, 3, 1, 1)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
    n = x.numel()
    torch.testing.assert_close(layer.running_mean, torch.stack([0.75 * 0 + 0.25 * mean]), atol=ATOL, rtol=0)
    torch.testing.assert_close(
        layer.running_var, torch.stack([0.75 * 1 + 0.25 * var * n / (n - 1)]), atol=ATOL, rtol=0
    )
    layer.eval()
    m, v = layer.running_mean, layer.running_var
    expected_eval = (x - m) / torch.sqrt(v + 1e-3) * layer.weight.view(1, 3, 1, 1) + layer.bias.view(1, 3, 1, 1)
    torch.testing.assert_close(layer(x), expected_eval, atol=ATOL, rtol=0)


def test_two_channel_groups_by_hand() -> None:
    x = torch.randn(3, 4, 5, generator=_gen(3))
    layer = BatchGroupNorm(4, 2, affine=False, momentum=None)
    out = layer(x)
    for g, chans in enumerate([slice(0, 2), slice(2, 4)]):
        block = x[:, chans]
        mu, var = block.mean(), block.var(unbiased=False)
        torch.testing.assert_close(out[:, chans], (block - mu) / torch.sqrt(var + 1e-5), atol=ATOL, rtol=0)
        # momentum=None: cumulative average; after one batch it equals the batch statistics
        torch.testing.assert_close(layer.running_mean[g], mu, atol=ATOL, rtol=0)
        torch.testing.assert_close(layer.running_var[g], block.var(unbiased=True), atol=ATOL, rtol=0)


def test_flat_grouping_cuts_through_channels() -> None:
    x = torch.randn(2, 3, 2, 2, generator=_gen(4))  # 12 features per sample
    layer = BatchGroupNorm(3, 4, affine=False, grouping="flat")  # 4 groups of 3 consecutive features
    out = layer(x)
    flat = x.reshape(2, 12)
    for g in range(4):
        block = flat[:, 3 * g : 3 * g + 3]
        expected = (block - block.mean()) / torch.sqrt(block.var(unbiased=False) + 1e-5)
        torch.testing.assert_close(out.reshape(2, 12)[:, 3 * g : 3 * g + 3], expected, atol=ATOL, rtol=0)
    assert layer.running_mean.shape == (4,)
    with pytest.raises(ValueError, match="does not divide the 15 features"):
        layer(torch.randn(2, 3, 5))
    # when G divides C the two groupings coincide
    x2 = torch.randn(4, 6, 3, generator=_gen(5))
    torch.testing.assert_close(
        BatchGroupNorm(6, 3, grouping="flat")(x2), BatchGroupNorm(6, 3)(x2), atol=ATOL, rtol=0
    )


@given(
    n=st.integers(1, 4),
    groups_per=st.sampled_from([(1, 1), (2, 2), (2, 4), (3, 6), (6, 6)]),
    spatial=st.sampled_from([(), (3,), (2, 2)]),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=40, deadline=None)
def test_property_equals_groupwise_reference(n, groups_per, spatial, seed) -> None:
    g, c = groups_per
    x = torch.randn(n, c, *spatial, generator=_gen(seed), dtype=torch.float64)
    layer = BatchGroupNorm(c, g, dtype=torch.float64)
    _set_affine(layer, seed)
    if n * (c // g) * (int(torch.tensor(spatial).prod()) if spatial else 1) <= 1:
        with pytest.raises(ValueError, match="value"):
            layer(x)
        return
    out = layer(x)
    # reference: per group, normalise the (N, C/G, *S) block with its population statistics
    blocks = []
    for gi in range(g):
        block = x[:, gi * (c // g) : (gi + 1) * (c // g)]
        blocks.append((block - block.mean()) / torch.sqrt(block.var(unbiased=False) + 1e-5))
    shape = (1, c) + (1,) * len(spatial)
    ref = torch.cat(blocks, dim=1) * layer.weight.view(shape) + layer.bias.view(shape)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


def test_batch_size_one_trains() -> None:
    layer = BatchGroupNorm(8, 2)
    x = torch.randn(1, 8, 3, 3, generator=_gen(6), requires_grad=True)
    out = layer(x)
    out.square().mul(torch.arange(out.numel()).view_as(out)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert layer.weight.grad is not None and layer.bias.grad is not None


def test_gradcheck() -> None:
    layer = BatchGroupNorm(4, 2, dtype=torch.float64, track_running_stats=False)
    _set_affine(layer, 7)
    x = torch.randn(2, 4, 3, generator=_gen(8), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: layer(t), (x,))


def test_no_running_stats_uses_batch_stats_in_eval() -> None:
    x = torch.randn(3, 4, 2, generator=_gen(9))
    layer = BatchGroupNorm(4, 2, track_running_stats=False)
    train_out = layer(x)
    layer.eval()
    torch.testing.assert_close(layer(x), train_out)
    assert layer.running_mean is None and "running_mean" not in layer.state_dict()


def test_state_dict_round_trip() -> None:
    layer = BatchGroupNorm(6, 3)
    _set_affine(layer, 10)
    layer(torch.randn(4, 6, 2, generator=_gen(11)))
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    other = BatchGroupNorm(6, 3)
    other.load_state_dict(torch.load(buf))
    layer.eval()
    other.eval()
    x = torch.randn(2, 6, 2, generator=_gen(12))
    torch.testing.assert_close(other(x), layer(x))
    assert set(layer.state_dict()) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}


def test_errors() -> None:
    with pytest.raises(ValueError, match="does not divide num_features=6"):
        BatchGroupNorm(6, 4)
    with pytest.raises(ValueError, match="positive"):
        BatchGroupNorm(6, 0)
    with pytest.raises(ValueError, match="grouping"):
        BatchGroupNorm(6, 3, grouping="spatial")  # type: ignore[arg-type]
    layer = BatchGroupNorm(6, 3)
    with pytest.raises(ValueError, match="num_features=6"):
        layer(torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match="shape"):
        layer(torch.randn(6))
    with pytest.raises(ValueError, match="1 value"):
        BatchGroupNorm(3, 3)(torch.randn(1, 3))


def test_from_batchnorm_and_convert() -> None:
    bn = nn.BatchNorm2d(4)
    _set_affine(bn, 13)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.0, 2.0, -1.0, 1.0]))
        bn.running_var.copy_(torch.tensor([1.0, 3.0, 0.5, 0.5]))
    bn.eval()
    bgn = BatchGroupNorm.from_batchnorm(bn, 2)
    assert bgn.weight is bn.weight and not bgn.training
    # mixture of (0, 1) and (2, 3): mean 1, second moment ((1 + 0) + (3 + 4)) / 2 = 4 -> var 3
    torch.testing.assert_close(bgn.running_mean, torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(bgn.running_var, torch.tensor([3.0, 1.5]))

    model = nn.Sequential(nn.Conv2d(3, 4, 1), bn, nn.ReLU(), nn.Conv2d(4, 8, 1), nn.BatchNorm2d(8))
    model.train()
    x = torch.randn(5, 3, 2, 2, generator=_gen(14))
    reference = model(x)
    convert_to_batch_group_norm(model, lambda c: c)  # G = C everywhere: same training-mode function as BN
    assert isinstance(model[1], BatchGroupNorm) and isinstance(model[4], BatchGroupNorm)
    assert model[4].num_groups == 8
    torch.testing.assert_close(model(x), reference, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="does not divide"):
        convert_to_batch_group_norm(nn.Sequential(nn.BatchNorm1d(6)), 4)


def test_mixed_precision_input_keeps_dtype() -> None:
    layer = BatchGroupNorm(4, 2)
    x = torch.randn(3, 4, 2, generator=_gen(15)).to(torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), BatchGroupNorm(4, 2)(x.float()), atol=3e-2, rtol=0)
    layer.eval()
    assert layer(x).dtype == torch.bfloat16


@pytest.mark.parametrize("eps", [0.0, -1e-5, float("nan")])
def test_eps_must_be_positive(eps: float) -> None:
    with pytest.raises(ValueError, match=r"BatchGroupNorm: eps must be > 0"):
        BatchGroupNorm(4, 2, eps=eps)
    layer = BatchGroupNorm(4, 2)
    layer.eps = eps  # set after construction: refused when used, not a NaN output
    with pytest.raises(ValueError, match=r"BatchGroupNorm: eps must be > 0"):
        layer(torch.zeros(2, 4, 2, 2))


def test_flat_grouping_refuses_an_eval_size_other_than_the_training_one() -> None:
    layer = BatchGroupNorm(2, 4, grouping="flat")  # at 2x2 a group is half a channel; at 4x4 it would be another
    layer(torch.randn(8, 2, 2, 2, generator=_gen(20)))
    layer.eval()
    assert layer(torch.randn(1, 2, 2, 2)).shape == (1, 2, 2, 2)
    with pytest.raises(ValueError, match=r"gathered on 8 features per sample, the input \(1, 2, 4, 4\) has 32"):
        layer(torch.randn(1, 2, 4, 4))
    # batch statistics in eval, or groups of whole channels: any size
    no_stats = BatchGroupNorm(2, 4, grouping="flat", track_running_stats=False)
    no_stats(torch.randn(8, 2, 2, 2))
    assert no_stats.eval()(torch.randn(2, 2, 4, 4)).shape == (2, 2, 4, 4)
    whole = BatchGroupNorm(4, 2, grouping="flat")
    whole(torch.randn(8, 4, 2, 2))
    assert whole.eval()(torch.randn(1, 4, 4, 4)).shape == (1, 4, 4, 4)
    # the size is not part of the state dict: loaded (also older) or reset statistics are accepted at any size
    other = BatchGroupNorm(2, 4, grouping="flat")
    other.load_state_dict(layer.state_dict())
    assert set(layer.state_dict()) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    assert other.eval()(torch.randn(1, 2, 4, 4)).shape == (1, 2, 4, 4)
    layer.reset_running_stats()
    assert layer(torch.randn(1, 2, 4, 4)).shape == (1, 2, 4, 4)
