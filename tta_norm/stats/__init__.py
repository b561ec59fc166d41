"""Statistics estimators and mixing rules: small pure functions over tensors (see each module's docstring)."""

from tta_norm.stats.estimators import (
    MAD_NORMAL_CONSISTENCY,
    Stats,
    batch_from_instance,
    batch_mean_var,
    batch_median,
    batch_median_mad,
    batch_median_msd,
    count_per_channel,
    example_stats,
    iabn_shrink,
    instance_mean_var,
    reduce_dims,
)
from tta_norm.stats.mixing import (
    DEFAULT_PSEUDO_COUNT,
    alpha_from_prior,
    ema_update,
    mix,
    mix_linear,
    mix_mixture,
    pseudo_count_alpha,
)

__all__ = [
    "DEFAULT_PSEUDO_COUNT",
    "MAD_NORMAL_CONSISTENCY",
    "Stats",
    "alpha_from_prior",
    "batch_from_instance",
    "batch_mean_var",
    "batch_median",
    "batch_median_mad",
    "batch_median_msd",
    "count_per_channel",
    "ema_update",
    "example_stats",
    "iabn_shrink",
    "instance_mean_var",
    "mix",
    "mix_linear",
    "mix_mixture",
    "pseudo_count_alpha",
    "reduce_dims",
]
