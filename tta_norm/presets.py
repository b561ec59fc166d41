"""Presets: named :class:`NormSpec` data, each with its paper and defaults. A registry, not code.

Add your own with :func:`register_preset`.  ``tta_norm.presets()`` lists the names.
"""

from __future__ import annotations

from dataclasses import dataclass

from tta_norm.norm.spec import NormSpec
from tta_norm.stats.mixing import DEFAULT_PSEUDO_COUNT


class UnfittedTTNWarning(UserWarning):
    """The ``ttn`` preset (channel-wise mixing) was used without fitted weights: every channel mixes with
    ``alpha = 0.5``, which is a plain mixture, not TTN.  Fit it with ``tta-norm ttn-fit`` (or
    :func:`tta_norm.fitting.fit_ttn`) and pass ``init_state=``."""


@dataclass(frozen=True)
class Preset:
    """A named spec with a one-line summary, its source and what it does at batch size 1."""

    name: str
    spec: NormSpec
    summary: str
    citation: str
    batch_size_one: str


_REGISTRY: dict[str, Preset] = {}


def register_preset(
    name: str, spec: NormSpec, summary: str, citation: str = "", batch_size_one: str = "", *, overwrite: bool = False
) -> Preset:
    """Add a preset to the registry (``overwrite=True`` to replace an existing name)."""
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"preset {name!r} already exists; pass overwrite=True to replace it")
    preset = Preset(name, spec, summary, citation, batch_size_one)
    _REGISTRY[name] = preset
    return preset


def presets() -> list[str]:
    """Names of all registered presets, in registration order."""
    return list(_REGISTRY)


def get_preset(name: str) -> Preset:
    """The preset called ``name``; ``KeyError`` listing the known names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(_REGISTRY)}") from None


# ---- the built-in presets --------------------------------------------------------------------------------
_SINGLE_OK = "defined: the source prior keeps the statistics finite for a single sample"
_SINGLE_SPATIAL = (
    "defined while a layer has more than one spatial position (per-sample spatial statistics, like instance "
    "norm); raises ValueError at a layer with one value per channel (1x1 maps, BatchNorm1d) - use window=W"
)

register_preset(
    "source",
    NormSpec(mixing="source"),
    "the unadapted source model (BN running statistics; a.k.a. BN-0)",
    "Ioffe & Szegedy, ICML 2015",
    "defined (statistics never see the batch)",
)
register_preset(
    "tbn",
    NormSpec(mixing="test"),
    "test-batch statistics, biased variance (a.k.a. norm, BN-1, BN adapt)",
    "Nado et al. 2020; Schneider et al., NeurIPS 2020; Wang et al. (TENT), ICLR 2021",
    _SINGLE_SPATIAL,
)
register_preset(
    "alpha",
    NormSpec(mixing="linear", alpha=0.1),
    "linear mix, weight alpha=0.1 on the test statistics (Marsden & Doebler's BN-alpha)",
    "You et al. 2021 (arXiv 2110.04065); Marsden & Doebler test-time-adaptation (BN.ALPHA=0.1)",
    _SINGLE_OK,
)
register_preset(
    "prior",
    NormSpec(mixing="linear", pseudo_count=DEFAULT_PSEUDO_COUNT),
    "linear mix with source prior N/(N+n), N=16 pseudo-samples",
    "Schneider et al., NeurIPS 2020",
    _SINGLE_OK,
)
register_preset(
    "ema",
    NormSpec(mixing="ema", momentum=0.05),
    "EMA of batch statistics from the source, normalise with the updated state (RoTTA RBN, momentum 0.05)",
    "Yuan et al. (RoTTA), CVPR 2023",
    _SINGLE_OK + " (a single sample moves the state with momentum 0.05)",
)
register_preset(
    "medbn",
    NormSpec(estimator="median_msd", mixing="test"),
    "median and mean squared deviation from it over the test batch (lower median)",
    "Park et al. (MedBN), CVPR 2024",
    _SINGLE_SPATIAL,
)
register_preset(
    "medbn-mad",
    NormSpec(estimator="median_mad", mixing="test"),
    "median and squared MAD over the test batch (MedBN's MMNorm ablation; median_mad_normal for x1.4826)",
    "Park et al. (MedBN), CVPR 2024",
    _SINGLE_SPATIAL,
)
register_preset(
    "iabn",
    NormSpec(mixing="source", instance="iabn", iabn_k=4.0),
    "NOTE's IABN layer only (instance statistics soft-shrunk toward the source statistics, k=4) on a "
    "BN-trained source model; without NOTE's PBRS memory, its momentum-0.01 statistics and its entropy step",
    "Gong et al. (NOTE), NeurIPS 2022",
    "defined (per-instance; layers with one spatial position fall back to the source statistics)",
)
register_preset(
    "iew",
    NormSpec(mixing="source", instance="example", example_weight=1.0 / 128),
    "inference example weighing: mix each example's own statistics into the source, a=1/128 (1/B_train)",
    "Summers & Dinneen, ICLR 2020",
    "defined (per example)",
)
register_preset(
    "ttn",
    NormSpec(mixing="mixture", alpha=0.5, channelwise=True),
    "mixture with a channel-wise test weight per layer (TTN); needs weights fitted by ttn-fit (init_state=), "
    "without them every channel mixes with alpha=0.5 (a plain mixture; UnfittedTTNWarning)",
    "Lim et al. (TTN), ICLR 2023",
    _SINGLE_OK + " (alpha < 1)",
)
register_preset(
    "sabn",
    NormSpec(mixing="source", num_domains=2),
    "sandwich BN: shared affine then one of K=2 per-domain affines, selected by domain=k at call time",
    "Gong et al. (Sandwich BN), WACV 2022",
    "defined (source statistics)",
)
