"""Small helpers shared by the normalization layers (not public API)."""

from __future__ import annotations

import torch
from torch import Tensor


def stats_dtype(x: Tensor) -> torch.dtype:
    """Dtype used to accumulate statistics: at least float32 (half/bfloat16 inputs are promoted)."""
    return torch.promote_types(x.dtype, torch.float32)


def channel_view(t: Tensor, ndim: int) -> Tensor:
    """Reshape a per-channel vector (C,) so it broadcasts against an (N, C, *spatial) tensor of ``ndim`` dims."""
    return t.reshape((1, -1) + (1,) * (ndim - 2))


def has_running_stats(module: torch.nn.Module) -> bool:
    """True if ``module`` holds running statistics of its own (a BatchNorm, or a frozen one such as torchvision's
    ``FrozenBatchNorm2d`` or timm's ``FrozenBatchNormAct2d``, which are no ``_BatchNorm``)."""
    return any(module._buffers.get(b) is not None for b in ("running_mean", "running_var"))


def check_channels(x: Tensor, num_features: int, layer: str) -> None:
    """Raise a clear error unless ``x`` is (N, C, *spatial) with C == ``num_features``."""
    if x.dim() < 2:
        raise ValueError(f"{layer}: expected an input of shape (N, C, *spatial), got a {x.dim()}-D tensor")
    if x.shape[1] != num_features:
        raise ValueError(
            f"{layer}: input has {x.shape[1]} channels (dim 1, shape {tuple(x.shape)}) but the layer was built "
            f"for num_features={num_features}; check the preceding layer's output channels"
        )


def update_running_stat(
    running: Tensor,
    batch_stats: Tensor,
    momentum: float | None,
    num_batches_tracked: Tensor | None,
) -> None:
    """Apply ``k = batch_stats.shape[0]`` sequential BatchNorm-style running-statistic updates in one vectorized
    step (in place; the functional one-step EMA of statistics is :func:`tta_norm.stats.ema_update`).

    ``running`` (shape S) is updated in place as if ``r <- (1 - a) r + a s_j`` were run for j = 0..k-1 with
    ``s_j = batch_stats[j]``. With ``momentum=None`` PyTorch's cumulative moving average is used instead:
    ``a = 1 / n`` where ``n`` counts updates including the current one (so the result is the plain average of
    all statistics seen so far). ``num_batches_tracked`` (if given) is read for the cumulative average but not
    incremented here.
    """
    k = batch_stats.shape[0]
    acc = batch_stats.dtype
    if momentum is None:
        n0 = 0 if num_batches_tracked is None else int(num_batches_tracked.item())
        new = (running.to(acc) * n0 + batch_stats.sum(0)) / (n0 + k)
    else:
        a = float(momentum)
        exps = torch.arange(k - 1, -1, -1, device=batch_stats.device, dtype=acc)
        weights = a * (1.0 - a) ** exps
        weights = weights.reshape((k,) + (1,) * (batch_stats.dim() - 1))
        new = running.to(acc) * (1.0 - a) ** k + (weights * batch_stats).sum(0)
    running.copy_(new.to(running.dtype))
