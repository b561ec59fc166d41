"""Per-channel statistics estimators: pure functions over an activation tensor.

Every function takes an activation ``x`` of shape ``(N, C, *spatial)`` (``(N, C)`` for ``BatchNorm1d`` inputs)
and reduces, per channel ``c``, over the batch and spatial dimensions (``batch_*``) or over the spatial
dimensions only (``instance_*``). They never modify ``x``, keep autograd intact (the median's gradient is the
subgradient to the selected element) and work on any device.

Conventions (the literature disagrees; this module picks one and names the other):

* **Variance** is *biased* (divide by the count ``n``), as ``F.batch_norm`` normalises in training mode, RoTTA's
  RBN and MedBN do.  ``unbiased=True`` divides by ``n - 1`` (the value a momentum-1 BatchNorm buffer, NOTE's
  instance statistics and Schneider et al.'s inner BatchNorm hold).
* **Median** is the *lower* median for an even count (what ``torch.median`` returns and MedBN's official code
  uses).  ``median="average"`` averages the two middle values (what ``torch.quantile(q=0.5)`` returns).

Speed (CPU): moments come from per-instance sums and sums of squares over the contiguous spatial axis, which
is an order of magnitude faster than ``torch.var_mean`` over non-contiguous dims; when an instance's mean is
large against its spread (``mean^2 > 1e4 var``, where that formula loses digits in float32) the exact
two-pass ``torch.var_mean`` is used instead.  Inputs that need no gradient use one fused ATen kernel instead
of several small ops: the group-norm moments kernel per instance on CPU (up to ``FUSED_MOMENTS_MAX`` elements,
under the same conditioning rule), ``batch_norm_update_stats`` on GPUs.
Medians use NumPy's introselect (``np.partition``, O(n)), which
is ~15x faster than ``torch.kthvalue`` on CPU; other devices use ``torch.kthvalue``.
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

MedianRule = Literal["lower", "average"]

#: Scale that makes the median absolute deviation a consistent estimator of the standard deviation of a
#: normal distribution: 1 / Phi^-1(3/4).
MAD_NORMAL_CONSISTENCY = 1.4826


class Stats(NamedTuple):
    """Location and squared scale per channel: shapes ``(C,)`` (batch stats) or ``(N, C)`` (per instance)."""

    mean: Tensor
    var: Tensor


def _check_activation(x: Tensor) -> None:
    if x.dim() < 2:
        raise ValueError(f"expected an activation of shape (N, C, *spatial), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"statistics need a floating-point tensor, got dtype {x.dtype}")


def reduce_dims(x: Tensor) -> tuple[int, ...]:
    """The dimensions a BatchNorm reduces over: all but the channel dimension 1."""
    return (0, *range(2, x.dim()))


def count_per_channel(x: Tensor) -> int:
    """Number of values each channel's batch statistics are computed from: ``N * prod(spatial)``."""
    return x.numel() // x.shape[1] if x.shape[1] else 0


def channel_rows(x: Tensor) -> Tensor:
    """``x`` as a contiguous ``(C, N * prod(spatial))`` matrix (one copy; selection needs it anyway)."""
    return x.transpose(0, 1).reshape(x.shape[1], -1).contiguous()


#: mean^2 / var above which E[x^2] - E[x]^2 loses too many float32 digits (relative error ~ 1e-7 x this ratio)
_ILL_CONDITIONED = 1e2

#: Up to this many elements a CPU input that needs no gradient gets its instance moments from one fused ATen
#: reduction (the group-norm moments kernel); above it, per-instance sums are faster.
FUSED_MOMENTS_MAX = 393_216


def _needs_grad(x: Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def _fused_moments_ok(x: Tensor) -> bool:
    """Whether :func:`_instance_moments` may use the fused, exact but non-differentiable ATen kernel."""
    if _needs_grad(x):
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.float64) and x.numel() <= FUSED_MOMENTS_MAX
    return True


def _instance_moments(x: Tensor) -> Stats:
    """Biased per-(sample, channel) mean and variance over the spatial dims of a ``(N, C, *spatial)`` input."""
    n, c = x.shape[0], x.shape[1]
    xv = x.reshape(n, c, -1)
    shifts: tuple[Tensor | None, ...] = (None, xv[:, :, :1])
    if _fused_moments_ok(x):
        # group norm with one channel per group reduces over each instance's spatial values; with eps = 0 its
        # inverse standard deviation gives the variance back (inf -> 0 for constant instances).  Its mean and
        # inverse std come out as (N, groups) = (N, C).  On the CPU it too loses digits where an offset dominates
        # (a relative error of 4e-4 at mean 100, std 0.01): those inputs take the shifted sums below.
        xc = x if x.is_contiguous() else x.contiguous()
        _, mean, rstd = torch.native_group_norm(xc, None, None, n, c, x.numel() // max(n * c, 1), c, 0.0)
        var = rstd.pow(-2)
        if x.device.type != "cpu" or xv.shape[2] == 1 or not bool((mean.square() > _ILL_CONDITIONED * var).any()):
            return Stats(mean, var)
        shifts = shifts[1:]
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        # E[x^2] - E[x]^2 from two fast reductions; where an offset dominates (mean^2 >> var), the same of the
        # values shifted by each instance's first value (Welford's shifted data: the offset cancels exactly),
        # and torch.var_mean (7-15x slower on the CPU) only if the shifted data are still dominated by it
        for shift in shifts:
            xs = xv if shift is None else xv - shift
            mean, var = _raw_moments(xs)
            if not bool((mean.detach().square() > _ILL_CONDITIONED * var.detach()).any()):
                return Stats(mean if shift is None else mean + shift[:, :, 0], var)
    var, mean = torch.var_mean(xv, dim=2, correction=0)
    return Stats(mean, var)


def _raw_moments(xv: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and biased variance over dim 2 as ``E[x]`` and ``E[x^2] - E[x]^2`` (clamped at 0)."""
    length = xv.shape[2]
    mean = xv.sum(2) / length
    return mean, (torch.linalg.vector_norm(xv, 2, dim=2).square() / length - mean.square()).clamp_min(0)


def batch_from_instance(instance: Stats) -> Stats:
    """Per-channel batch mean and biased variance from biased per-instance moments ``(N, C)`` of equal-size
    instances, by the law of total variance: ``var = mean_i(var_i) + var_i(mean_i)``."""
    if instance.mean.shape[0] == 1:
        return Stats(instance.mean[0], instance.var[0])
    spread, mean = torch.var_mean(instance.mean, 0, correction=0)
    return Stats(mean, instance.var.mean(0) + spread)


def batch_mean_var(x: Tensor, *, unbiased: bool = False) -> Stats:
    """Per-channel mean and variance over the batch and spatial dimensions.

    Biased (``/n``) by default, the variance ``F.batch_norm(training=True)`` normalises with; ``unbiased=True``
    divides by ``n - 1`` and raises for a single value per channel.  Computed from per-instance moments by the
    law of total variance (see the module docstring for the speed/precision rule).
    """
    _check_activation(x)
    n = count_per_channel(x)
    if unbiased and n < 2:
        raise ValueError("the unbiased variance needs at least 2 values per channel; use unbiased=False")
    if x.dim() == 2:
        var, mean = torch.var_mean(x, dim=0, correction=1 if unbiased else 0)
        return Stats(mean, var)
    if x.device.type != "cpu" and not _needs_grad(x):  # one fused ATen kernel on accelerators
        mean, var = torch.ops.aten.batch_norm_update_stats(x, None, None, 1.0)
    else:
        mean, var = batch_from_instance(_instance_moments(x))
        if bool((mean.detach().square() > _ILL_CONDITIONED * var.detach()).any()):
            # an offset dominates: the instance means round at its scale, and their spread with them (a relative
            # error of 3e-3 at mean 1000, std 0.001); shifted by one value of each channel, they do not
            shift = x[:1].reshape(1, x.shape[1], -1)[:, :, :1].reshape(1, x.shape[1], *[1] * (x.dim() - 2))
            mean, var = batch_from_instance(_instance_moments(x - shift))
            mean = mean + shift.reshape(-1)
    if unbiased:
        var = var * (n / (n - 1))
    return Stats(mean, var)


class _SelectKth(torch.autograd.Function):
    """Per-channel k-th smallest values (1-based ``ks``) of a CPU activation by NumPy introselect.

    The channel rows are copied once and partitioned in place.  The gradient goes to one element equal to
    the selected value in each channel (a subgradient); for several requested ranks the selected values are
    averaged.  Which element of a tie receives it: for the lower median, the one ``torch.median(dim=1)``
    returns on the ``(C, N * prod(spatial))`` rows (MedBN's official ``MedNorm``, whose gradient flows through
    ``y.median(dim=1)``); otherwise the first in row order.  Ties are common in BatchNorm inputs computed from
    ReLU outputs (exact zeros), and the choice changes every gradient upstream of the layer.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, ks: tuple[int, ...]) -> Tensor:  # type: ignore[override]
        rows = channel_rows(x.detach())
        if rows.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
            rows = rows.clone()  # one channel: the "copy" was a view; never partition the input in place
        arr = rows.numpy()
        with_nan = np.isnan(arr).any(axis=1)  # (introselect orders NaN last: it would pick a finite value)
        kth = [k - 1 for k in ks]
        arr.partition(kth, axis=1)
        picked = torch.from_numpy(np.ascontiguousarray(arr[:, kth]))
        picked[torch.from_numpy(with_nan)] = float("nan")  # as torch.median and torch.kthvalue on other devices
        ctx.save_for_backward(x, picked)
        ctx.ks = ks
        return picked.mean(1) if len(ks) > 1 else picked[:, 0].clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        x, picked = ctx.saved_tensors
        rows = channel_rows(x)
        out = torch.zeros_like(rows)
        share = grad / picked.shape[1]
        lower_median = picked.shape[1] == 1 and ctx.ks[0] == (rows.shape[1] + 1) // 2
        for j in range(picked.shape[1]):
            idx = subgradient_positions(rows, picked[:, j], lower_median=lower_median)
            out.scatter_add_(1, idx, share.unsqueeze(1))
        c, n = x.shape[1], x.shape[0]
        return out.view(c, n, *x.shape[2:]).transpose(0, 1), None


def subgradient_positions(rows: Tensor, value: Tensor, *, lower_median: bool = True) -> Tensor:
    """``(C, 1)`` positions, in the ``(C, N * prod(spatial))`` channel rows, of the element equal to ``value[c]``
    that receives an order statistic's gradient: the one ``torch.median(dim=1)`` returns when ``value`` is the
    lower median of a row with ties (MedBN's official rule), else the first equal element in row order."""
    target = value.unsqueeze(1)
    hits = ((rows == target) | (rows.isnan() & target.isnan())).nonzero()  # (row, column) pairs, row-major
    counts = torch.bincount(hits[:, 0], minlength=rows.shape[0])
    if bool((counts == 0).any()):
        raise ValueError("subgradient_positions: a value is not an element of its row (NaN in the activation?)")
    idx = hits[counts.cumsum(0) - counts, 1].unsqueeze(1)  # the first hit of each row
    if lower_median:
        tied = counts > 1
        if bool(tied.any()):
            idx[tied] = rows[tied].median(dim=1, keepdim=True).indices
    return idx


def _kth_smallest(x: Tensor, ks: tuple[int, ...]) -> Tensor:
    """Mean over ``ks`` of each channel's k-th smallest value (O(n) selection, differentiable)."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        return _SelectKth.apply(x, ks)
    rows = channel_rows(x)
    if ks == ((rows.shape[1] + 1) // 2,):  # the lower median: torch.median's tie rule for the gradient
        return rows.median(dim=1).values
    values = [rows.kthvalue(k, dim=1).values for k in ks]
    return values[0] if len(values) == 1 else torch.stack(values).mean(0)


def batch_median(x: Tensor, *, median: MedianRule = "lower") -> Tensor:
    """Per-channel median over the batch and spatial dimensions, by O(n) selection (``kthvalue``).

    ``median="lower"`` (default) returns the lower of the two middle values for an even count, like
    ``torch.median``; ``median="average"`` returns their mean, like ``torch.quantile(q=0.5)``.
    """
    _check_activation(x)
    n = count_per_channel(x)
    if n == 0:
        raise ValueError("cannot take the median of an empty batch")
    if median not in ("lower", "average"):
        raise ValueError(f"median must be 'lower' or 'average', got {median!r}")
    k = (n + 1) // 2  # 1-based rank of the lower median
    return _kth_smallest(x, (k,) if median == "lower" or n % 2 == 1 else (k, k + 1))


def batch_median_msd(x: Tensor, *, median: MedianRule = "lower") -> Stats:
    """MedBN statistics (Park et al., CVPR 2024): the median and the mean squared deviation from it.

    ``msd = mean((x - m)^2)`` over all ``N * prod(spatial)`` values of a channel, biased (``/n``) as in the
    official code.  With autograd enabled (a gradient method adapts through it) it is computed as the official
    ``MedNorm`` does, ``((rows - m) ** 2).sum(1) / n`` over the contiguous ``(C, N * prod(spatial))`` rows, so
    values and gradients follow the reference's float arithmetic; otherwise as ``var + (mean - m)^2`` (the same
    quantity, exact algebra), which avoids a second pass over the activation.
    """
    if torch.is_grad_enabled():
        m = batch_median(x, median=median)
        rows = channel_rows(x)
        return Stats(m, ((rows - m.unsqueeze(1)) ** 2).sum(1) / rows.shape[1])
    return median_msd_from_moments(x, median=median)[0]


def median_msd_from_moments(x: Tensor, *, median: MedianRule = "lower") -> tuple[Stats, Tensor]:
    """MedBN's statistics from the batch moments, ``(Stats(m, var + (mean - m)^2), mean)``: the mean squared
    deviation from the median by exact algebra, without a second pass over ``x`` (what
    :func:`batch_median_msd` returns without autograd; the mean is returned for closed-form gradients)."""
    m = batch_median(x, median=median)
    mean, var = batch_mean_var(x)
    return Stats(m, var + (mean - m).square()), mean


def batch_median_mad(
    x: Tensor, *, median: MedianRule = "lower", normal_consistent: bool = False
) -> Stats:
    """Median and squared median absolute deviation ``MAD = median(|x - m|)``, per channel.

    ``normal_consistent=True`` multiplies the MAD by 1.4826 so that ``MAD^2`` estimates the variance of a
    normal distribution (DIA's robust BN); the default is the plain MAD (MedBN's ``MMNorm`` ablation).
    """
    m = batch_median(x, median=median)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mad = batch_median((x - m.view(shape)).abs(), median=median)
    if normal_consistent:
        mad = mad * MAD_NORMAL_CONSISTENCY
    return Stats(m, mad.square())


def instance_mean_var(x: Tensor, *, unbiased: bool = False) -> Stats:
    """Per-sample, per-channel mean and variance over the spatial dimensions only: shapes ``(N, C)``.

    For an input without spatial dimensions (``(N, C)``) each sample's "instance" is its single value: the
    mean is the value and the (biased) variance is 0.
    """
    _check_activation(x)
    if x.dim() == 2:
        if unbiased:
            raise ValueError("instance statistics of (N, C) inputs have one value each; use unbiased=False")
        return Stats(x, torch.zeros_like(x))
    count = math.prod(x.shape[2:])
    if unbiased and count < 2:
        raise ValueError("the unbiased instance variance needs at least 2 spatial positions")
    mean, var = _instance_moments(x)
    return Stats(mean, var * (count / (count - 1)) if unbiased else var)


def example_stats(x: Tensor) -> Stats:
    """The current example's own statistics for inference example weighing (Summers & Dinneen, ICLR 2020).

    Per sample and channel, the mean ``E[x_i]`` and biased variance ``E[x_i^2] - E[x_i]^2`` over the spatial
    dimensions, shapes ``(N, C)``: the contribution a training batch would have given the example to its own
    normalisation statistics.
    """
    return instance_mean_var(x, unbiased=False)


def iabn_shrink(
    instance: Stats, reference: Stats, spatial_count: int, *, k: float = 4.0, eps: float = 1e-5
) -> Stats:
    """Instance-aware BN statistics (NOTE, Gong et al., NeurIPS 2022): shrink instance stats toward a reference.

    With ``L = spatial_count`` values per instance and reference ``(mu_b, var_b)``::

        s_mu  = sqrt((var_b + eps) / L)
        s_var = (var_b + eps) * sqrt(2 / (L - 1))
        mu    = mu_b + softshrink(mu_i - mu_b, k * s_mu)
        var   = relu(var_b + softshrink(var_i - var_b, k * s_var))

    i.e. an instance statistic is used only where it deviates from the reference by more than ``k`` standard
    errors.  ``k = 4`` is what NOTE's scripts use.  For ``L <= 1`` the correction is skipped and the reference
    is returned (NOTE's threshold).  Instance variances are expected unbiased (NOTE's convention).  ``eps`` is
    the normalising layer's epsilon (NOTE's ``InstanceAwareBatchNorm2d`` adds its own ``eps`` here).
    Returns ``(N, C)`` statistics.
    """
    mu_i, var_i = instance
    mu_b, var_b = reference
    if spatial_count <= 1:
        return Stats(mu_b.expand_as(mu_i), var_b.expand_as(var_i))
    scale = var_b + eps
    t_mu = scale.sqrt() * (k / spatial_count**0.5)  # k * s_mu
    t_var = scale * (k * (2.0 / (spatial_count - 1)) ** 0.5)  # k * s_var
    # ref + softshrink(inst - ref, t) == inst - clamp(inst - ref, -t, t): one op fewer per statistic
    mu = mu_i - torch.clamp(mu_i - mu_b, -t_mu, t_mu)
    var = torch.relu(var_i - torch.clamp(var_i - var_b, -t_var, t_var))
    return Stats(mu, var)
