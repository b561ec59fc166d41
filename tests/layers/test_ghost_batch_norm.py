"""Ghost batch normalization against BatchNorm applied per chunk and against hand computations."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tta_norm.layers import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d, convert_to_ghost_bn, ghost_chunk_sizes

ATOL = 1e-5


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randomize(bn: nn.Module, seed: int) -> None:
    """Non-trivial affine parameters and running statistics."""
    g = _gen(seed)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(bn.num_features, generator=g))
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)


def _per_chunk_reference(bn: nn.Module, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Plain BatchNorm applied to the ghost batches one after another (the behaviour Ghost BN must match)."""
    return torch.cat([bn(c) for c in torch.split(x, sizes)], dim=0)


@pytest.mark.parametrize(
    ("batch", "g", "remainder", "expected"),
    [
        (8, 4, "merge", [4, 4]),
        (10, 4, "merge", [4, 6]),
        (10, 4, "separate", [4, 4, 2]),
        (9, 4, "separate", [4, 4, 1]),
        (3, 4, "merge", [3]),
        (3, 4, "separate", [3]),
        (8, 8, "error", [8]),
        (12, 1, "merge", [1] * 12),
    ],
)
def test_chunk_sizes(batch: int, g: int, remainder: str, expected: list[int]) -> None:
    assert ghost_chunk_sizes(batch, g, remainder) == expected  # type: ignore[arg-type]


def test_chunk_sizes_error_mode() -> None:
    with pytest.raises(ValueError, match="not a multiple"):
        ghost_chunk_sizes(10, 4, "error")
    with pytest.raises(ValueError, match="positive"):
        ghost_chunk_sizes(10, 0)


@pytest.mark.parametrize(
    ("cls", "bn_cls", "shape"),
    [
        (GhostBatchNorm1d, nn.BatchNorm1d, (6, 3)),
        (GhostBatchNorm1d, nn.BatchNorm1d, (6, 3, 5)),
        (GhostBatchNorm2d, nn.BatchNorm2d, (6, 3, 4, 5)),
        (GhostBatchNorm3d, nn.BatchNorm3d, (6, 3, 2, 3, 4)),
    ],
)
def test_ghost_size_equal_batch_is_batchnorm(cls, bn_cls, shape) -> None:
    x = torch.randn(*shape, generator=_gen(0))
    bn = bn_cls(3, momentum=0.2)
    _randomize(bn, 1)
    gbn = cls.from_batchnorm(bn_cls(3), ghost_batch_size=shape[0])
    gbn.load_state_dict(bn.state_dict())
    for _ in range(3):  # a few steps: running statistics must track BN's exactly
        gbn.momentum = bn.momentum
        torch.testing.assert_close(gbn(x), bn(x), atol=ATOL, rtol=0)
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(gbn, key), getattr(bn, key), atol=ATOL, rtol=0)
    bn.eval()
    gbn.eval()
    torch.testing.assert_close(gbn(x), bn(x), atol=ATOL, rtol=0)


def test_two_chunks_scaled_momentum_by_hand() -> None:
    """2 ghost batches: outputs = BN on each half; running stats = two EMA steps with momentum m/2."""
    x = torch.randn(8, 2, 3, 3, generator=_gen(2))
    m = 0.3
    gbn = GhostBatchNorm2d(2, ghost_batch_size=4, momentum=m, eps=1e-5)
    _randomize(gbn, 3)
    r_mean0, r_var0 = gbn.running_mean.clone(), gbn.running_var.clone()
    out = gbn(x)

    halves = [x[:4], x[4:]]
    expected = []
    means, unbiased = [], []
    for h in halves:
        mu = h.mean(dim=(0, 2, 3))
        var = h.var(dim=(0, 2, 3), unbiased=False)
        xhat = (h - mu[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + 1e-5)
        expected.append(xhat * gbn.weight[None, :, None, None] + gbn.bias[None, :, None, None])
        means.append(mu)
        unbiased.append(h.var(dim=(0, 2, 3), unbiased=True))
    torch.testing.assert_close(out, torch.cat(expected), atol=ATOL, rtol=0)
    a = m / 2
    exp_mean = (1 - a) ** 2 * r_mean0 + a * (1 - a) * means[0] + a * means[1]
    exp_var = (1 - a) ** 2 * r_var0 + a * (1 - a) * unbiased[0] + a * unbiased[1]
    torch.testing.assert_close(gbn.running_mean, exp_mean, atol=ATOL, rtol=0)
    torch.testing.assert_close(gbn.running_var, exp_var, atol=ATOL, rtol=0)
    assert int(gbn.num_batches_tracked) == 2


@pytest.mark.parametrize(("scale_momentum", "momentum"), [(True, 0.1), (False, 0.1), (True, None), (False, None)])
def test_two_chunks_equal_per_chunk_bn(scale_momentum: bool, momentum: float | None) -> None:
    x = torch.randn(10, 3, 2, 2, generator=_gen(4)) * 2 + 1
    bn = nn.BatchNorm2d(3, momentum=momentum)
    _randomize(bn, 5)
    bn.num_batches_tracked.fill_(3)
    gbn = GhostBatchNorm2d.from_batchnorm(bn, 5, scale_momentum=scale_momentum)
    gbn.load_state_dict(bn.state_dict())
    out = gbn(x)
    if momentum is not None and scale_momentum:
        bn.momentum = momentum / 2
    ref = _per_chunk_reference(bn, x, [5, 5])
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(gbn, key), getattr(bn, key), atol=ATOL, rtol=0)


@given(
    batch=st.integers(1, 13),
    g=st.integers(1, 6),
    channels=st.integers(1, 4),
    spatial=st.sampled_from([(), (3,), (2, 3)]),
    remainder=st.sampled_from(["merge", "separate"]),
    scale_momentum=st.booleans(),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=60, deadline=None)
def test_property_matches_per_chunk_bn(batch, g, channels, spatial, remainder, scale_momentum, seed) -> None:
    sizes = ghost_chunk_sizes(batch, g, remainder)
    per_channel = int(torch.tensor(spatial).prod()) if spatial else 1
    bn_cls = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d}[len(spatial)]
    bn = bn_cls(channels, momentum=0.2)
    _randomize(bn, seed)
    gbn = convert_to_ghost_bn(bn_cls(channels, momentum=0.2), g, scale_momentum=scale_momentum, remainder=remainder)
    gbn.load_state_dict(bn.state_dict())
    x = torch.randn(batch, channels, *spatial, generator=_gen(seed), requires_grad=True)
    if min(sizes) * per_channel <= 1:
        with pytest.raises(ValueError, match="fewer than 2 values"):
            gbn(x)
        return
    out = gbn(x)
    if scale_momentum:
        bn.momentum = 0.2 / len(sizes)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = _per_chunk_reference(bn, x_ref, sizes)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(gbn, key), getattr(bn, key), atol=1e-5, rtol=1e-5)
    # gradients w.r.t. input and affine parameters agree too
    w = torch.randn(out.shape, generator=_gen(seed + 1))
    (out * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gbn.weight.grad, bn.weight.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gbn.bias.grad, bn.bias.grad, atol=1e-4, rtol=1e-4)


def test_remainder_rules() -> None:
    x = torch.randn(10, 2, 3, generator=_gen(6))
    merged = GhostBatchNorm1d(2, 4, remainder="merge", momentum=None)
    separate = GhostBatchNorm1d(2, 4, remainder="separate", momentum=None)
    strict = GhostBatchNorm1d(2, 4, remainder="error")
    ref = nn.BatchNorm1d(2, momentum=None)
    torch.testing.assert_close(merged(x), _per_chunk_reference(ref, x, [4, 6]), atol=ATOL, rtol=0)
    ref = nn.BatchNorm1d(2, momentum=None)
    torch.testing.assert_close(separate(x), _per_chunk_reference(ref, x, [4, 4, 2]), atol=ATOL, rtol=0)
    torch.testing.assert_close(separate.running_var, ref.running_var, atol=ATOL, rtol=0)
    assert int(merged.num_batches_tracked) == 2 and int(separate.num_batches_tracked) == 3
    with pytest.raises(ValueError, match="drop_last"):
        strict(x)
    strict(x[:8])  # divisible batches are fine


def test_batch_smaller_than_ghost_size_is_bn() -> None:
    x = torch.randn(3, 4, generator=_gen(7))
    gbn, bn = GhostBatchNorm1d(4, 16), nn.BatchNorm1d(4)
    torch.testing.assert_close(gbn(x), bn(x), atol=ATOL, rtol=0)
    torch.testing.assert_close(gbn.running_var, bn.running_var, atol=ATOL, rtol=0)


def test_single_value_chunk_errors_like_batchnorm() -> None:
    gbn = GhostBatchNorm1d(3, 4, remainder="separate")
    with pytest.raises(ValueError, match="fewer than 2 values"):
        gbn(torch.randn(9, 3))  # last ghost batch has one sample and no spatial extent
    GhostBatchNorm1d(3, 4, remainder="merge")(torch.randn(9, 3))  # merged into the previous chunk: fine
    gbn.eval()
    assert gbn(torch.randn(1, 3)).shape == (1, 3)  # eval uses running statistics
    untracked = GhostBatchNorm1d(3, 4, track_running_stats=False).eval()  # eval on batch statistics, as BN does
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        nn.BatchNorm1d(3, track_running_stats=False).eval()(torch.randn(1, 3))
    with pytest.raises(ValueError, match="fewer than 2 values"):
        untracked(torch.randn(1, 3))


def test_eval_uses_running_stats_and_no_tracking_uses_ghost_stats() -> None:
    x = torch.randn(8, 3, 2, 2, generator=_gen(8))
    bn = nn.BatchNorm2d(3)
    _randomize(bn, 9)
    gbn = GhostBatchNorm2d.from_batchnorm(bn, 2)
    bn.eval()
    gbn.eval()
    before = gbn.running_mean.clone()
    torch.testing.assert_close(gbn(x), bn(x), atol=ATOL, rtol=0)
    torch.testing.assert_close(gbn.running_mean, before)  # no update in eval

    free = GhostBatchNorm2d(3, 4, track_running_stats=False).eval()
    ref = nn.BatchNorm2d(3, track_running_stats=False).eval()
    assert free.running_mean is None
    torch.testing.assert_close(free(x), _per_chunk_reference(ref, x, [4, 4]), atol=ATOL, rtol=0)


def test_from_batchnorm_shares_parameters_and_copies_buffers() -> None:
    bn = nn.BatchNorm2d(4, eps=1e-3, momentum=0.05, dtype=torch.float64)
    _randomize(bn, 10)
    bn.eval()
    gbn = GhostBatchNorm2d.from_batchnorm(bn, 8, scale_momentum=False, remainder="separate")
    assert isinstance(gbn, nn.BatchNorm2d)
    assert gbn.weight is bn.weight and gbn.bias is bn.bias
    assert gbn.running_mean is not bn.running_mean
    torch.testing.assert_close(gbn.running_var, bn.running_var)
    assert (gbn.eps, gbn.momentum, gbn.training, gbn.running_mean.dtype) == (1e-3, 0.05, False, torch.float64)
    assert (gbn.ghost_batch_size, gbn.scale_momentum, gbn.remainder) == (8, False, "separate")
    with pytest.raises(TypeError, match="BatchNorm2d"):
        GhostBatchNorm2d.from_batchnorm(nn.BatchNorm1d(4), 8)


def test_state_dict_round_trip_and_bn_compatibility() -> None:
    gbn = GhostBatchNorm2d(3, 2)
    gbn(torch.randn(6, 3, 2, 2, generator=_gen(11)))
    buf = io.BytesIO()
    torch.save(gbn.state_dict(), buf)
    buf.seek(0)
    other = GhostBatchNorm2d(3, 2)
    other.load_state_dict(torch.load(buf))
    for key, value in gbn.state_dict().items():
        torch.testing.assert_close(other.state_dict()[key], value)
    assert set(gbn.state_dict()) == set(nn.BatchNorm2d(3).state_dict())
    nn.BatchNorm2d(3).load_state_dict(gbn.state_dict())  # loads into a plain BN, strict


@pytest.mark.parametrize("bad", [0, -2, 2.0, True])
def test_bad_ghost_batch_size(bad) -> None:
    with pytest.raises(ValueError, match="ghost_batch_size"):
        GhostBatchNorm2d(3, bad)
    with pytest.raises(ValueError, match="ghost_batch_size"):
        convert_to_ghost_bn(nn.Sequential(nn.BatchNorm2d(3)), bad)
    with pytest.raises(ValueError, match="ghost_batch_size must be a positive integer"):
        convert_to_ghost_bn(nn.Sequential(nn.ReLU()), bad)  # checked before looking for layers


def test_shape_errors() -> None:
    gbn = GhostBatchNorm2d(3, 2)
    with pytest.raises(ValueError, match="num_features=3"):
        gbn(torch.randn(4, 5, 2, 2))
    with pytest.raises(ValueError, match="4D"):
        gbn(torch.randn(4, 3))
    with pytest.raises(ValueError, match="remainder"):
        GhostBatchNorm2d(3, 2, remainder="drop")  # type: ignore[arg-type]


def test_convert_model() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 6), nn.BatchNorm1d(6)
    )
    for m in model:
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            _randomize(m, 12)
    x = torch.randn(8, 3, 6, 6, generator=_gen(13))
    model.eval()
    before = model(x)
    converted = convert_to_ghost_bn(model, 4)
    assert converted is model
    assert isinstance(model[1], GhostBatchNorm2d) and isinstance(model[5], GhostBatchNorm1d)
    torch.testing.assert_close(model(x), before)  # eval: running stats were carried over
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert_to_ghost_bn(model, 4)  # already converted: nothing to do, no warning
    with pytest.warns(UserWarning, match="SyncBatchNorm"):
        convert_to_ghost_bn(nn.Sequential(nn.SyncBatchNorm(3)), 4)
    single = convert_to_ghost_bn(nn.BatchNorm3d(2), 3)
    assert isinstance(single, GhostBatchNorm3d)


def test_half_precision_input_keeps_dtype() -> None:
    gbn = GhostBatchNorm1d(3, 2).to(torch.bfloat16)
    x = torch.randn(4, 3, generator=_gen(14)).to(torch.bfloat16)
    out = gbn(x)
    assert out.dtype == torch.bfloat16
    ref = nn.BatchNorm1d(3)
    torch.testing.assert_close(out.float(), _per_chunk_reference(ref, x.float(), [2, 2]), atol=5e-2, rtol=0)


def test_mixed_precision_input_with_float32_parameters() -> None:
    """Low-precision input with float32 parameters (as under autocast): statistics in float32, output in bf16."""
    gbn = GhostBatchNorm2d(3, 2)
    x = torch.randn(4, 3, 2, 2, generator=_gen(15))
    out = gbn(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    ref = nn.BatchNorm2d(3, momentum=0.1 / 2)  # two ghost batches, scaled momentum
    expected = _per_chunk_reference(ref, x.to(torch.bfloat16).float(), [2, 2])
    torch.testing.assert_close(out.float(), expected, atol=3e-2, rtol=0)
    torch.testing.assert_close(gbn.running_var, ref.running_var, atol=1e-5, rtol=0)
