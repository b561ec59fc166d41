"""Swap a model's BatchNorm layers for :class:`AdaptiveNorm`, and steer all of them at once."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm, _LazyNormBase

from tta_norm.norm.adaptive import AdaptiveNorm, adaptive_layers
from tta_norm.norm.context import layer_options
from tta_norm.norm.spec import NormSpec


def find_batchnorms(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """Every ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm`` (any ``_BatchNorm`` subclass) in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm)]


def convert_batchnorms(model: nn.Module, spec: NormSpec) -> list[str]:
    """Replace, in place, every BatchNorm of ``model`` by an :class:`AdaptiveNorm` built from it.

    Returns the names of the replaced layers.  Raises ``ValueError`` if there is none, or for an
    uninitialised lazy BatchNorm.
    """
    found = find_batchnorms(model)
    if not found:
        kinds = sorted({type(m).__name__ for m in model.modules() if "Norm" in type(m).__name__})
        extra = f" (it has {', '.join(kinds)}, which tta_norm does not adapt)" if kinds else ""
        raise ValueError(
            f"model {type(model).__name__} has no BatchNorm layer to adapt{extra}; tta_norm adapts "
            "nn.BatchNorm1d/2d/3d and nn.SyncBatchNorm statistics"
        )
    for name, bn in found:
        if isinstance(bn, _LazyNormBase) and bn.has_uninitialized_params():
            raise ValueError(f"lazy BatchNorm {name!r} is uninitialised; run one forward pass before adapting")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, AdaptiveNorm.from_batchnorm(bn, spec, name=name))
    return [name for name, _ in found]


def _set_all(model: nn.Module, **options: object) -> contextlib.AbstractContextManager[None]:
    return layer_options([layer for _, layer in adaptive_layers(model)], **options)


@contextlib.contextmanager
def layer_attribute(layers: list[AdaptiveNorm], attr: str, value: object) -> Iterator[None]:
    """Within the block, and in the calling thread only, option ``attr`` (``update_state``, ``use_batch`` or
    ``domain``) is ``value`` for the given adaptive layers (:func:`tta_norm.norm.context.layer_options`)."""
    if attr not in ("update_state", "use_batch", "domain"):
        raise ValueError(f"unknown per-call option {attr!r}; use update_state, use_batch or domain")
    with layer_options(layers, **{attr: value}):
        yield


def keep_state(model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Within the block (in the calling thread), adaptive layers compute their statistics as usual but commit
    no EMA update.

    For extra forward passes on the same batch (SAR's second pass, an attacker's surrogate passes).
    """
    return _set_all(model, update_state=False)


def without_batch(model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Within the block, adaptive layers normalise with their current state and never look at the batch."""
    return _set_all(model, use_batch=False)


def with_domain(model: nn.Module, domain: int | Tensor | None) -> contextlib.AbstractContextManager[None]:
    """Within the block, SaBN layers apply the affine head ``domain`` (an int, or per-sample ``(N,)`` indices)."""
    return _set_all(model, domain=domain)
