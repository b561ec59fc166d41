"""Functional core of the adaptive norm layer: statistics from a :class:`NormSpec`, and normalisation."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from tta_norm.norm.spec import NormSpec
from tta_norm.stats.estimators import (
    Stats,
    batch_mean_var,
    batch_median_mad,
    batch_median_msd,
    channel_rows,
    count_per_channel,
    example_stats,
    iabn_shrink,
    instance_mean_var,
    median_msd_from_moments,
    subgradient_positions,
)
from tta_norm.stats.mixing import Weight, ema_update, mix

SINGLE_VALUE_HINT = (
    "Batch statistics from one value per channel are undefined (batch size 1 with 1x1 spatial maps, or "
    "BatchNorm1d with batch size 1). Use a preset with a source prior ('ema', 'alpha', 'prior'), or "
    "pass window=W to tta_norm.adapt to normalise each sample together with the last W-1 samples."
)


def estimate(x: Tensor, spec: NormSpec) -> Stats:
    """Test-batch statistics of ``x`` by the spec's estimator, shapes ``(C,)``."""
    if spec.estimator == "mean_var":
        return batch_mean_var(x, unbiased=spec.unbiased)
    if spec.estimator == "median_msd":
        return batch_median_msd(x, median=spec.median)
    if spec.estimator == "median_mad":
        return batch_median_mad(x, median=spec.median)
    return batch_median_mad(x, median=spec.median, normal_consistent=True)


def test_weight(spec: NormSpec, batch_size: int, mix_weight: Tensor | None) -> Weight:
    """The weight on the test statistics: the channel-wise parameter (clamped to [0, 1]) or the spec's scalar.

    The clamp passes the gradient straight through (its value is the clamp, its gradient the identity): the TTN
    fit is projected gradient descent, and a channel at 0 or 1 must still see which way the loss moves it
    (``clamp``'s own gradient is 0 there, so a channel the projection put on the boundary would stay forever)."""
    if spec.channelwise:
        if mix_weight is None:
            raise ValueError("a channelwise spec needs the layer's channel-wise mixing weight")
        clamped = mix_weight.clamp(0.0, 1.0)
        if mix_weight.requires_grad and torch.is_grad_enabled():
            return mix_weight + (clamped - mix_weight).detach()
        return clamped
    return spec.fixed_alpha(batch_size)


def layer_statistics(
    x: Tensor,
    spec: NormSpec,
    source: Stats,
    *,
    ema_state: Stats | None = None,
    mix_weight: Tensor | None = None,
    use_batch: bool = True,
    samples: int | None = None,
    eps: float = 1e-5,
) -> tuple[Stats, Stats | None]:
    """The statistics an adaptive norm layer normalises ``x`` with, and its new EMA state.

    Returns ``(stats, new_ema_state)``.  ``stats`` has shapes ``(C,)``, or ``(N, C)`` with an ``instance``
    refinement.  ``new_ema_state`` is ``None`` unless ``spec.mixing == "ema"`` and the batch was used.
    With ``use_batch=False`` the batch is not looked at: the result is the current state (the EMA state for
    ``"ema"``, else the source statistics).  ``samples``: the number of test samples ``n`` of pseudo-count
    mixing (default: the rows of ``x``).  ``eps``: the layer's epsilon, which IABN's shrink thresholds add to the
    reference variance (NOTE's layer uses its own ``eps`` there and in the normalisation).  See :class:`NormSpec`
    for the three steps.
    """
    reference_state = ema_state if spec.mixing == "ema" else source
    if reference_state is None:
        raise ValueError("spec.mixing='ema' needs ema_state")
    if not use_batch:
        return reference_state, None

    new_state = None
    if spec.mixing == "source":
        stats = source
    else:
        if count_per_channel(x) < 2 and spec.batch_only:
            raise ValueError(SINGLE_VALUE_HINT)
        batch = estimate(x, spec)
        if spec.mixing == "test":
            stats = batch
        elif spec.mixing == "ema":
            new_state = ema_update(reference_state, batch, spec.momentum)
            # a channel whose batch statistics are not finite keeps the state, in the normalisation as in the
            # commit (as the kernel and the in-place path do)
            ok = torch.isfinite(new_state.mean + new_state.var)
            stats = Stats(torch.where(ok, new_state.mean, reference_state.mean),
                          torch.where(ok, new_state.var, reference_state.var))  # fmt: skip
        else:
            n = x.shape[0] if samples is None else samples
            stats = mix(batch, source, test_weight(spec, n, mix_weight), spec.mixing)

    if spec.instance == "iabn":
        spatial = math.prod(x.shape[2:])
        instance = instance_mean_var(x, unbiased=spatial > 1)
        stats = iabn_shrink(instance, stats, spatial, k=spec.iabn_k, eps=eps)
    elif spec.instance == "example":
        stats = mix(example_stats(x), stats, spec.example_weight, "mixture")
    return stats, new_state


def _channel_view(t: Tensor, x: Tensor) -> Tensor:
    """Reshape ``(C,)`` or ``(N, C)`` to broadcast against ``x`` of shape ``(N, C, *spatial)``."""
    lead = t.shape[0] if t.dim() == 2 else 1
    return t.reshape(lead, x.shape[1], *([1] * (x.dim() - 2)))


def batch_norm_eval(
    x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """``F.batch_norm(x, mean, var, weight, bias, training=False, eps=eps)`` without its Python wrapper (a few
    microseconds per call, which add up over the layers of a small-batch forward)."""
    return torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, torch.backends.cudnn.enabled)


def normalize(
    x: Tensor, stats: Stats, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """``weight * (x - mean) / sqrt(var + eps) + bias`` with per-channel or per-sample statistics/affine.

    ``stats`` and the affine may have shapes ``(C,)`` or ``(N, C)``.  One fused pass over ``x``: a
    ``F.batch_norm`` call in eval mode when the affine is per-channel and no gradient to the statistics is
    needed (``(N, C)`` statistics treat each sample's channel as a channel of one ``(1, N*C, ...)`` batch),
    else ``x * scale + shift`` (differentiable in the statistics, for TENT-style methods and attacks).
    """
    mean, var = stats
    affine_per_channel = (weight is None or weight.dim() == 1) and (bias is None or bias.dim() == 1)
    needs_stat_grad = torch.is_grad_enabled() and (mean.requires_grad or var.requires_grad)
    adapting = torch.is_grad_enabled() and weight is not None and weight.requires_grad
    if (needs_stat_grad or adapting) and mean.dim() == 1:
        # a gradient method adapts through the statistics: the textbook arithmetic of the reference layers
        # (MedBN's MedNorm: ``weight * ((x - m) / sqrt(s2 + eps)) + bias``), so long runs track the reference
        y = (x - _channel_view(mean, x)) / torch.sqrt(_channel_view(var, x) + eps)
        if weight is not None:
            y = _channel_view(weight, x) * y
        return y + _channel_view(bias, x) if bias is not None else y
    if affine_per_channel and not needs_stat_grad:
        if mean.dim() == 1:
            return batch_norm_eval(x, mean, var, weight, bias, eps)
        if x.dim() > 2 and x.is_contiguous():
            # per-sample statistics: each (sample, channel) plane is a "channel" of a (1, N*C, L) batch norm
            n, c = mean.shape
            w = weight.repeat(n) if weight is not None and n > 1 else weight
            b = bias.repeat(n) if bias is not None and n > 1 else bias
            out = batch_norm_eval(x.view(1, n * c, -1), mean.reshape(-1), var.reshape(-1), w, b, eps)
            return out.view(x.shape)
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    return torch.addcmul(_channel_view(shift, x), x, _channel_view(scale, x))


class _MedianBatchNorm(torch.autograd.Function):
    """MedBN's layer with a closed-form backward (see :func:`median_batch_norm`)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:  # type: ignore[override]
        (median, msd), mean = median_msd_from_moments(x)  # batch_median_msd's value without autograd
        msd = msd.masked_fill(msd.isinf(), float("nan"))  # as the general path: an overflow is refused, not zeroed
        ctx.save_for_backward(x, weight, median, torch.rsqrt(msd + eps), mean)
        ctx.eps = eps
        return batch_norm_eval(x, median, msd, weight, bias, eps)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight, median, invstd, mean = ctx.saved_tensors
        w = weight if weight is not None else torch.ones_like(median)
        # BatchNorm's training backward around the median: dx_bn = w r (g - sum(g)/n - xhat sum(g xhat)/n),
        # dw = sum(g xhat), db = sum(g), with xhat = (x - m) r
        dx, dw, db = torch.ops.aten.native_batch_norm_backward(
            grad_out, x, w, None, None, median, invstd, True, ctx.eps, [True, True, True]
        )
        n = count_per_channel(x)
        wr = w * invstd
        # the location is the median, not the mean: its gradient goes to the median element instead of being
        # spread as -sum(g)/n over the channel.  dL/dm = -w r (sum(g) - sum(g xhat) sum(xhat) / n) with
        # sum(xhat) = n r (mean - m)
        dx = (dx + _channel_view(wr * db / n, x)).contiguous()
        d_median = -wr * (db - dw * invstd * (mean - median))
        rows = channel_rows(x)
        pos = subgradient_positions(rows, median).squeeze(1)  # position j = sample * S + s in channel c's row
        spatial = rows.shape[1] // x.shape[0]
        channel = torch.arange(x.shape[1], device=x.device)
        flat = (pos // spatial) * (x.shape[1] * spatial) + channel * spatial + pos % spatial
        dx.view(-1).index_add_(0, flat, d_median.to(dx.dtype))
        return dx, (dw if ctx.needs_input_grad[1] else None), (db if ctx.needs_input_grad[2] else None), None


def median_batch_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """MedBN (Park et al., CVPR 2024): ``weight * (x - m) / sqrt(s2 + eps) + bias`` with the per-channel lower
    median ``m`` and mean squared deviation from it ``s2``, both over the batch and spatial dimensions.

    The forward is the ATen statistics-only path's arithmetic, op for op (``s2 = var + (mean - m)^2``, ATen's
    normalisation; the compiled CPU kernel agrees to float rounding).  The backward is closed form:
    BatchNorm's training backward about ``m`` (one fused kernel) plus the median's subgradient, which goes to
    the element :func:`~tta_norm.stats.estimators.subgradient_positions` picks (the official code's rule).
    Equal to autograd through the textbook formula up to float rounding (a DIA attacker step on ResNet-20 at
    batch 200 on CPU: 0.73 s -> 0.46 s, ``docs/speed.md``); first-order only (a second derivative raises).
    """
    return _MedianBatchNorm.apply(x, weight, bias, eps)
