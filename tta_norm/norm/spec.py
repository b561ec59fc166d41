"""``NormSpec``: the data that defines how an :class:`~tta_norm.norm.AdaptiveNorm` computes its statistics."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from tta_norm.stats.mixing import pseudo_count_alpha

Estimator = Literal["mean_var", "median_msd", "median_mad", "median_mad_normal"]
Mixing = Literal["source", "test", "linear", "mixture", "ema"]
Instance = Literal["none", "iabn", "example"]

ESTIMATORS: tuple[str, ...] = ("mean_var", "median_msd", "median_mad", "median_mad_normal")
MIXINGS: tuple[str, ...] = ("source", "test", "linear", "mixture", "ema")
INSTANCES: tuple[str, ...] = ("none", "iabn", "example")


@dataclass(frozen=True)
class NormSpec:
    """How an adaptive norm layer computes the statistics it normalises with. Pure data.

    The statistics are built in three steps:

    1. **estimator** of the test-batch statistics, per channel over batch and spatial dims:
       ``"mean_var"`` (mean and variance; ``unbiased`` picks ``/(n-1)`` over the default ``/n``),
       ``"median_msd"`` (MedBN: median and mean squared deviation from it), ``"median_mad"`` (median and
       MAD^2), ``"median_mad_normal"`` (median and (1.4826 MAD)^2).  ``median`` picks the lower median
       (default, ``torch.median``) or the average of the two middle values (``torch.quantile``).
    2. **mixing** with the source statistics (the BatchNorm's running buffers):
       ``"source"`` (ignore the batch), ``"test"`` (batch only), ``"linear"`` / ``"mixture"`` (see
       :mod:`tta_norm.stats.mixing`) with weight ``alpha`` **on the test statistics** (or ``prior`` on the
       source, or Schneider et al.'s ``pseudo_count`` N giving ``alpha = n / (N + n)`` for a batch of n
       samples), ``"ema"`` (RoTTA's RBN: an EMA state started at the source statistics, updated with
       ``momentum`` on every adapting forward and used *after* the update).  ``channelwise=True`` makes
       ``alpha`` a per-channel tensor of the layer (TTN), initialised from ``alpha``.
    3. optional per-instance refinement (``instance``): ``"iabn"`` shrinks each sample's spatial statistics
       toward the step-2 statistics (NOTE, threshold ``iabn_k`` standard errors), ``"example"`` mixes each
       sample's own statistics into the step-2 statistics with weight ``example_weight`` by the mixture rule
       (inference example weighing, Summers & Dinneen 2020).

    ``num_domains`` > 1 adds SaBN per-domain affine heads after the shared affine.  ``eps=None`` keeps each
    layer's own epsilon.
    """

    estimator: Estimator = "mean_var"
    mixing: Mixing = "test"
    unbiased: bool = False
    median: Literal["lower", "average"] = "lower"
    alpha: float | None = None
    prior: float | None = None
    pseudo_count: float | None = None
    momentum: float = 0.05
    channelwise: bool = False
    instance: Instance = "none"
    iabn_k: float = 4.0
    example_weight: float = 1.0 / 128
    num_domains: int = 1
    eps: float | None = None

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {self.estimator!r}; choose one of {ESTIMATORS}")
        if self.mixing not in MIXINGS:
            raise ValueError(f"unknown mixing {self.mixing!r}; choose one of {MIXINGS}")
        if self.instance not in INSTANCES:
            raise ValueError(f"unknown instance mode {self.instance!r}; choose one of {INSTANCES}")
        if self.median not in ("lower", "average"):
            raise ValueError(f"median must be 'lower' or 'average', got {self.median!r}")
        weights = [w for w in (self.alpha, self.prior, self.pseudo_count) if w is not None]
        if self.mixing in ("linear", "mixture"):
            if len(weights) != 1:
                raise ValueError(
                    f"mixing={self.mixing!r} needs exactly one of alpha (weight on test statistics), "
                    "prior (weight on source statistics) or pseudo_count (N in alpha = n/(N+n))"
                )
            if self.channelwise and self.pseudo_count is not None:
                raise ValueError("channelwise mixing is initialised from alpha or prior, not pseudo_count")
        elif weights:
            raise ValueError(f"alpha/prior/pseudo_count only apply to linear or mixture mixing, not {self.mixing!r}")
        elif self.channelwise:
            raise ValueError("channelwise=True needs mixing='linear' or 'mixture'")
        for name in ("alpha", "prior"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if self.pseudo_count is not None and self.pseudo_count < 0:
            raise ValueError(f"pseudo_count must be >= 0, got {self.pseudo_count}")
        if not 0.0 <= self.momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {self.momentum}")
        if not 0.0 <= self.example_weight <= 1.0:
            raise ValueError(f"example_weight must be in [0, 1], got {self.example_weight}")
        if self.iabn_k < 0:
            raise ValueError(f"iabn_k must be >= 0, got {self.iabn_k}")
        if isinstance(self.num_domains, bool) or not isinstance(self.num_domains, int):
            raise ValueError(f"num_domains must be an integer, got {self.num_domains!r}")
        if self.num_domains < 1:
            raise ValueError(f"num_domains must be >= 1, got {self.num_domains}")
        if self.eps is not None and self.eps < 0:
            raise ValueError(f"eps must be >= 0, got {self.eps}")

    @property
    def uses_batch(self) -> bool:
        """Whether the test batch enters the statistics at all."""
        return self.mixing != "source" or self.instance != "none"

    @property
    def batch_only(self) -> bool:
        """Whether the normalisation statistics come from the test batch alone (no source prior)."""
        return self.mixing == "test" or (self.mixing in ("linear", "mixture") and self.fixed_alpha(1) == 1.0)

    def fixed_alpha(self, batch_size: int) -> float:
        """The scalar test weight for a batch of ``batch_size`` samples (linear/mixture, not channelwise)."""
        if self.alpha is not None:
            return self.alpha
        if self.prior is not None:
            return 1.0 - self.prior
        if self.pseudo_count is not None:
            return pseudo_count_alpha(batch_size, self.pseudo_count)
        raise ValueError(f"mixing={self.mixing!r} has no test weight")

    def replace(self, **changes: Any) -> NormSpec:
        """A copy with some fields changed (validated again). Unknown field names raise ``TypeError``.

        Setting one of ``alpha`` / ``prior`` / ``pseudo_count`` clears the other two.
        """
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown NormSpec field(s): {sorted(unknown)}")
        weight_keys = {"alpha", "prior", "pseudo_count"}
        if weight_keys & set(changes):  # a new weight replaces the preset's weight of another kind
            changes = {**{k: None for k in weight_keys}, **changes}
        return dataclasses.replace(self, **changes)


def unused_fields(spec: NormSpec) -> frozenset[str]:
    """The fields whose value does not change what ``spec`` computes (a value given for them is ignored): the EMA
    ``momentum`` without ``"ema"`` mixing, ``unbiased`` without the mean/variance estimator, ``median`` without a
    median estimator, ``iabn_k`` / ``example_weight`` without their instance refinement."""
    unused = set()
    if spec.mixing != "ema":
        unused.add("momentum")
    if spec.estimator != "mean_var" or spec.mixing == "source":
        unused.add("unbiased")
    if not spec.estimator.startswith("median") or spec.mixing == "source":
        unused.add("median")
    if spec.instance != "iabn":
        unused.add("iabn_k")
    if spec.instance != "example":
        unused.add("example_weight")
    return frozenset(unused)


def spec_fields() -> frozenset[str]:
    """Names of the :class:`NormSpec` fields (used to route keyword overrides)."""
    return frozenset(f.name for f in dataclasses.fields(NormSpec))
