"""Ghost batch normalization (Hoffer et al., NeurIPS 2017; Summers & Dinneen, ICLR 2020, arXiv 1906.03548).

In training, the batch (dim 0) is split into consecutive disjoint "ghost batches" of ``ghost_batch_size``
samples; each ghost batch is normalized with its own per-channel mean and (biased) variance, exactly as
BatchNorm would normalize it on its own. The affine parameters (gamma, beta) and the running statistics are
shared by all ghost batches. In eval mode the running statistics are used, exactly as in BatchNorm.

Conventions (see ``GhostBatchNorm2d`` for the details):

* **Momentum.** The running statistics are updated as if BatchNorm were applied to the ghost batches one after
  another, with per-chunk momentum ``momentum / k`` for ``k`` ghost batches (``scale_momentum=True``, default,
  as in MosaicML composer) or ``momentum`` (``scale_momentum=False``, as in pytorch-tabnet's GBN). The default
  keeps the per-step decay ``(1 - m/k)^k ~ 1 - m`` of the running statistics equal to that of the BatchNorm
  being replaced, so the horizon of the running averages (about ``1/m`` optimizer steps) does not change when a
  model is converted; without the rescale one step decays the running stats by ``(1 - m)^k`` (e.g. 0.59 instead
  of 0.9 for m = 0.1, k = 5) and the eval statistics follow only the last few ghost batches.
  ``num_batches_tracked`` counts ghost batches. ``momentum=None`` gives the cumulative average over all ghost
  batches seen.
* **Remainder.** When the batch size ``B`` is not a multiple of ``g = ghost_batch_size``, ``remainder`` chooses:
  ``"merge"`` (default) appends the ``B mod g`` leftover samples to the last full ghost batch (so no statistic
  is ever computed from fewer than ``g`` samples, and a 1-sample leftover never gives a degenerate variance);
  ``"separate"`` makes them an extra, smaller ghost batch (``torch.split`` semantics); ``"error"`` raises
  (Keras' ``virtual_batch_size`` requires divisibility). A batch smaller than ``g`` is a single ghost batch,
  i.e. plain BatchNorm, under "merge" and "separate".

The forward pass is vectorized: the batch is reshaped to (k, g, C, ...) and reduced, with at most one extra
tensor operation for an unequal last chunk; there is no Python loop over ghost batches.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._common import channel_view, check_channels, stats_dtype, update_running_stat

Remainder = Literal["merge", "separate", "error"]
_REMAINDERS = ("merge", "separate", "error")


def check_ghost_batch_size(ghost_batch_size: object) -> None:
    """``ValueError`` unless ``ghost_batch_size`` is a positive ``int`` (a ``bool`` is not one)."""
    if isinstance(ghost_batch_size, bool) or not isinstance(ghost_batch_size, int) or ghost_batch_size <= 0:
        raise ValueError(f"ghost_batch_size must be a positive integer, got {ghost_batch_size!r}")


def ghost_chunk_sizes(batch_size: int, ghost_batch_size: int, remainder: Remainder = "merge") -> list[int]:
    """Sizes of the consecutive ghost batches a batch of ``batch_size`` samples is split into (see module doc)."""
    if ghost_batch_size <= 0:
        raise ValueError(f"ghost_batch_size must be a positive integer, got {ghost_batch_size}")
    if remainder not in _REMAINDERS:
        raise ValueError(f"remainder must be one of {_REMAINDERS}, got {remainder!r}")
    full, rest = divmod(batch_size, ghost_batch_size)
    if rest and remainder == "error":
        raise ValueError(
            f"batch size {batch_size} is not a multiple of ghost_batch_size={ghost_batch_size}; use "
            "remainder='merge' or 'separate', or drop incomplete batches (DataLoader(drop_last=True))"
        )
    if full == 0:
        return [batch_size]
    sizes = [ghost_batch_size] * full
    if rest:
        if remainder == "merge":
            sizes[-1] += rest
        else:
            sizes.append(rest)
    return sizes


def _normalize_chunks(x: Tensor, chunk: int, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Normalize x (k*chunk, C, *S) per (chunk, channel). Returns (y, mean (k, C), biased var (k, C))."""
    n, c = x.shape[0], x.shape[1]
    xs = x.reshape((n // chunk, chunk) + x.shape[1:])
    dims = (1,) + tuple(range(3, xs.dim()))
    var, mean = torch.var_mean(xs.to(stats_dtype(x)), dim=dims, correction=0)
    shape = (n // chunk, 1, c) + (1,) * (xs.dim() - 3)
    y = (xs - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + eps)
    return y.reshape(x.shape), mean, var


class _GhostBatchNormMixin:
    """Shared implementation of GhostBatchNorm1d/2d/3d (subclasses of the matching ``nn.BatchNormNd``)."""

    _bn_cls: type[_BatchNorm]

    # attributes provided by _BatchNorm
    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool
    training: bool
    weight: Tensor | None
    bias: Tensor | None
    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: Tensor | None

    def __init__(
        self,
        num_features: int,
        ghost_batch_size: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        *,
        scale_momentum: bool = True,
        remainder: Remainder = "merge",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_ghost_batch_size(ghost_batch_size)
        if remainder not in _REMAINDERS:
            raise ValueError(f"remainder must be one of {_REMAINDERS}, got {remainder!r}")
        super().__init__(  # type: ignore[call-arg]
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype
        )
        self.ghost_batch_size = ghost_batch_size
        self.scale_momentum = bool(scale_momentum)
        self.remainder: Remainder = remainder

    def extra_repr(self) -> str:
        base = super().extra_repr()  # type: ignore[misc]
        return (
            f"{base}, ghost_batch_size={self.ghost_batch_size}, scale_momentum={self.scale_momentum}, "
            f"remainder={self.remainder!r}"
        )

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)  # type: ignore[attr-defined]  # from nn.BatchNormNd
        check_channels(input, self.num_features, type(self).__name__)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        if not use_batch_stats:
            return F.batch_norm(
                input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        sizes = ghost_chunk_sizes(input.shape[0], self.ghost_batch_size, self.remainder)
        per_channel = input[0, 0].numel()  # spatial elements per sample and channel
        if min(sizes) * per_channel <= 1:  # batch statistics in train mode, or in eval without running ones
            raise ValueError(
                f"{type(self).__name__}: a ghost batch of {min(sizes)} sample(s) has fewer than 2 values per channel "
                f"(input shape {tuple(input.shape)}, ghost batch sizes {sizes}); use a larger batch, "
                "remainder='merge', or eval mode with running statistics"
            )
        # Vectorized: the leading equal-size ghost batches in one reshape, an unequal last one separately.
        n_equal = len(sizes) if sizes[-1] == sizes[0] else len(sizes) - 1
        split = n_equal * sizes[0]
        parts = [_normalize_chunks(input[:split], sizes[0], self.eps)]
        if split < input.shape[0]:
            parts.append(_normalize_chunks(input[split:], input.shape[0] - split, self.eps))
        out = parts[0][0] if len(parts) == 1 else torch.cat([p[0] for p in parts], dim=0)

        if self.training and self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                means = torch.cat([p[1] for p in parts], dim=0)  # (k, C)
                var = torch.cat([p[2] for p in parts], dim=0)
                counts = torch.tensor(sizes, dtype=var.dtype, device=var.device) * per_channel
                unbiased = var * (counts / (counts - 1)).unsqueeze(1)
                k = len(sizes)
                momentum = self.momentum
                if momentum is not None and self.scale_momentum:
                    momentum = momentum / k
                assert self.running_var is not None
                update_running_stat(self.running_mean, means, momentum, self.num_batches_tracked)
                update_running_stat(self.running_var, unbiased, momentum, self.num_batches_tracked)
                if self.num_batches_tracked is not None:
                    self.num_batches_tracked.add_(k)

        if self.weight is not None:
            out = out * channel_view(self.weight, out.dim())
        if self.bias is not None:
            out = out + channel_view(self.bias, out.dim())
        return out.to(input.dtype)  # like BatchNorm: output in the input's dtype (e.g. fp16 under autocast)

    @classmethod
    def from_batchnorm(
        cls,
        bn: _BatchNorm,
        ghost_batch_size: int,
        *,
        scale_momentum: bool = True,
        remainder: Remainder = "merge",
    ) -> _GhostBatchNormMixin:
        """Build a ghost BN equivalent to ``bn`` (same eps/momentum/affine/running stats, same train/eval mode).

        The new module reuses ``bn``'s ``weight``/``bias`` Parameter objects (so an optimizer that already holds
        them keeps working, like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``) and gets copies of its
        running-statistics buffers. ``bn`` must be an instance of the matching ``nn.BatchNormNd``.
        """
        if not isinstance(bn, cls._bn_cls):
            raise TypeError(
                f"{cls.__name__}.from_batchnorm expects an nn.{cls._bn_cls.__name__}, got {type(bn).__name__}; "
                "use tta_norm.layers.convert_to_ghost_bn to convert a whole model"
            )
        ref = bn.weight if bn.weight is not None else bn.running_mean
        new = cls(
            bn.num_features,
            ghost_batch_size,
            bn.eps,
            bn.momentum,
            bn.affine,
            bn.track_running_stats,
            scale_momentum=scale_momentum,
            remainder=remainder,
            device=None if ref is None else ref.device,
            dtype=None if ref is None else ref.dtype,
        )
        if bn.affine:
            new.weight = bn.weight  # type: ignore[assignment]
            new.bias = bn.bias  # type: ignore[assignment]
        if bn.track_running_stats and bn.running_mean is not None:
            with torch.no_grad():
                assert new.running_mean is not None and new.running_var is not None
                assert bn.running_var is not None and bn.num_batches_tracked is not None
                assert new.num_batches_tracked is not None
                new.running_mean.copy_(bn.running_mean)
                new.running_var.copy_(bn.running_var)
                new.num_batches_tracked.copy_(bn.num_batches_tracked)
        new.train(bn.training)  # type: ignore[attr-defined]
        return new


class GhostBatchNorm1d(_GhostBatchNormMixin, nn.BatchNorm1d):
    """Ghost BatchNorm for (N, C) or (N, C, L) inputs; drop-in for ``nn.BatchNorm1d`` (and an instance of it).

    Args: as ``nn.BatchNorm1d`` plus ``ghost_batch_size`` (samples per ghost batch, > 0),
    ``scale_momentum`` (divide the momentum by the number of ghost batches, default True) and ``remainder``
    (``"merge"``/``"separate"``/``"error"``); see the module docstring for these conventions.
    State-dict keys are those of ``nn.BatchNorm1d``.
    """

    _bn_cls = nn.BatchNorm1d


class GhostBatchNorm2d(_GhostBatchNormMixin, nn.BatchNorm2d):
    """Ghost BatchNorm for (N, C, H, W) inputs; drop-in for ``nn.BatchNorm2d`` (and an instance of it).

    Training: each ghost batch of ``ghost_batch_size`` consecutive samples is normalized with its own
    per-channel statistics; gamma/beta and the running statistics are shared. Eval: running statistics.
    Running statistics follow BatchNorm applied to the ghost batches in order with per-chunk momentum
    ``momentum / k`` (``scale_momentum=True``) or ``momentum``. Leftover samples: ``remainder``.
    State-dict keys are those of ``nn.BatchNorm2d``. Cite: Hoffer et al. 2017; Summers & Dinneen 2020.
    """

    _bn_cls = nn.BatchNorm2d


class GhostBatchNorm3d(_GhostBatchNormMixin, nn.BatchNorm3d):
    """Ghost BatchNorm for (N, C, D, H, W) inputs; drop-in for ``nn.BatchNorm3d`` (and an instance of it)."""

    _bn_cls = nn.BatchNorm3d


GHOST_BN_FOR: dict[type[nn.Module], type[_GhostBatchNormMixin]] = {
    nn.BatchNorm1d: GhostBatchNorm1d,
    nn.BatchNorm2d: GhostBatchNorm2d,
    nn.BatchNorm3d: GhostBatchNorm3d,
}
