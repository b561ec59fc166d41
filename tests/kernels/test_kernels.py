"""The compiled CPU kernel (tta_norm.kernels) against the ATen path and closed forms."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tta_norm
from tta_norm import kernels
from tta_norm.norm import AdaptiveNorm, NormSpec
from tta_norm.stats.estimators import batch_mean_var, batch_median_mad, batch_median_msd

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"fused kernel: {kernels.status()}")

SHAPES = [(7, 5), (3, 4, 5), (1, 6, 3, 3), (2, 3, 2, 2, 2), (8, 4, 16, 16), (40, 3, 16, 16)]  # last: > 4096


@pytest.fixture
def aten_only(monkeypatch):
    """A context in which the kernel counts as unavailable (the ATen path runs)."""

    def switch():
        monkeypatch.setattr(kernels, "_lib", None)

    return switch


def _data(shape, kind: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * 2.5 + 0.7
    if kind == "relu":  # many ties at 0
        x = x.relu()
    elif kind == "int":  # heavy ties
        x = x.round().clamp(-2, 2)
    return x


REFERENCE = {
    "mean_var": lambda x, m, u: batch_mean_var(x, unbiased=u),
    "median_msd": lambda x, m, u: batch_median_msd(x, median=m),
    "median_mad": lambda x, m, u: batch_median_mad(x, median=m),
    "median_mad_normal": lambda x, m, u: batch_median_mad(x, median=m, normal_consistent=True),
}


@pytest.mark.parametrize("estimator", list(kernels.ESTIMATOR_CODES))
@pytest.mark.parametrize("median", ["lower", "average"])
@pytest.mark.parametrize("kind", ["normal", "relu", "int"])
def test_kernel_statistics_equal_the_estimators(estimator, median, kind):
    for shape in SHAPES:
        x = _data(shape, kind)
        unbiased = estimator == "mean_var" and median == "average"  # cover both variance conventions
        stats = torch.empty(2, shape[1])
        out = kernels.fused_norm(
            x, kernels.ESTIMATOR_CODES[estimator], 0, stats_out=stats, unbiased=unbiased,
            average_median=median == "average",
        )  # fmt: skip
        ref = REFERENCE[estimator](x, median, unbiased)
        torch.testing.assert_close(stats[0], ref.mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(stats[1], ref.var, rtol=1e-5, atol=1e-6)
        view = (1, -1) + (1,) * (x.dim() - 2)
        expected = (x - ref.mean.view(view)) / (ref.var.view(view) + 1e-5).sqrt()
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 30),
    c=st.integers(1, 3),
    length=st.sampled_from([1, 2, 7, 64, 300]),
    seed=st.integers(0, 2**16),
    ties=st.booleans(),
)
def test_kernel_median_is_an_exact_order_statistic(n, c, length, seed, ties):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, length, generator=g)
    if ties:
        x = (x * 2).round()
    stats = torch.empty(2, c)
    kernels.fused_norm(x, kernels.ESTIMATOR_CODES["median_msd"], 0, stats_out=stats)
    rows = x.transpose(0, 1).reshape(c, -1)
    torch.testing.assert_close(stats[0], rows.median(1).values, rtol=0, atol=0)  # torch: lower median
    kernels.fused_norm(x, kernels.ESTIMATOR_CODES["median_msd"], 0, stats_out=stats, average_median=True)
    torch.testing.assert_close(stats[0], rows.quantile(0.5, dim=1), rtol=0, atol=1e-6)


def test_kernel_median_exact_when_the_sample_misleads():
    """The kernel samples runs of 16 values at evenly spread positions; planting huge values at every 16-aligned
    run (half of all values) makes the sampled bracket miss the true median, so the exact fallback must run.
    Sorted and constant channels too."""
    x = torch.randn(50, 1, 1024, generator=torch.Generator().manual_seed(1))
    runs = x.view(50, 1, 64, 16)
    runs[:, :, ::2] = 1000.0 + torch.arange(16, dtype=torch.float32)  # every other run: far above the rest
    planted = x
    ordered = torch.sort(torch.randn(50 * 1024))[0].view(50, 1, 1024)
    constant = torch.full((50, 1, 1024), 3.0)
    before = kernels.median_fallbacks()
    for t in (planted, ordered, constant):
        stats = torch.empty(2, 1)
        kernels.fused_norm(t, kernels.ESTIMATOR_CODES["median_mad"], 0, stats_out=stats)
        m = t.flatten().median()
        assert stats[0, 0] == m
        assert stats[1, 0] == (t.flatten() - m).abs().median().square()
    assert kernels.median_fallbacks() > before  # the planted channel took the fallback


def test_kernel_moments_of_ill_conditioned_channels():
    """Mean far above the spread, and a first value far from the mean (the kernel's shift): float64 reference."""
    g = torch.Generator().manual_seed(2)
    x = 1000.0 + 0.05 * torch.randn(30, 2, 200, generator=g)
    x[0, 1, 0] = 1500.0
    stats = torch.empty(2, 2)
    kernels.fused_norm(x, kernels.ESTIMATOR_CODES["mean_var"], 0, stats_out=stats)
    ref = batch_mean_var(x.double())
    torch.testing.assert_close(stats.double(), torch.stack(ref), rtol=2e-4, atol=0)


@pytest.mark.skipif("avx512f" not in kernels._machine_tag(), reason="no AVX-512 here: one path only")
def test_portable_build_equals_the_avx512_build(monkeypatch):
    """The kernel's non-AVX-512 bracket pass (other CPUs) gives the same exact medians."""
    portable = kernels._Kernel(kernels._build(kernels._compiler(), ("-mno-avx512f",)))
    x = _data((64, 3, 16, 16), "relu", 7)
    x[5, 1, 2, 3] = float("nan")
    results = []
    for lib in (kernels._lib, portable):
        monkeypatch.setattr(kernels, "_lib", lib)
        stats = torch.empty(2, 3)
        out = kernels.fused_norm(x, kernels.ESTIMATOR_CODES["median_mad"], 0, stats_out=stats)
        results.append((stats, out))
    torch.testing.assert_close(results[0][0], results[1][0], equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], equal_nan=True)
    rows = x[:, 0].flatten()
    assert results[1][0][0, 0] == rows.median()


def test_kernel_nan_channel_gives_nan_statistics():
    x = torch.randn(10, 2, 600)
    x[3, 1, 5] = float("nan")
    stats = torch.empty(2, 2)
    kernels.fused_norm(x, kernels.ESTIMATOR_CODES["median_msd"], 0, stats_out=stats)
    assert torch.isfinite(stats[:, 0]).all() and torch.isnan(stats[0, 1])


def test_kernel_declines_what_it_cannot_take():
    x = torch.randn(4, 3, 5, 5)
    assert kernels.fused_norm(x.double(), 0, 0) is None
    assert kernels.fused_norm(x.transpose(2, 3), 0, 0) is None  # strided
    assert kernels.fused_norm(torch.randn(0, 3, 5), 0, 0) is None
    assert kernels.fused_norm(x, 0, 1, ref_mean=torch.zeros(3, dtype=torch.float64), ref_var=torch.ones(3)) is None
    with pytest.raises(ValueError, match="ref_mean"):
        kernels.fused_norm(x, 0, 1)


# ------------------------------------------------------------------------------- the layer, fused vs ATen

SPECS = {
    "tbn": NormSpec(),
    "tbn-unbiased": NormSpec(unbiased=True),
    "alpha": NormSpec(mixing="linear", alpha=0.3),
    "prior": NormSpec(mixing="linear", pseudo_count=16),
    "mixture": NormSpec(mixing="mixture", alpha=0.2),
    "ttn": NormSpec(mixing="mixture", alpha=0.4, channelwise=True),
    "ema": NormSpec(mixing="ema", momentum=0.1),
    "medbn": NormSpec(estimator="median_msd"),
    "medbn-avg": NormSpec(estimator="median_msd", median="average"),
    "medbn-mad-normal": NormSpec(estimator="median_mad_normal"),
    "median-ema": NormSpec(estimator="median_mad", mixing="ema"),
    "median-linear": NormSpec(estimator="median_msd", mixing="linear", alpha=0.5),
    "iabn": NormSpec(mixing="source", instance="iabn"),
    "iabn-k1": NormSpec(mixing="source", instance="iabn", iabn_k=1.0),
    "tbn-iabn": NormSpec(instance="iabn"),
    "iew": NormSpec(mixing="source", instance="example", example_weight=1.0 / 8),
    "ema-example": NormSpec(mixing="ema", instance="example", example_weight=0.25),
}


def _layer(spec: NormSpec, c: int, affine: bool = True) -> AdaptiveNorm:
    g = torch.Generator().manual_seed(5)
    layer = AdaptiveNorm(
        c, spec, affine=affine, source_mean=torch.randn(c, generator=g), source_var=torch.rand(c, generator=g) + 0.5
    )
    if affine:
        with torch.no_grad():
            layer.weight.copy_(torch.randn(c, generator=g))
            layer.bias.copy_(torch.randn(c, generator=g))
    if spec.channelwise:
        with torch.no_grad():
            layer.mix_weight.copy_(torch.tensor([-0.5, 0.0, 0.3, 1.0, 1.7])[torch.arange(c) % 5])  # clamped
    return layer


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("affine", [True, False])
def test_layer_fused_equals_aten_path(name, affine, aten_only):
    spec = SPECS[name]
    batches = [_data((6, 5, 7, 7), "normal", s) for s in range(3)]
    batches += [_data((1, 5, 3, 3), "relu", 9), _data((6, 5), "normal", 4), _data((3, 5, 11), "int", 5)]
    fused, aten = _layer(spec, 5, affine), _layer(spec, 5, affine)
    with torch.no_grad():
        fused_out = [fused(x) for x in batches]
        assert fused._fused is not None
        aten_only()
        aten_out = [aten(x) for x in batches]
    for a, b in zip(fused_out, aten_out, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.state_dict(), aten.state_dict(), rtol=1e-6, atol=1e-6)  # EMA state


def test_layer_fused_ema_keeps_state_of_non_finite_channels():
    layer = _layer(SPECS["ema"], 5)
    before = layer.ema_mean.clone(), layer.ema_var.clone()
    x = _data((4, 5, 6, 6), "normal")
    x[0, 2, 1, 1] = float("inf")
    with torch.no_grad():
        layer(x)
    changed = layer.ema_mean != before[0]
    assert changed.tolist() == [True, True, False, True, True]
    assert layer.ema_var[2] == before[1][2]


@pytest.mark.parametrize(
    "spec", [NormSpec(mixing="mixture", alpha=0.5), NormSpec(mixing="mixture", alpha=0.5, channelwise=True)]
)
def test_layer_fused_mixed_variance_beyond_float_range_is_nan_as_on_the_aten_path(spec, aten_only):
    """A finite input whose mixed variance (alpha (1 - alpha) (mu_t - mu_s)^2) overflows float32: the kernel
    normalised with 1 / sqrt(inf) = 0 (every value its channel's bias), the ATen path with NaN, which the
    wrapper refuses."""
    x = 6e19 + torch.randn(4, 5, 5, 5, generator=torch.Generator().manual_seed(0)) * 1e14
    assert torch.isfinite(x).all()
    fused, aten = _layer(spec, 5), _layer(spec, 5)
    with torch.no_grad():
        got = fused(x)
        aten_only()
        expected = aten(x)
    assert expected.isnan().any() and torch.equal(got.isnan(), expected.isnan())  # (channelwise: where 0 < a < 1)


def test_layer_fused_ema_momentum_one_keeps_exactly_the_last_batch(aten_only):
    """ms + a (loc - ms) cancels at a = 1 when the old state dwarfs the batch: the kernel committed 0 for the
    batch's statistics (outputs off by up to 1e3); torch.lerp's two-sided form returns them exactly."""
    g = torch.Generator().manual_seed(0)
    big, small = torch.randn(4, 5, 6, 6, generator=g) * 1e18, torch.randn(4, 5, 6, 6, generator=g)
    spec = NormSpec(mixing="ema", momentum=1.0)
    fused, aten = _layer(spec, 5), _layer(spec, 5)
    with torch.no_grad():
        fused(big)
        got = fused(small)
        aten_only()
        aten(big)
        expected = aten(small)
    stats = batch_mean_var(small)
    torch.testing.assert_close(fused.ema_mean, stats.mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.ema_var, stats.var, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["ema", "ema-iabn"])
def test_ema_channel_with_a_non_finite_batch_statistic_normalises_with_the_kept_state_on_every_path(name):
    """With a gradient (the general path) the channel holding an inf was normalised with the NaN statistics, so
    all its values came out NaN; the kernel and the in-place path normalise it with the kept state."""
    spec = SPECS["ema"] if name == "ema" else SPECS["ema"].replace(instance="iabn")
    x = _data((4, 5, 6, 6), "normal")
    x[0, 2, 1, 1] = float("inf")
    fused, general = _layer(spec, 5), _layer(spec, 5)
    with torch.no_grad():
        expected = fused(x)
    got = general(x.clone().requires_grad_(True)).detach()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert got[:, 2].isnan().sum() == expected[:, 2].isnan().sum() <= x[:, 2].numel() // 4  # (iabn: one instance)


def test_layer_uses_aten_path_when_a_gradient_is_needed():
    layer = _layer(SPECS["alpha"], 5)
    x = _data((4, 5, 6, 6), "normal").requires_grad_()
    out = layer(x)
    assert out.grad_fn is not None
    out.sum().backward()
    assert x.grad is not None and layer.weight.grad is not None


def _medbn_probe() -> float:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    x = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return float(tta_norm.adapt(model, "medbn")(x).abs().sum())


def test_kernels_can_be_disabled_by_environment():
    code = (
        "from tests.kernels.test_kernels import _medbn_probe\n"
        "from tta_norm import kernels\n"
        "print(kernels.available(), kernels.status())\n"
        "print(repr(_medbn_probe()))\n"
    )
    env = dict(os.environ, TTA_NORM_KERNELS="0")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = (
        subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=root)
        .stdout.strip()
        .splitlines()
    )
    assert out[0].startswith("False disabled")
    assert float(out[1]) == pytest.approx(_medbn_probe(), rel=1e-5)  # this process: the compiled kernel


def test_layer_fused_ema_commit_bumps_version_counters():
    """The kernel writes the EMA state through raw pointers; autograd's in-place check must still see it."""
    layer = _layer(SPECS["ema"], 5)
    v_mean, v_var = layer.ema_mean._version, layer.ema_var._version
    with torch.no_grad():
        layer(_data((4, 5, 6, 6), "normal"))
    assert layer.ema_mean._version > v_mean and layer.ema_var._version > v_var
