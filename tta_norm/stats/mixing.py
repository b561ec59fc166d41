"""Mixing rules: combine test statistics with source (population) statistics. Pure functions.

**Convention: ``alpha`` is the weight on the TEST statistics** (Marsden & Döbler's ``BN.ALPHA``; TTN's alpha;
inference example weighing's alpha).  ``prior`` is the weight on the SOURCE statistics (Schneider et al. 2020,
TTAB's ``adapt_prior``; α-BN's α): ``alpha = 1 - prior``.  Use :func:`alpha_from_prior` and
:func:`pseudo_count_alpha` to convert.

``alpha`` may be a Python float or a tensor that broadcasts against the statistics (a channel-wise ``(C,)``
tensor for TTN, or ``(N, C)``).
"""

from __future__ import annotations

from typing import Union

import torch
from torch import Tensor

from tta_norm.stats.estimators import Stats

Weight = Union[float, Tensor]  # noqa: UP007 (keeps the alias usable at runtime on Python 3.10)

#: Schneider et al. (NeurIPS 2020) pseudo-count of source samples; N = 16 is their small-batch choice.
DEFAULT_PSEUDO_COUNT = 16


def alpha_from_prior(prior: Weight) -> Weight:
    """Convert a weight on the source statistics (``prior``) to the weight on the test statistics."""
    return 1.0 - prior


def pseudo_count_alpha(batch_count: int, pseudo_count: float = DEFAULT_PSEUDO_COUNT) -> float:
    """Schneider et al.'s prior ``N / (N + n)`` expressed as a test weight: ``alpha = n / (N + n)``.

    ``batch_count`` is ``n``, the number of test samples in the batch; ``pseudo_count`` is ``N``.
    """
    if batch_count < 0 or pseudo_count < 0:
        raise ValueError("batch_count and pseudo_count must be non-negative")
    if batch_count + pseudo_count == 0:
        raise ValueError("batch_count + pseudo_count must be positive")
    return batch_count / (pseudo_count + batch_count)


def mix_linear(test: Stats, source: Stats, alpha: Weight) -> Stats:
    """Linear mixing of means and of variances (Schneider et al. 2020; Marsden & Döbler's BN-α)::

        mu  = (1 - alpha) * mu_s  + alpha * mu_t
        var = (1 - alpha) * var_s + alpha * var_t
    """
    return Stats(torch.lerp(source.mean, test.mean, alpha), torch.lerp(source.var, test.var, alpha))


def mix_mixture(test: Stats, source: Stats, alpha: Weight) -> Stats:
    """The exact first two moments of the mixture ``alpha * P_test + (1 - alpha) * P_source``::

        mu  = (1 - alpha) * mu_s + alpha * mu_t
        var = (1 - alpha) * var_s + alpha * var_t + alpha * (1 - alpha) * (mu_t - mu_s)^2

    TTN (Lim et al., ICLR 2023) and inference example weighing (Summers & Dinneen, ICLR 2020) use it.  When
    ``alpha`` is the fraction of test samples among the pooled samples and both variances are biased, the
    result is exactly the biased mean and variance of the pooled samples.
    """
    mean = torch.lerp(source.mean, test.mean, alpha)
    # alpha (1 - alpha) (mu_t - mu_s)^2 == (mu - mu_s) (mu_t - mu): the same product in fewer ops
    var = torch.addcmul(torch.lerp(source.var, test.var, alpha), mean - source.mean, test.mean - mean)
    return Stats(mean, var)


def ema_update(state: Stats, batch: Stats, momentum: float) -> Stats:
    """One exponential-moving-average step from the current ``state`` toward the batch statistics::

        mu  <- (1 - momentum) * mu  + momentum * mu_t
        var <- (1 - momentum) * var + momentum * var_t

    RoTTA's robust BN (Yuan et al., CVPR 2023) starts the state at the source statistics, uses momentum 0.05
    and normalises with the *updated* state.  Equal to :func:`mix_linear` with ``alpha = momentum``.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    return mix_linear(batch, state, momentum)


def mix(test: Stats, source: Stats, alpha: Weight, rule: str) -> Stats:
    """Dispatch by name: ``"linear"`` (:func:`mix_linear`) or ``"mixture"`` (:func:`mix_mixture`)."""
    if rule == "linear":
        return mix_linear(test, source, alpha)
    if rule == "mixture":
        return mix_mixture(test, source, alpha)
    raise ValueError(f"unknown mixing rule {rule!r}; expected 'linear' or 'mixture'")
