"""Which adaptive layer replaces which norm layer: a registry ``norm class -> converter``.

A converter is a function ``(layer, spec, name) -> nn.Module`` that builds the test-time replacement of one
trained norm layer; the replacement is, or contains, an :class:`~tta_norm.norm.adaptive.AdaptiveNorm`.  The
conversion is exact by construction: everything the original layer applies besides the normalisation (timm's
``BatchNormAct2d`` applies dropout and an activation) must stay in the replacement, so that the ``source``
preset reproduces the layer in ``eval()`` mode and ``tbn`` reproduces it in ``train()`` mode.

Built in: ``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm`` (and any ``_BatchNorm`` subclass that keeps the
base ``forward``) -> ``AdaptiveNorm``; timm's ``BatchNormAct2d`` and ``SyncBatchNormAct`` -> ``AdaptiveNormAct``
(registered on first lookup once ``timm`` has been imported; ``tta_norm`` never imports ``timm`` itself);
:mod:`tta_norm.layers`' ghost BatchNorms -> ``AdaptiveNorm`` (their ghost batches are a training device: in
``eval()`` mode they are BatchNorms, and test-time statistics cover the whole test batch).
Lookup: the exact type first, then its bases in method-resolution order.  A class that inherits a converter
from a base but overrides that base's ``forward`` does something the converter does not know about: the
lookup refuses it (``TypeError`` naming the class and :func:`register_norm_converter`) instead of silently
dropping that behaviour.  Converters registered by the user take precedence over the built-in ones.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from tta_norm.norm.adaptive import AdaptiveNorm
from tta_norm.norm.norm_act import AdaptiveNormAct
from tta_norm.norm.spec import NormSpec

NormConverter = Callable[[nn.Module, NormSpec, str], nn.Module]
"""``(trained layer, spec, qualified name) -> replacement module`` (an AdaptiveNorm or a module containing one)."""

_CONVERTERS: dict[type, NormConverter] = {}


def adaptive_norm_from(layer: nn.Module, spec: NormSpec, name: str = "") -> AdaptiveNorm:
    """The built-in converter of ``nn.BatchNorm1d/2d/3d`` and ``nn.SyncBatchNorm``:
    :meth:`AdaptiveNorm.from_batchnorm`."""
    return AdaptiveNorm.from_batchnorm(layer, spec, name=name)  # type: ignore[arg-type]


def adaptive_norm_act_from(layer: nn.Module, spec: NormSpec, name: str = "") -> AdaptiveNormAct:
    """The built-in converter of timm's ``BatchNormAct2d``/``SyncBatchNormAct``: norm, then the layer's own
    ``drop`` and ``act`` (:meth:`AdaptiveNormAct.from_batchnorm`)."""
    return AdaptiveNormAct.from_batchnorm(layer, spec, name=name)  # type: ignore[arg-type]


def register_norm_converter(cls: type, fn: NormConverter) -> None:
    """Convert every layer of class ``cls`` (and of its subclasses that keep its ``forward``) with ``fn``.

    ``fn(layer, spec, name)`` returns the replacement of the trained ``layer``: an ``AdaptiveNorm`` (or a
    module containing one, e.g. ``AdaptiveNormAct``) followed by whatever else ``layer.forward`` applies.
    ``cls`` need not be a BatchNorm: a registered class is found and converted wherever it occurs (e.g.
    torchvision's ``FrozenBatchNorm2d``).  Registering a class again replaces its converter.

    >>> register_norm_converter(MyBatchNormAct, lambda bn, spec, name: AdaptiveNormAct.from_batchnorm(
    ...     bn, spec, name=name))  # doctest: +SKIP
    """
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise TypeError(f"register_norm_converter: cls must be an nn.Module subclass, got {cls!r}")
    if not callable(fn):
        raise TypeError(f"register_norm_converter: fn must be callable (layer, spec, name) -> nn.Module, got {fn!r}")
    _register_builtins()
    _CONVERTERS[cls] = fn


# converters of classes defined outside torch, registered once their module has been imported (a model that
# holds such a layer has imported it): tta_norm itself never imports timm
_LAZY_BUILTINS: dict[str, dict[str, NormConverter]] = {
    "timm.layers.norm_act": {"BatchNormAct2d": adaptive_norm_act_from, "SyncBatchNormAct": adaptive_norm_act_from},
    # ghost BN normalises ghost batches only in training; at test time it is a BatchNorm of the whole batch
    "tta_norm.layers.ghost_batch_norm": {f"GhostBatchNorm{d}d": adaptive_norm_from for d in (1, 2, 3)},
}
_lazy_done: set[str] = set()


def _register_builtins() -> None:
    """Built-in converters (never overriding a user's); those of ``_LAZY_BUILTINS`` once their module is loaded."""
    for cls in (_BatchNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm):
        _CONVERTERS.setdefault(cls, adaptive_norm_from)
    for module_name, converters in _LAZY_BUILTINS.items():
        module = sys.modules.get(module_name)
        if module is None or module_name in _lazy_done:
            continue
        for cls_name, fn in converters.items():
            cls = getattr(module, cls_name, None)
            if isinstance(cls, type):
                _CONVERTERS.setdefault(cls, fn)
        _lazy_done.add(module_name)


def registered_norm_classes() -> list[type]:
    """Every class with a converter (built-in and registered), in registration order."""
    _register_builtins()
    return list(_CONVERTERS)


def _unsupported(cls: type, base: type | None) -> TypeError:
    what = (
        f"it overrides forward() of {base.__module__}.{base.__qualname__}, so a plain adaptive norm would drop "
        "what its forward adds"
        if base is not None
        else "no converter is registered for it"
    )
    return TypeError(
        f"cannot adapt norm layer class {cls.__module__}.{cls.__qualname__}: {what}; register one with "
        f"tta_norm.register_norm_converter({cls.__qualname__}, fn) where fn(layer, spec, name) returns its "
        "adaptive replacement"
    )


def find_norm_converter(cls: type) -> NormConverter:
    """The converter of class ``cls``: registered for ``cls`` itself, else for its nearest registered base
    provided ``cls`` keeps that base's ``forward``; ``TypeError`` (naming ``cls`` and
    :func:`register_norm_converter`) otherwise."""
    _register_builtins()
    fn = _CONVERTERS.get(cls)
    if fn is not None:
        return fn
    for base in cls.__mro__[1:]:
        fn = _CONVERTERS.get(base)
        if fn is None:
            continue
        if getattr(cls, "forward", None) is not getattr(base, "forward", None):
            raise _unsupported(cls, base)
        return fn
    raise _unsupported(cls, None)


def is_convertible(module: nn.Module) -> bool:
    """Whether ``module`` is a layer the converter replaces: any ``_BatchNorm`` or an instance of a registered
    class (supported or not: an unsupported ``_BatchNorm`` subclass is reported, never skipped)."""
    if isinstance(module, _BatchNorm):
        return True
    _register_builtins()
    return any(base in _CONVERTERS for base in type(module).__mro__)
