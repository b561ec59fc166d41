"""Proxy Normalization: quadrature, moments vs closed form and numerical integration, forward vs hand reference."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from scipy import integrate, special
from torch import nn

from tta_norm.layers import GroupNormProxyAct, ProxyNorm, normal_quantiles, relu_gaussian_moments

ATOL = 1e-5


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _closed_form(mu: float, s: float) -> tuple[float, float]:
    """E[ReLU(X)] and E[ReLU(X)^2] for X ~ N(mu, s^2) (hand formula, scipy for Phi)."""
    a = mu / s
    cdf = 0.5 * (1 + math.erf(a / math.sqrt(2)))
    pdf = math.exp(-0.5 * a * a) / math.sqrt(2 * math.pi)
    return mu * cdf + s * pdf, (mu * mu + s * s) * cdf + mu * s * pdf


def _set_params(pn: ProxyNorm, mu: list[float], sigma: list[float]) -> None:
    """Parameters for which the pre-activation proxy gamma * Y + beta is N(mu_c, sigma_c^2)."""
    with torch.no_grad():
        pn.weight.fill_(1.0)
        pn.proxy_bias.zero_()
        pn.proxy_weight.copy_(torch.tensor(sigma, dtype=torch.float64) - 1.0)
        pn.bias.copy_(torch.tensor(mu, dtype=torch.float64))


def test_quantiles_formula_and_known_variance_deficit() -> None:
    q = normal_quantiles(200)
    i = np.arange(200)
    expected = np.sqrt(2) * special.erfinv(2 * (i + 0.5) / 200 - 1)
    np.testing.assert_allclose(q.numpy(), expected, atol=1e-12)
    assert abs(float(q.mean())) < 1e-12
    # the midpoint quantiles cut the tails: their variance is 0.9936, not 1 (documented bias of the quadrature)
    assert float(q.var(unbiased=False)) == pytest.approx(0.99360, abs=1e-5)
    with torch.no_grad():
        mean, var = ProxyNorm(1).double().proxy_moments()
        ref_mean, ref_var = ProxyNorm(1, moments="analytic").double().proxy_moments()
    assert float(1 - mean / ref_mean) == pytest.approx(0.0012, abs=1e-4)  # the docstring's 0.12 %
    assert float(1 - var / ref_var) == pytest.approx(0.0082, abs=1e-4)  # and 0.82 %


MUS = [-2.0, -0.5, 0.0, 0.3, 1.0, 3.0]
SIGMAS = [0.2, 0.5, 1.0, 1.5]


def test_closed_form_agrees_with_numerical_integration() -> None:
    mu = torch.tensor(MUS, dtype=torch.float64).repeat_interleave(len(SIGMAS))
    s = torch.tensor(SIGMAS, dtype=torch.float64).repeat(len(MUS))
    mean, var = relu_gaussian_moments(mu, s)
    for k in range(mu.numel()):
        m_, s_ = float(mu[k]), float(s[k])

        def density(x: float, m_: float = m_, s_: float = s_) -> float:
            return math.exp(-0.5 * ((x - m_) / s_) ** 2) / (s_ * math.sqrt(2 * math.pi))

        lo = min(0.0, m_ - 12 * s_)
        e1 = integrate.quad(lambda x: max(x, 0.0) * density(x), lo, m_ + 12 * s_, points=[0.0], limit=200)[0]
        e2 = integrate.quad(lambda x: max(x, 0.0) ** 2 * density(x), lo, m_ + 12 * s_, points=[0.0], limit=200)[0]
        assert float(mean[k]) == pytest.approx(e1, abs=1e-9)
        assert float(var[k]) == pytest.approx(e2 - e1 * e1, abs=1e-9)
        assert float(mean[k]) == pytest.approx(_closed_form(m_, s_)[0], abs=1e-12)


def test_quadrature_moments_vs_closed_form() -> None:
    """200 points (the paper's): means to 1e-3; variances biased low by at most 0.7 % of s^2 (tail cut).

    With 2000 points both moments are within 1e-3 (times s^2 for second moments, s > 1) of the closed form.
    """
    mus = [m for m in MUS for _ in SIGMAS]
    sigmas = SIGMAS * len(MUS)
    for n, var_rel_tol in ((200, 7e-3), (2000, 1e-3)):
        pn = ProxyNorm(len(mus), num_quantiles=n, dtype=torch.float64)
        _set_params(pn, mus, sigmas)
        with torch.no_grad():
            mean, var = pn.proxy_moments()
        for c, (m_, s_) in enumerate(zip(mus, sigmas, strict=True)):
            e1, e2 = _closed_form(m_, s_)
            assert abs(float(mean[c]) - e1) <= 1e-3 * max(1.0, s_)
            assert abs(float(var[c]) - (e2 - e1 * e1)) <= var_rel_tol * s_ * s_
            assert float(var[c]) <= e2 - e1 * e1 + 1e-12  # biased low, never high
            if n == 2000:
                assert abs(float(var[c] + mean[c] ** 2) - e2) <= 1e-3 * max(1.0, s_ * s_)


def test_analytic_option_matches_closed_form() -> None:
    pn = ProxyNorm(3, moments="analytic", dtype=torch.float64)
    _set_params(pn, [0.5, -1.0, 2.0], [1.0, 0.5, 0.3])
    with torch.no_grad():
        mean, var = pn.proxy_moments()
    for c, (m_, s_) in enumerate([(0.5, 1.0), (-1.0, 0.5), (2.0, 0.3)]):
        e1, e2 = _closed_form(m_, s_)
        assert float(mean[c]) == pytest.approx(e1, abs=1e-12)
        assert float(var[c]) == pytest.approx(e2 - e1 * e1, abs=1e-12)
    with pytest.raises(ValueError, match="only available for ReLU"):
        ProxyNorm(3, "silu", moments="analytic")


def _reference_pn(x: np.ndarray, w, b, gt, bt, act, eps: float = 0.03, n: int = 200) -> np.ndarray:
    """Hand-written Proxy Norm, channel by channel, in numpy."""
    i = np.arange(n)
    q = np.sqrt(2.0) * special.erfinv(2.0 * (i + 0.5) / n - 1.0)
    out = np.empty_like(x)
    for c in range(x.shape[1]):
        proxy = (1.0 + gt[c]) * q + bt[c]
        activated = act(w[c] * proxy + b[c])
        m, v = activated.mean(), activated.var()
        out[:, c] = (act(w[c] * x[:, c] + b[c]) - m) / np.sqrt(v + eps)
    return out


@pytest.mark.parametrize(
    ("name", "np_act"),
    [("relu", lambda t: np.maximum(t, 0.0)), ("silu", lambda t: t / (1.0 + np.exp(-t)))],
)
def test_forward_matches_hand_reference(name, np_act) -> None:
    g = _gen(0)
    pn = ProxyNorm(3, name, dtype=torch.float64)
    with torch.no_grad():
        for p in (pn.weight, pn.bias, pn.proxy_weight, pn.proxy_bias):
            p.copy_(torch.randn(3, generator=g, dtype=torch.float64) * 0.5)
    x = torch.randn(4, 3, 2, 3, generator=g, dtype=torch.float64)
    expected = _reference_pn(
        x.numpy(),
        pn.weight.detach().numpy(),
        pn.bias.detach().numpy(),
        pn.proxy_weight.detach().numpy(),
        pn.proxy_bias.detach().numpy(),
        np_act,
    )
    np.testing.assert_allclose(pn(x).detach().numpy(), expected, atol=1e-10)


def test_identity_proxy_at_init() -> None:
    """At init the proxy is N(0, 1): output = (relu(x) - mean relu(q)) / sqrt(var relu(q) + 0.03)."""
    pn = ProxyNorm(2)
    q = normal_quantiles(200).float()
    r = torch.relu(q)
    x = torch.randn(5, 2, generator=_gen(1))
    expected = (torch.relu(x) - r.mean()) / torch.sqrt(r.var(unbiased=False) + 0.03)
    torch.testing.assert_close(pn(x), expected, atol=ATOL, rtol=0)
    assert float(r.mean()) == pytest.approx(1 / math.sqrt(2 * math.pi), abs=1e-3)


def test_gradients_flow_to_all_parameters() -> None:
    pn = ProxyNorm(3, dtype=torch.float64)
    with torch.no_grad():
        pn.proxy_weight.fill_(0.2)
        pn.proxy_bias.fill_(-0.1)
        pn.bias.fill_(0.3)
    x = torch.randn(2, 3, 4, generator=_gen(2), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: pn(t), (x,))
    pn(x).pow(2).mul(torch.linspace(0, 1, 24, dtype=torch.float64).view(2, 3, 4)).sum().backward()
    for name, p in pn.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_group_norm_proxy_act() -> None:
    x = torch.randn(3, 8, 2, 2, generator=_gen(3))
    mod = GroupNormProxyAct(8, 4)
    expected = mod.proxy(nn.functional.group_norm(x, 4, eps=1e-5))
    torch.testing.assert_close(mod(x), expected)
    # batch independent: sample 0 alone gives the same output as inside the batch
    torch.testing.assert_close(mod(x[:1]), mod(x)[:1], atol=ATOL, rtol=0)
    assert sum(p.numel() for p in mod.parameters()) == 4 * 8
    with pytest.raises(ValueError, match="divisor"):
        GroupNormProxyAct(8, 3)
    with pytest.raises(ValueError, match="num_features=8"):
        mod(torch.randn(2, 6, 2, 2))


def test_activation_choices_and_errors() -> None:
    relu_inplace = ProxyNorm(2, nn.ReLU(inplace=True))
    assert relu_inplace.activation.inplace is False
    x = torch.randn(3, 2, generator=_gen(4))
    torch.testing.assert_close(ProxyNorm(2, torch.relu)(x), ProxyNorm(2)(x))
    torch.testing.assert_close(ProxyNorm(2, nn.SiLU())(x), ProxyNorm(2, "swish")(x))
    with pytest.raises(ValueError, match="unknown activation"):
        ProxyNorm(2, "sigmoidish")
    with pytest.raises(TypeError, match="activation"):
        ProxyNorm(2, 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_features=2"):
        ProxyNorm(2)(torch.randn(3, 4))
    with pytest.raises(ValueError, match="shape"):
        ProxyNorm(2)(torch.randn(3))


def test_state_dict_round_trip_and_dtype_moves() -> None:
    pn = ProxyNorm(3, "gelu")
    with torch.no_grad():
        pn.proxy_weight.uniform_(-0.5, 0.5, generator=_gen(5))
        pn.bias.uniform_(-1, 1, generator=_gen(6))
    assert set(pn.state_dict()) == {"weight", "bias", "proxy_weight", "proxy_bias"}  # quantiles not persistent
    buf = io.BytesIO()
    torch.save(pn.state_dict(), buf)
    buf.seek(0)
    other = ProxyNorm(3, "gelu")
    other.load_state_dict(torch.load(buf))
    x = torch.randn(2, 3, 5, generator=_gen(7))
    torch.testing.assert_close(other(x), pn(x))
    double = pn.to(torch.float64)
    assert torch.equal(double.quantiles, normal_quantiles(200))  # float64 points, not float32 ones cast up
    with torch.inference_mode():  # the points first built under inference_mode still serve autograd later
        ProxyNorm(3, num_quantiles=37).double().proxy_moments()
    fresh = ProxyNorm(3, num_quantiles=37).double()
    fresh.proxy_moments()[1].sum().backward()
    assert fresh.weight.grad is not None
    assert double(x.double()).dtype == torch.float64
    half = ProxyNorm(3).to(torch.bfloat16)
    out = half(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ProxyNorm(3)(x), atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("eps", [0.0, -0.03, float("nan")])
def test_eps_must_be_positive(eps: float) -> None:
    with pytest.raises(ValueError, match=r"ProxyNorm: eps must be > 0"):
        ProxyNorm(2, eps=eps)
    with pytest.raises(ValueError, match=r"ProxyNorm: eps must be > 0"):
        GroupNormProxyAct(4, 2, proxy_eps=eps)
    with pytest.raises(ValueError, match=r"GroupNormProxyAct: norm_eps must be > 0"):
        GroupNormProxyAct(4, 2, norm_eps=eps)
    from tta_norm.layers import convert_to_gn_pn

    model = nn.Sequential(nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4))
    for method in ("fx", "sequential"):
        with pytest.raises(ValueError, match=r"norm_eps must be > 0"):
            convert_to_gn_pn(model, 2, method=method, norm_eps=eps)
    assert [type(m) for m in model] == [nn.BatchNorm2d, nn.ReLU, nn.BatchNorm2d]
