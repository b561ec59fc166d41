"""Estimators and mixing rules against closed forms and hand-written references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from tta_norm.stats import (
    MAD_NORMAL_CONSISTENCY,
    Stats,
    alpha_from_prior,
    batch_from_instance,
    batch_mean_var,
    batch_median,
    batch_median_mad,
    batch_median_msd,
    ema_update,
    example_stats,
    iabn_shrink,
    instance_mean_var,
    mix,
    mix_linear,
    mix_mixture,
    pseudo_count_alpha,
)

# ---- hand references (pure Python over lists) -------------------------------------------------------------


def channel_values(x: torch.Tensor, c: int) -> list[float]:
    return x[:, c].reshape(-1).tolist()


def ref_median(v: list[float], rule: str = "lower") -> float:
    s = sorted(v)
    n = len(s)
    if n % 2 == 1:
        return s[n // 2]
    return s[n // 2 - 1] if rule == "lower" else (s[n // 2 - 1] + s[n // 2]) / 2


def ref_mean_var(v: list[float], unbiased: bool = False) -> tuple[float, float]:
    m = sum(v) / len(v)
    return m, sum((a - m) ** 2 for a in v) / (len(v) - (1 if unbiased else 0))


X = torch.tensor(
    [
        [[[1.0, 2.0], [3.0, 10.0]], [[0.0, 0.0], [0.0, 4.0]]],
        [[[5.0, -1.0], [2.0, 2.0]], [[1.0, 1.0], [1.0, 1.0]]],
    ]
)  # (N=2, C=2, 2, 2): 8 values per channel (even count)


def test_mean_var_matches_hand_computation() -> None:
    for unbiased in (False, True):
        mean, var = batch_mean_var(X, unbiased=unbiased)
        for c in range(2):
            m, v = ref_mean_var(channel_values(X, c), unbiased)
            assert mean[c].item() == pytest.approx(m)
            assert var[c].item() == pytest.approx(v)


def test_lower_and_average_median() -> None:
    # channel 0 sorted: -1 1 2 2 2 3 5 10 -> median 2; channel 1 sorted: 0 0 0 1 1 1 1 4 -> median 1
    assert batch_median(X).tolist() == [2.0, 1.0]
    x = torch.tensor([[1.0], [2.0], [7.0], [4.0]])  # (N=4, C=1): lower 2, average 3
    assert batch_median(x).item() == 2.0
    assert batch_median(x, median="average").item() == 3.0
    assert batch_median(x).item() == torch.median(x).item()
    assert batch_median(x, median="average").item() == torch.quantile(x, 0.5).item()


def test_medbn_statistic_is_mean_squared_deviation_from_median() -> None:
    m, s2 = batch_median_msd(X)
    for c in range(2):
        v = channel_values(X, c)
        med = ref_median(v)
        assert m[c].item() == med
        assert s2[c].item() == pytest.approx(sum((a - med) ** 2 for a in v) / len(v))


def test_mad_plain_and_normal_consistent() -> None:
    m, mad2 = batch_median_mad(X)
    _, mad2n = batch_median_mad(X, normal_consistent=True)
    for c in range(2):
        v = channel_values(X, c)
        med = ref_median(v)
        mad = ref_median([abs(a - med) for a in v])
        assert m[c].item() == med
        assert mad2[c].item() == pytest.approx(mad**2)
        assert mad2n[c].item() == pytest.approx((MAD_NORMAL_CONSISTENCY * mad) ** 2)


def test_instance_and_example_stats() -> None:
    mean, var = instance_mean_var(X)
    ex = example_stats(X)
    umean, uvar = instance_mean_var(X, unbiased=True)
    for n in range(2):
        for c in range(2):
            v = X[n, c].reshape(-1).tolist()
            m, b = ref_mean_var(v)
            _, u = ref_mean_var(v, unbiased=True)
            assert mean[n, c].item() == pytest.approx(m)
            assert var[n, c].item() == pytest.approx(b)
            assert ex.var[n, c].item() == pytest.approx(sum(a * a for a in v) / len(v) - m * m, abs=1e-5)
            assert uvar[n, c].item() == pytest.approx(u)
    flat = torch.randn(3, 4)
    m, v = instance_mean_var(flat)
    assert torch.equal(m, flat) and torch.equal(v, torch.zeros_like(flat))


def test_degenerate_cases() -> None:
    one = torch.full((1, 3), 2.5)  # BatchNorm1d with batch 1: one value per channel
    assert batch_mean_var(one).var.tolist() == [0.0, 0.0, 0.0]
    assert batch_median(one).tolist() == [2.5] * 3
    assert batch_median_msd(one).var.tolist() == [0.0] * 3
    with pytest.raises(ValueError, match="at least 2"):
        batch_mean_var(one, unbiased=True)
    const = torch.full((4, 2, 3, 3), -1.0)
    for stats in (batch_mean_var(const), batch_median_msd(const), batch_median_mad(const)):
        assert stats.mean.tolist() == [-1.0, -1.0] and stats.var.tolist() == [0.0, 0.0]
    with pytest.raises(TypeError, match="floating-point"):
        batch_mean_var(torch.ones(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        batch_mean_var(torch.ones(3))


def test_median_gradient_is_subgradient_to_selected_element() -> None:
    x = torch.tensor([[3.0], [1.0], [2.0], [5.0]], requires_grad=True)
    batch_median(x).sum().backward()
    assert x.grad.reshape(-1).tolist() == [0.0, 0.0, 1.0, 0.0]  # lower median = 2
    x.grad = None
    m, s2 = batch_median_msd(x)
    s2.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_iabn_shrink_matches_formula() -> None:
    g = torch.Generator().manual_seed(0)
    inst = Stats(torch.randn(3, 2, generator=g), torch.rand(3, 2, generator=g) * 3)
    ref = Stats(torch.tensor([0.1, -0.2]), torch.tensor([0.5, 2.0]))
    L, k, eps = 9, 1.5, 1e-5
    mu, var = iabn_shrink(inst, ref, L, k=k, eps=eps)
    for n in range(3):
        for c in range(2):
            s_mu = math.sqrt((ref.var[c].item() + eps) / L)
            s_var = (ref.var[c].item() + eps) * math.sqrt(2 / (L - 1))
            d = inst.mean[n, c].item() - ref.mean[c].item()
            exp_mu = ref.mean[c].item() + math.copysign(max(abs(d) - k * s_mu, 0.0), d)
            dv = inst.var[n, c].item() - ref.var[c].item()
            exp_var = max(ref.var[c].item() + math.copysign(max(abs(dv) - k * s_var, 0.0), dv), 0.0)
            assert mu[n, c].item() == pytest.approx(exp_mu, abs=1e-6)
            assert var[n, c].item() == pytest.approx(exp_var, abs=1e-6)
    same = iabn_shrink(inst, ref, 1)  # L <= 1: no correction
    assert torch.equal(same.mean, ref.mean.expand(3, 2))


def test_mixing_rules_closed_forms() -> None:
    t = Stats(torch.tensor([1.0, 2.0]), torch.tensor([4.0, 1.0]))
    s = Stats(torch.tensor([0.0, -1.0]), torch.tensor([1.0, 2.0]))
    a = 0.25
    lin = mix_linear(t, s, a)
    assert lin.mean.tolist() == pytest.approx([0.25, -0.25])
    assert lin.var.tolist() == pytest.approx([1.75, 1.75])
    mx = mix_mixture(t, s, a)
    assert mx.var.tolist() == pytest.approx([1.75 + a * (1 - a) * 1.0, 1.75 + a * (1 - a) * 9.0])
    assert mix(t, s, a, "linear").var.tolist() == lin.var.tolist()
    with pytest.raises(ValueError, match="unknown mixing rule"):
        mix(t, s, a, "cubic")
    ema = ema_update(s, t, 0.05)
    assert ema.mean.tolist() == pytest.approx([0.05, -0.85])
    # channel-wise alpha
    cw = mix_mixture(t, s, torch.tensor([0.0, 1.0]))
    assert cw.mean.tolist() == [0.0, 2.0] and cw.var.tolist() == [1.0, 1.0]
    assert alpha_from_prior(0.9) == pytest.approx(0.1)
    assert pseudo_count_alpha(16, 16) == 0.5 and pseudo_count_alpha(1) == pytest.approx(1 / 17)


def test_mixture_equals_pooled_samples_when_alpha_is_sample_fraction() -> None:
    g = torch.Generator().manual_seed(1)
    test_x = torch.randn(6, 3, generator=g) * 2 + 1
    src_x = torch.randn(10, 3, generator=g) - 0.5
    pooled = batch_mean_var(torch.cat([test_x, src_x]))
    mixed = mix_mixture(batch_mean_var(test_x), batch_mean_var(src_x), 6 / 16)
    torch.testing.assert_close(mixed.mean, pooled.mean)
    torch.testing.assert_close(mixed.var, pooled.var)


# ---- property tests ----------------------------------------------------------------------------------------
finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)
shapes = st.tuples(st.integers(1, 5), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3))


@settings(max_examples=60, deadline=None)
@given(shapes.flatmap(lambda s: arrays(np.float32, s, elements=finite)))
def test_property_estimators_match_numpy(a: np.ndarray) -> None:
    x = torch.from_numpy(a)
    rows = np.moveaxis(a, 1, 0).reshape(a.shape[1], -1).astype(np.float64)
    mean, var = batch_mean_var(x)
    np.testing.assert_allclose(mean.numpy(), rows.mean(1), rtol=1e-4, atol=1e-2)
    np.testing.assert_allclose(var.numpy(), rows.var(1), rtol=1e-3, atol=1e-1)
    assert (var >= 0).all()
    # the differentiable per-instance-moments path (taken when a gradient is needed) agrees
    g_mean, g_var = batch_mean_var(x.clone().requires_grad_(True))
    np.testing.assert_allclose(g_mean.detach().numpy(), rows.mean(1), rtol=1e-4, atol=1e-2)
    np.testing.assert_allclose(g_var.detach().numpy(), rows.var(1), rtol=1e-3, atol=1e-1)
    lower = np.sort(rows, axis=1)[:, (rows.shape[1] - 1) // 2]
    np.testing.assert_array_equal(batch_median(x).numpy(), lower.astype(np.float32))
    np.testing.assert_allclose(batch_median(x, median="average").numpy(), np.median(rows, axis=1), rtol=1e-6, atol=1e-3)
    med, msd = batch_median_msd(x)
    np.testing.assert_allclose(msd.numpy(), ((rows - lower[:, None]) ** 2).mean(1), rtol=1e-3, atol=1e-1)
    # the median lies between min and max; the MSD around the median is >= the variance
    assert (med.numpy() >= rows.min(1)).all() and (med.numpy() <= rows.max(1)).all()
    assert (msd >= var * (1 - 1e-4) - 1e-2).all()


@settings(max_examples=60, deadline=None)
@given(
    shapes.flatmap(lambda s: arrays(np.float32, s, elements=finite)),
    st.floats(-100, 100, allow_nan=False),
    st.floats(0.1, 10, allow_nan=False),
)
def test_property_equivariance(a: np.ndarray, shift: float, scale: float) -> None:
    x = torch.from_numpy(a).double()
    y = x * scale + shift
    for fn in (batch_mean_var, batch_median_msd, batch_median_mad):
        sx, sy = fn(x), fn(y)
        torch.testing.assert_close(sy.mean, sx.mean * scale + shift, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(sy.var, sx.var * scale**2, rtol=1e-6, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-10, 10, allow_nan=False), min_size=4, max_size=4),
    st.lists(st.floats(0, 10, allow_nan=False), min_size=4, max_size=4),
    st.floats(0, 1),
)
def test_property_mixing_bounds(vals: list[float], vars_: list[float], a: float) -> None:
    t = Stats(torch.tensor(vals[:2], dtype=torch.float64), torch.tensor(vars_[:2], dtype=torch.float64))
    s = Stats(torch.tensor(vals[2:], dtype=torch.float64), torch.tensor(vars_[2:], dtype=torch.float64))
    lin, mx = mix_linear(t, s, a), mix_mixture(t, s, a)
    lo, hi = torch.minimum(t.mean, s.mean), torch.maximum(t.mean, s.mean)
    assert ((lin.mean >= lo - 1e-9) & (lin.mean <= hi + 1e-9)).all()
    assert (mx.var >= lin.var - 1e-9).all()  # the cross term is non-negative
    torch.testing.assert_close(mix_linear(t, s, 1.0).mean, t.mean)
    torch.testing.assert_close(mix_mixture(t, s, 0.0).var, s.var)


@pytest.mark.parametrize("shape", [(7, 1), (4, 1, 3, 3), (5, 3, 2, 2)])
def test_median_never_modifies_its_input(shape: tuple[int, ...]) -> None:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(4))
    before = x.clone()
    batch_median(x)
    batch_median(x, median="average")
    batch_median_mad(x)
    assert torch.equal(x, before)


def test_ill_conditioned_moments_fall_back_to_exact_two_pass() -> None:
    x = (torch.randn(8, 2, 5, 5, generator=torch.Generator().manual_seed(5)) * 0.05 + 100).float()
    ref = x.double().transpose(0, 1).reshape(2, -1)
    naive = (x.square().mean((0, 2, 3)) - x.mean((0, 2, 3)).square()).double()
    mean, var = (t.detach() for t in batch_mean_var(x.requires_grad_(True)))  # the per-instance-moments path
    torch.testing.assert_close(var.double(), ref.var(1, unbiased=False), rtol=1e-4, atol=0)
    assert ((naive - ref.var(1, unbiased=False)).abs() > 1e-2 * ref.var(1, unbiased=False)).any()
    torch.testing.assert_close(mean.double(), ref.mean(1))


def test_fused_moments_path_and_sums_path_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    import tta_norm.stats.estimators as est

    x = torch.randn(6, 4, 7, 7, generator=torch.Generator().manual_seed(8)) * 3 + 2
    x[2, 1] = 5.0  # a constant instance: variance exactly 0 on the fused path (inf inverse std -> 0)
    ref = x.double().transpose(0, 1).reshape(4, -1)
    fused = batch_mean_var(x)
    inst = est._instance_moments(x)
    assert inst.var[2, 1].item() == 0.0
    monkeypatch.setattr(est, "FUSED_MOMENTS_MAX", 0)
    sums = batch_mean_var(x)
    for stats in (fused, sums):  # float32 results against float64 references: float32 tolerances
        torch.testing.assert_close(stats.mean, ref.mean(1).float())
        torch.testing.assert_close(stats.var, ref.var(1, unbiased=False).float())
    torch.testing.assert_close(batch_mean_var(x, unbiased=True).var, x.transpose(0, 1).reshape(4, -1).var(1))
    one = batch_from_instance(est._instance_moments(x[:1]))
    torch.testing.assert_close(one.var, x[0].reshape(4, -1).var(1, unbiased=False))


@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_moments_of_offset_heavy_activations_keep_float32_precision(channels_last) -> None:
    from tta_norm.stats.estimators import FUSED_MOMENTS_MAX, batch_mean_var

    torch.manual_seed(0)
    x = torch.randn(8, 8, 96, 96) * torch.rand(1, 8, 1, 1).add(0.5) + 50.0  # mean / std ~ 50
    assert x.numel() > FUSED_MOMENTS_MAX  # the per-instance sums, not the fused kernel
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    stats, ref = batch_mean_var(x), batch_mean_var(x.double())
    err = ((stats.var.double() - ref.var) / ref.var).abs().max()
    assert err < 1e-5, err  # E[x^2] - E[x]^2 unshifted: 1e-3
    torch.testing.assert_close(stats.mean.double(), ref.mean, rtol=1e-6, atol=0)


@pytest.mark.parametrize(("offset", "scale"), [(100.0, 0.01), (1e4, 1.0), (1000.0, 0.001)])
def test_fused_moments_of_offset_heavy_activations_keep_float32_precision(offset, scale) -> None:
    """The fused group-norm moments (no gradient, small inputs) skipped the conditioning rule (a relative error
    of 4e-4 at mean 100 / std 0.01, 2e-2 at 1000 / 0.001), and the batch variance from offset-heavy instance
    means rounded with them (3e-3 at 1000 / 0.001), also with gradients."""
    from tta_norm.stats.estimators import FUSED_MOMENTS_MAX, _instance_moments, batch_mean_var

    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * scale + offset
    assert x.numel() <= FUSED_MOMENTS_MAX and not x.requires_grad
    pairs = ((_instance_moments(x), _instance_moments(x.double())), (batch_mean_var(x), batch_mean_var(x.double())))
    for got, ref in (*pairs, (batch_mean_var(x.clone().requires_grad_(True)), pairs[1][1])):
        err = ((got.var.detach().double() - ref.var) / ref.var).abs().max()
        assert err < 1e-5, err
        torch.testing.assert_close(got.mean.detach().double(), ref.mean, rtol=1e-6, atol=0)


def test_order_statistics_of_a_channel_with_nan_are_nan_on_every_path() -> None:
    """NumPy's introselect orders NaN last, so the CPU median and MAD of a channel holding a NaN came out finite
    (torch.median, the other devices' path and the kernel give NaN); the gradient then found no element."""
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(2))
    x[1, 1, 2, 2] = float("nan")
    rows = x.transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(batch_median(x), rows.median(1).values, equal_nan=True)
    for stats in (batch_median_mad(x), batch_median_msd(x)):
        assert stats.mean.isnan().tolist() == [False, True, False] and stats.var[1].isnan()
    xg = x.clone().requires_grad_(True)
    batch_median(xg).sum().backward()
    assert xg.grad.sum() == 3 and xg.grad[1, 1, 2, 2] == 1  # the NaN's channel: to the NaN, as torch.median


def test_shifted_instance_moments_are_differentiable() -> None:
    from tta_norm.stats.estimators import batch_mean_var

    torch.manual_seed(0)
    x = (torch.randn(3, 2, 4, 4, dtype=torch.float64) + 30.0).requires_grad_(True)  # the shifted branch

    def f(t):
        s = batch_mean_var(t)
        return s.mean, s.var

    assert torch.autograd.gradcheck(f, (x,))
    var_ref = torch.var_mean(x.detach(), dim=(0, 2, 3), correction=0)[0]
    torch.testing.assert_close(f(x)[1].detach(), var_ref)
