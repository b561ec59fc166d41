"""The adaptive norm layer (``AdaptiveNorm``, ``AdaptiveNormAct``), its spec (``NormSpec``), functional core,
model converter and its registry of norm classes (``register_norm_converter``)."""

from tta_norm.norm.adaptive import AdaptiveNorm, adaptive_layers
from tta_norm.norm.convert import (
    UnadaptedNormWarning,
    convert_batchnorms,
    find_batchnorms,
    keep_state,
    with_domain,
    without_batch,
)
from tta_norm.norm.functional import layer_statistics, normalize
from tta_norm.norm.norm_act import AdaptiveNormAct
from tta_norm.norm.registry import find_norm_converter, register_norm_converter
from tta_norm.norm.spec import NormSpec

__all__ = [
    "UnadaptedNormWarning",
    "AdaptiveNorm",
    "AdaptiveNormAct",
    "NormSpec",
    "adaptive_layers",
    "convert_batchnorms",
    "find_batchnorms",
    "find_norm_converter",
    "keep_state",
    "layer_statistics",
    "normalize",
    "register_norm_converter",
    "with_domain",
    "without_batch",
]
