"""Optimizer parameter groups with separate weight decay for normalization parameters and biases.

Summers & Dinneen (ICLR 2020, arXiv 1906.03548, item 3) study weight decay on the BatchNorm scale and shift
(gamma, beta); common practice is the opposite (no decay on norm parameters and biases). ``param_groups``
makes both explicit.

Classification (every parameter of ``model`` lands in exactly one group, shared parameters once):

* ``"norm"``: parameters registered directly on a normalization layer: ``BatchNorm*``/``SyncBatchNorm``/
  ``InstanceNorm*`` (any ``torch.nn.modules.batchnorm._NormBase``), ``GroupNorm``, ``LayerNorm``, ``RMSNorm``,
  ``LocalResponseNorm``, and any module with the marker attribute ``is_norm_layer = True`` (the layers in
  ``tta_norm.layers`` set it). A norm layer may list parameter names in ``regular_decay_params``; those are
  ordinary weights (e.g. Proxy Norm's proxy offsets, which the paper's code decays).
* ``"bias"``: other parameters registered under the name ``bias`` (conv/linear biases).
* ``"decay"``: everything else (conv/linear weights, ...).
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _NormBase

NORM_LAYER_TYPES: tuple[type[nn.Module], ...] = (
    _NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
"""Module types treated as normalization layers (in addition to modules with ``is_norm_layer = True``)."""


def is_norm_layer(module: nn.Module) -> bool:
    """True for the types in ``NORM_LAYER_TYPES`` and for modules whose ``is_norm_layer`` attribute is True."""
    return isinstance(module, NORM_LAYER_TYPES) or getattr(module, "is_norm_layer", False) is True


def _decay_value(setting: float | bool, weight_decay: float, name: str) -> float:
    if isinstance(setting, bool):
        return weight_decay if setting else 0.0
    if not isinstance(setting, int | float) or setting < 0:
        raise ValueError(f"{name} must be a bool or a non-negative float, got {setting!r}")
    return float(setting)


def param_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    norm_decay: float | bool = True,
    bias_decay: float | bool = True,
    trainable_only: bool = False,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups ``[{"name", "params", "weight_decay"}, ...]`` for ``model``.

    Args:
        weight_decay: decay for ordinary weights (group ``"decay"``).
        norm_decay: decay for normalization-layer parameters (gamma, beta): True = ``weight_decay`` (the
            default, same as a plain optimizer), False = 0, or an explicit float.
        bias_decay: same for non-norm biases.
        trainable_only: leave out parameters with ``requires_grad=False``.

    Empty groups are omitted. Pass the result to any ``torch.optim`` optimizer; the extra ``"name"`` key is
    kept by the optimizer. See the module docstring for how parameters are classified.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    decays = {
        "decay": float(weight_decay),
        "norm": _decay_value(norm_decay, weight_decay, "norm_decay"),
        "bias": _decay_value(bias_decay, weight_decay, "bias_decay"),
    }
    buckets: dict[str, list[nn.Parameter]] = {k: [] for k in decays}
    seen: set[int] = set()
    for module in model.modules():
        norm = is_norm_layer(module)
        regular = set(getattr(module, "regular_decay_params", ())) if norm else set()
        for pname, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            if trainable_only and not param.requires_grad:
                continue
            if norm and pname not in regular:
                kind = "norm"
            elif not norm and pname == "bias":
                kind = "bias"
            else:
                kind = "decay"
            buckets[kind].append(param)
    return [
        {"name": kind, "params": params, "weight_decay": decays[kind]} for kind, params in buckets.items() if params
    ]
