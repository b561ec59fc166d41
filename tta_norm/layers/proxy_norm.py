"""Proxy Normalization (Labatie, Masters, Eaton-Rosen & Luschi, NeurIPS 2021, arXiv 2106.03743).

PN follows a batch-independent normalization without affine (GN, or LN = GN with one group). Per channel c,
for the normalized pre-activation ``y``:

1. ``z = act(gamma_c * y + beta_c)`` (the per-channel affine lives here, not in the GN);
2. a proxy Gaussian ``Y_c = (1 + gamma~_c) * q + beta~_c`` with ``q`` the ``num_quantiles`` (default 200)
   midpoint quantiles of N(0, 1), ``q_i = sqrt(2) * erfinv(2 (i + 0.5) / n - 1)``; ``gamma~ = beta~ = 0`` at
   initialisation, so the proxy is N(0, 1);
3. proxy moments ``m_c = mean_i act(gamma_c Y_ci + beta_c)`` and ``v_c = var_i(...)`` (population variance
   over the quadrature points);
4. output ``(z - m_c) / sqrt(v_c + eps)`` with ``eps = 0.03`` by default. There is no affine after PN.

The moments are recomputed in every forward pass (they depend only on the parameters; a (C, n) tensor) and
gradients flow through them. ``moments="analytic"`` (ReLU only) replaces the quadrature with the closed form for
ReLU of a Gaussian; the 200-point quadrature is what the official code uses. Its points have variance 0.9936
rather than 1 (the tails beyond the outermost quantiles are cut), so quadrature moments are biased low: with
ReLU at initialisation the proxy variance by 0.82 % and its mean by 0.12 % of the closed form; use
``num_quantiles`` to trade accuracy for cost.

Weight decay: the official code decays the proxy offsets (gamma~, beta~); ``ProxyNorm`` declares them in
``regular_decay_params`` so ``tta_norm.training.param_groups`` gives them the ordinary weight decay while
gamma/beta are treated as normalization parameters.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from ._common import channel_view, check_channels, stats_dtype

Activation = str | nn.Module | Callable[[Tensor], Tensor]
Moments = Literal["quadrature", "analytic"]

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "gelu": nn.GELU,
    "identity": nn.Identity,
}


class _Elementwise(nn.Module):
    """Wrap an elementwise function as a module (for ``activation=<callable>``)."""

    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return getattr(self.fn, "__name__", repr(self.fn))


def make_activation(activation: Activation) -> nn.Module:
    """A non-in-place activation module from a name ("relu", "silu"/"swish", "gelu"), a module or a callable."""
    if isinstance(activation, str):
        try:
            return _ACTIVATIONS[activation.lower()]()
        except KeyError:
            raise ValueError(
                f"unknown activation {activation!r}; use one of {sorted(_ACTIVATIONS)} or pass an nn.Module / "
                "an elementwise callable"
            ) from None
    if isinstance(activation, nn.Module):
        act = copy.deepcopy(activation)
        if getattr(act, "inplace", False):
            act.inplace = False  # the proxy and the input branch must not overwrite their inputs
        return act
    if callable(activation):
        return _Elementwise(activation)
    raise TypeError(f"activation must be a name, an nn.Module or a callable, got {type(activation).__name__}")


@functools.lru_cache(maxsize=32)
def _cached_quantiles(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    with torch.inference_mode(False):  # a normal tensor even if first asked for under inference_mode
        return normal_quantiles(n, dtype=dtype, device=device)


def normal_quantiles(n: int = 200, *, dtype: torch.dtype = torch.float64, device: torch.device | None = None) -> Tensor:
    """The ``n`` midpoint quantiles of N(0, 1): ``sqrt(2) * erfinv(2 (i + 0.5) / n - 1)``, i = 0..n-1."""
    if n < 2:
        raise ValueError(f"need at least 2 quantiles, got {n}")
    i = torch.arange(n, dtype=torch.float64, device=device)
    return (math.sqrt(2.0) * torch.erfinv(2.0 * (i + 0.5) / n - 1.0)).to(dtype)


def relu_gaussian_moments(mu: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and variance of ReLU(X), X ~ N(mu, sigma^2), in closed form (elementwise, differentiable).

    E = mu Phi(a) + s phi(a), E[X^2] = (mu^2 + s^2) Phi(a) + mu s phi(a), a = mu / s, s = |sigma|.
    """
    s = sigma.abs().clamp_min(torch.finfo(sigma.dtype).tiny ** 0.5)
    a = mu / s
    cdf = 0.5 * (1.0 + torch.erf(a / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * a * a) / math.sqrt(2.0 * math.pi)
    mean = mu * cdf + s * pdf
    second = (mu * mu + s * s) * cdf + mu * s * pdf
    return mean, (second - mean * mean).clamp_min(0.0)


class ProxyNorm(nn.Module):
    """Proxy Normalization: per-channel affine + activation + normalization by proxy moments.

    Input: an already normalized pre-activation (N, C, *spatial), e.g. the output of
    ``nn.GroupNorm(G, C, affine=False)``; output: the normalized post-activation (no affine follows).

    Args:
        num_features: C.
        activation: elementwise activation: "relu" (default), "silu"/"swish", "gelu", an ``nn.Module`` (deep
            copied, in-place turned off) or a callable.
        eps: epsilon added to the proxy variance, > 0 (0.03 as in the paper's code).
        num_quantiles: quadrature points of the proxy N(0, 1) (200 as in the paper's code).
        moments: "quadrature" (default, the paper's) or "analytic" (closed form; ReLU only).

    Parameters: ``weight``/``bias`` (gamma, beta; init 1/0) and ``proxy_weight``/``proxy_bias`` (gamma~, beta~;
    init 0; the proxy scale is ``1 + proxy_weight``). Cite: Labatie et al., NeurIPS 2021.
    """

    is_norm_layer = True  # marker read by tta_norm.training.param_groups
    regular_decay_params = ("proxy_weight", "proxy_bias")  # decayed like ordinary weights (official code)

    def __init__(
        self,
        num_features: int,
        activation: Activation = "relu",
        eps: float = 0.03,
        num_quantiles: int = 200,
        *,
        moments: Moments = "quadrature",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if num_features <= 0:
            raise ValueError(f"num_features must be positive, got {num_features}")
        if not eps > 0:  # also NaN: eps = 0 divides by a zero proxy variance (a zero gamma)
            raise ValueError(f"ProxyNorm: eps must be > 0, got {eps}")
        self.activation = make_activation(activation)
        if moments not in ("quadrature", "analytic"):
            raise ValueError(f"moments must be 'quadrature' or 'analytic', got {moments!r}")
        if moments == "analytic" and type(self.activation) is not nn.ReLU:
            raise ValueError("moments='analytic' is only available for ReLU; use moments='quadrature'")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.num_quantiles = num_quantiles
        self.moments = moments
        self.weight = nn.Parameter(torch.ones(num_features, **factory))
        self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        self.proxy_weight = nn.Parameter(torch.zeros(num_features, **factory))
        self.proxy_bias = nn.Parameter(torch.zeros(num_features, **factory))

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, num_quantiles={self.num_quantiles}, moments={self.moments!r}"
        )

    @property
    def quantiles(self) -> Tensor:
        """The quadrature points at the parameters' accumulation precision and on their device, computed there
        (never a float32 copy cast up after ``.double()``) and once per precision and device."""
        return _cached_quantiles(self.num_quantiles, stats_dtype(self.weight), self.weight.device)

    def proxy_moments(self) -> tuple[Tensor, Tensor]:
        """Per-channel mean and variance (each (C,)) of ``act(gamma * Y + beta)`` for the proxy Y."""
        acc = stats_dtype(self.weight)
        w, b = self.weight.to(acc), self.bias.to(acc)
        mu = w * self.proxy_bias.to(acc) + b  # the pre-activation proxy is N(mu, sigma^2)
        sigma = w * (1.0 + self.proxy_weight.to(acc))
        if self.moments == "analytic":
            return relu_gaussian_moments(mu, sigma)
        q = self.quantiles
        pre = mu[:, None] + sigma[:, None] * q[None, :]  # (C, n)
        var, mean = torch.var_mean(self.activation(pre), dim=1, correction=0)
        return mean, var

    def forward(self, input: Tensor) -> Tensor:
        check_channels(input, self.num_features, type(self).__name__)
        nd = input.dim()
        z = self.activation(input * channel_view(self.weight, nd) + channel_view(self.bias, nd))
        mean, var = self.proxy_moments()
        out = (z - channel_view(mean, nd)) * channel_view(torch.rsqrt(var + self.eps), nd)
        return out.to(input.dtype)


class GroupNormProxyAct(nn.Module):
    """GN (no affine) -> ProxyNorm (affine + activation + proxy normalization): a batch-independent BN+act.

    ``num_groups=1`` gives LN+PN. This is the module the BN+act -> GN+PN converter inserts; its ``norm``
    submodule is an ``nn.GroupNorm(num_groups, num_channels, norm_eps, affine=False)`` and ``proxy`` a
    ``ProxyNorm(num_channels, activation, proxy_eps, num_quantiles)``: 4*C parameters in total.
    The official code uses norm_eps = 1e-3; the default here, 1e-5, matches PyTorch's BN/GN. Both eps must be > 0.
    """

    def __init__(
        self,
        num_channels: int,
        num_groups: int,
        activation: Activation = "relu",
        *,
        norm_eps: float = 1e-5,
        proxy_eps: float = 0.03,
        num_quantiles: int = 200,
        moments: Moments = "quadrature",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not norm_eps > 0:  # nn.GroupNorm accepts 0, which divides a constant group by zero
            raise ValueError(f"GroupNormProxyAct: norm_eps must be > 0, got {norm_eps}")
        if num_groups <= 0 or num_channels % num_groups != 0:
            raise ValueError(
                f"num_groups={num_groups} must be a positive divisor of num_channels={num_channels}"
            )
        self.norm = nn.GroupNorm(num_groups, num_channels, eps=norm_eps, affine=False, device=device, dtype=dtype)
        self.proxy = ProxyNorm(
            num_channels, activation, proxy_eps, num_quantiles, moments=moments, device=device, dtype=dtype
        )

    def forward(self, input: Tensor) -> Tensor:
        check_channels(input, self.proxy.num_features, type(self).__name__)
        return self.proxy(self.norm(input))
