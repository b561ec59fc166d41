"""tta_norm: test-time adaptation and robustness of normalization layers.

>>> import tta_norm
>>> tta = tta_norm.adapt(model, "medbn")          # doctest: +SKIP
>>> logits = tta(x)                               # adapts on x, returns its logits  # doctest: +SKIP
>>> tta.reset()                                   # back to the source model  # doctest: +SKIP
"""

from tta_norm.api import TTAModel, adapt
from tta_norm.methods import methods
from tta_norm.norm import AdaptiveNorm, AdaptiveNormAct, NormSpec, UnadaptedNormWarning, register_norm_converter
from tta_norm.presets import UnfittedTTNWarning, get_preset, presets, register_preset

__version__ = "0.1.0"

__all__ = [
    "AdaptiveNorm",
    "AdaptiveNormAct",
    "NormSpec",
    "TTAModel",
    "UnadaptedNormWarning",
    "UnfittedTTNWarning",
    "__version__",
    "adapt",
    "get_preset",
    "methods",
    "presets",
    "register_norm_converter",
    "register_preset",
]
