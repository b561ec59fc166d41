"""The adaptive norm layer (``AdaptiveNorm``), its spec (``NormSpec``), functional core and model converter."""

from tta_norm.norm.adaptive import AdaptiveNorm, adaptive_layers
from tta_norm.norm.convert import convert_batchnorms, find_batchnorms, keep_state, with_domain, without_batch
from tta_norm.norm.functional import layer_statistics, normalize
from tta_norm.norm.spec import NormSpec

__all__ = [
    "AdaptiveNorm",
    "NormSpec",
    "adaptive_layers",
    "convert_batchnorms",
    "find_batchnorms",
    "keep_state",
    "layer_statistics",
    "normalize",
    "with_domain",
    "without_batch",
]
