"""Gradient methods that compose with any statistics preset: a registry of thin adapters."""

from __future__ import annotations

from tta_norm.methods.base import GradientMethod, collect_norm_params, softmax_entropy
from tta_norm.methods.eata import EATA, eata_defaults, entropy_margin
from tta_norm.methods.fisher import cached_fishers, clear_fisher_cache, compute_fishers
from tta_norm.methods.sar import SAR
from tta_norm.methods.tent import Tent

_METHODS: dict[str, type[GradientMethod]] = {}


def register_method(name: str, cls: type[GradientMethod], *, overwrite: bool = False) -> None:
    """Add a gradient method class under ``name``."""
    if name in _METHODS and not overwrite:
        raise ValueError(f"method {name!r} already exists; pass overwrite=True to replace it")
    _METHODS[name] = cls


def methods() -> list[str]:
    """Names of the registered gradient methods."""
    return list(_METHODS)


def get_method_class(name: str) -> type[GradientMethod]:
    """The method class called ``name``; ``KeyError`` listing the known names otherwise."""
    try:
        return _METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; known methods: {', '.join(_METHODS)}") from None


register_method("tent", Tent)
register_method("eata", EATA)
register_method("sar", SAR)

__all__ = [
    "EATA",
    "SAR",
    "GradientMethod",
    "Tent",
    "cached_fishers",
    "clear_fisher_cache",
    "collect_norm_params",
    "compute_fishers",
    "eata_defaults",
    "entropy_margin",
    "get_method_class",
    "methods",
    "register_method",
    "softmax_entropy",
]
