"""Batch-group normalization: BN + GN for very small batches.

Summers & Dinneen (ICLR 2020, arXiv 1906.03548, item 4) and Zhou et al. ("Batch Group Normalization",
arXiv 2012.02782) compute the normalization statistics over the batch *and* a group of features together:
the per-sample features (C, *spatial) are split into ``G = num_groups`` contiguous groups, i.e. the input is
viewed as (N, G, C*S/G), and one mean/variance is computed per group over dims (0, 2). The affine (gamma,
beta) stays per channel, as in BN and GN.

* ``grouping="channel"`` (default): ``G`` must divide ``C``; each group is ``C/G`` whole channels (GN-style).
  ``G = C`` is exactly BatchNorm; ``G = 1`` normalizes over the whole batch tensor ("batch-layer norm").
* ``grouping="flat"`` (Zhou et al.'s formulation): ``G`` only has to divide ``C*S`` (checked per input), so a
  group may cut through a channel's spatial map when ``G > C`` or ``G`` does not divide ``C``. The mapping of
  elements to groups then depends on the spatial size, so inference inputs must have the training spatial size
  for the running statistics to mean the same thing: the layer records the C*S of the batches that update its
  running statistics and refuses another C*S in eval (a plain attribute, not in the state dict: after
  ``load_state_dict`` or ``reset_running_stats`` the next training batch sets it again). When ``G`` divides ``C``
  both groupings are identical.

Running statistics: one EMA per group (``running_mean``/``running_var`` of shape (G,)), updated exactly like
BatchNorm's (momentum, unbiased variance with n = N*C*S/G, ``momentum=None`` = cumulative average,
``num_batches_tracked``). Eval mode normalizes every element of group g with the group's running statistics.
With ``track_running_stats=False`` batch statistics are used in eval mode too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._common import channel_view, check_channels, stats_dtype, update_running_stat

Grouping = Literal["channel", "flat"]


def _check_eps(eps: float) -> None:
    if not eps > 0:  # also NaN: eps = 0 divides a constant group by zero
        raise ValueError(f"BatchGroupNorm: eps must be > 0, got {eps}")


class BatchGroupNorm(nn.Module):
    """Normalize over (batch x group of features) with per-channel affine and per-group running stats.

    Args:
        num_features: channels C of the (N, C, *spatial) input (any number of spatial dims, including none).
        num_groups: G, number of feature groups per sample; statistics are computed over N * C*S/G elements.
        eps, momentum, affine, track_running_stats: as in ``nn.BatchNorm2d`` (eps > 0).
        grouping: ``"channel"`` (G | C, default) or ``"flat"`` (G | C*S); see the module docstring. With
            ``"flat"`` and G not dividing C, eval with running statistics refuses an input whose C*S differs from
            that of the training batches (the groups would cut the features differently).

    Cite: Summers & Dinneen 2020 ("Four Things", BN+GN); Zhou et al. 2020 (Batch Group Normalization).
    """

    is_norm_layer = True  # marker read by tta_norm.training.param_groups

    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: Tensor | None

    def __init__(
        self,
        num_features: int,
        num_groups: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        *,
        grouping: Grouping = "channel",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if num_features <= 0 or num_groups <= 0:
            raise ValueError(f"num_features and num_groups must be positive, got {num_features}, {num_groups}")
        _check_eps(eps)
        if grouping not in ("channel", "flat"):
            raise ValueError(f"grouping must be 'channel' or 'flat', got {grouping!r}")
        if grouping == "channel" and num_features % num_groups != 0:
            raise ValueError(
                f"num_groups={num_groups} does not divide num_features={num_features}; pick a divisor of the "
                "channel count, or grouping='flat' to split the flattened C*H*W features instead"
            )
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.num_groups = num_groups
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.grouping: Grouping = grouping
        # C*S per sample of the batches the running statistics were gathered on, where the grouping depends on it
        self._stats_features: int | None = None
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **factory))
            self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_groups, **factory))
            self.register_buffer("running_var", torch.ones(num_groups, **factory))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    @property
    def _size_dependent(self) -> bool:
        """True if which elements form a group depends on the spatial size (flat grouping, G not dividing C)."""
        return self.grouping == "flat" and self.num_features % self.num_groups != 0

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._stats_features = None  # statistics from elsewhere: their input size is not known
        super()._load_from_state_dict(*args, **kwargs)

    def reset_running_stats(self) -> None:
        self._stats_features = None
        if self.running_mean is not None and self.running_var is not None:
            self.running_mean.zero_()
            self.running_var.fill_(1.0)
            assert self.num_batches_tracked is not None
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, num_groups={self.num_groups}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}, grouping={self.grouping!r}"
        )

    def forward(self, input: Tensor) -> Tensor:
        check_channels(input, self.num_features, type(self).__name__)
        _check_eps(self.eps)  # a plain attribute, which may have been set after construction
        n = input.shape[0]
        per_sample = input[0].numel() if n else input.shape[1:].numel()
        if per_sample % self.num_groups != 0:
            raise ValueError(
                f"BatchGroupNorm(grouping='flat'): num_groups={self.num_groups} does not divide the "
                f"{per_sample} features per sample of input shape {tuple(input.shape)}"
            )
        group_size = per_sample // self.num_groups
        xg = input.reshape(n, self.num_groups, group_size)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        if use_batch_stats:
            count = n * group_size
            if self.training and count <= 1:
                raise ValueError(
                    f"BatchGroupNorm: only {count} value(s) per group for input shape {tuple(input.shape)}; "
                    "use fewer groups, a larger batch, or eval mode"
                )
            var, mean = torch.var_mean(xg.to(stats_dtype(input)), dim=(0, 2), correction=0)
            if self.training and self.track_running_stats and self.running_mean is not None:
                assert self.running_var is not None
                if self._size_dependent:
                    self._stats_features = per_sample
                with torch.no_grad():
                    momentum = self.momentum
                    update_running_stat(self.running_mean, mean.detach()[None], momentum, self.num_batches_tracked)
                    update_running_stat(
                        self.running_var,
                        (var.detach() * (count / (count - 1)))[None],
                        momentum,
                        self.num_batches_tracked,
                    )
                    if self.num_batches_tracked is not None:
                        self.num_batches_tracked.add_(1)
        else:
            assert self.running_mean is not None and self.running_var is not None
            seen = getattr(self, "_stats_features", None)  # (absent from a module pickled by an older version)
            if self._size_dependent and seen is not None and per_sample != seen:
                raise ValueError(
                    f"BatchGroupNorm(grouping='flat'): the running statistics were gathered on {seen} features per "
                    f"sample, the input {tuple(input.shape)} has {per_sample}; with num_groups={self.num_groups} not "
                    f"dividing the {self.num_features} channels the groups depend on the spatial size: evaluate at "
                    "the training spatial size, or use track_running_stats=False"
                )
            mean, var = self.running_mean, self.running_var
        y = (xg - mean.reshape(1, -1, 1)) * torch.rsqrt(var.reshape(1, -1, 1) + self.eps)
        out = y.reshape(input.shape)
        if self.weight is not None:
            out = out * channel_view(self.weight, out.dim())
        if self.bias is not None:
            out = out + channel_view(self.bias, out.dim())
        return out.to(input.dtype)

    @classmethod
    def from_batchnorm(
        cls, bn: _BatchNorm, num_groups: int | Callable[[int], int], *, grouping: Grouping = "channel"
    ) -> BatchGroupNorm:
        """Build a BatchGroupNorm from a BatchNorm: same eps/momentum/affine, same train/eval mode.

        The affine Parameter objects are reused (not copied). Group running statistics are initialised from the
        channel ones as the moments of an equal-weight mixture of the channels in the group: mean = mean of the
        channel means, var = mean(var_c + mean_c^2) - mean^2 (exact for G = C). ``grouping="flat"`` with
        G not dividing C has no such mapping; its running stats start from (0, 1).
        """
        c = bn.num_features
        g = num_groups(c) if callable(num_groups) else num_groups
        ref = bn.weight if bn.weight is not None else bn.running_mean
        new = cls(
            c,
            g,
            bn.eps,
            bn.momentum,
            bn.affine,
            bn.track_running_stats,
            grouping=grouping,
            device=None if ref is None else ref.device,
            dtype=None if ref is None else ref.dtype,
        )
        if bn.affine:
            new.weight = bn.weight
            new.bias = bn.bias
        if bn.running_mean is not None and new.running_mean is not None and c % g == 0:
            assert bn.running_var is not None and new.running_var is not None
            with torch.no_grad():
                m = bn.running_mean.reshape(g, c // g)
                second = (bn.running_var.reshape(g, c // g) + m * m).mean(1)
                gm = m.mean(1)
                new.running_mean.copy_(gm)
                new.running_var.copy_(second - gm * gm)
                assert new.num_batches_tracked is not None and bn.num_batches_tracked is not None
                new.num_batches_tracked.copy_(bn.num_batches_tracked)
        new.train(bn.training)
        return new
