"""Swap a model's BatchNorm layers for :class:`AdaptiveNorm`, and steer all of them at once."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _LazyNormBase

from tta_norm.norm.adaptive import AdaptiveNorm, adaptive_layers
from tta_norm.norm.context import layer_options
from tta_norm.norm.norm_act import AdaptiveNormAct
from tta_norm.norm.registry import find_norm_converter, is_convertible
from tta_norm.norm.spec import NormSpec


class UnadaptedNormWarning(UserWarning):
    """A norm layer with running statistics that the converter does not replace (e.g. ``InstanceNorm2d`` with
    ``track_running_stats=True``, :class:`~tta_norm.layers.BatchGroupNorm`, ``FrozenBatchNorm2d``) keeps its
    source statistics under every preset: register a converter for its class
    (:func:`~tta_norm.norm.registry.register_norm_converter`) to adapt it."""


def unadapted_norms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Layers of ``model`` outside the adaptive layers that hold running statistics (a ``running_mean`` or
    ``running_var`` buffer of their own): a statistics preset leaves them as they were."""
    inside: set[int] = set()
    for module in model.modules():
        if isinstance(module, (AdaptiveNorm, AdaptiveNormAct)):
            inside |= {id(m) for m in module.modules()}
    return [
        (name, module)
        for name, module in model.named_modules()
        if id(module) not in inside
        and any(module._buffers.get(b) is not None for b in ("running_mean", "running_var"))
    ]


def warn_unadapted_norms(model: nn.Module, stacklevel: int = 4) -> None:
    """Warn (:class:`UnadaptedNormWarning`) about the layers :func:`unadapted_norms` finds, by class."""
    left = unadapted_norms(model)
    if not left:
        return
    kinds: dict[str, list[str]] = {}
    for name, module in left:
        kinds.setdefault(type(module).__name__, []).append(name)
    text = "; ".join(f"{k} x{len(v)} ({', '.join(v[:3])}{', ...' if len(v) > 3 else ''})" for k, v in kinds.items())
    warnings.warn(
        f"{len(left)} norm layer(s) with running statistics are not adapted and keep their source statistics: "
        f"{text}; register a converter with tta_norm.register_norm_converter(cls, fn) to adapt them",
        UnadaptedNormWarning,
        stacklevel=stacklevel,
    )


#: the per-module hook tables a replacement takes over (forward and backward hooks, with their flags)
_CALL_HOOKS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks")  # fmt: skip


def _parametrizes(hook: object) -> bool:
    """A hook that recomputes the layer's own parameters before each forward (pruning, weight or spectral
    norm): the replacement copied their current values and has none of the attributes such a hook reads."""
    from torch.nn.utils import prune
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    return isinstance(hook, (prune.BasePruningMethod, WeightNorm, SpectralNorm))


def _take_over_hooks(old: nn.Module, new: nn.Module) -> None:
    """``new`` runs the forward/backward hooks registered on ``old`` (but not the parametrising pre-hooks of
    :func:`_parametrizes`): it shares ``old``'s hook tables, so the handles the user holds still remove them."""
    if any(_parametrizes(h) for h in old._forward_pre_hooks.values()):
        kept = {k: h for k, h in old._forward_pre_hooks.items() if not _parametrizes(h)}
        new._forward_pre_hooks.update(kept)
        new._forward_pre_hooks_with_kwargs.update({k: v for k, v in old._forward_pre_hooks_with_kwargs.items()
                                                   if k in kept})  # fmt: skip
        attrs = [a for a in _CALL_HOOKS if not a.startswith("_forward_pre")]
    else:
        attrs = list(_CALL_HOOKS)
    for attr in attrs:
        setattr(new, attr, getattr(old, attr))
    new._is_full_backward_hook = old._is_full_backward_hook


def find_batchnorms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every layer the converter replaces: any ``_BatchNorm`` (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, timm's
    ``BatchNormAct2d``...) and any instance of a class given to :func:`register_norm_converter`; the layers
    inside a found layer are not listed (the replacement of the outer one decides about them).  A layer reachable
    under several names (one module registered twice, ``nn.ModuleList([bn] * 3)``) is listed under each."""
    found: list[tuple[str, nn.Module]] = []
    inside: str | None = None  # prefix of the last found layer's submodules (contiguous in named_modules)
    for name, module in model.named_modules(remove_duplicate=False):
        if inside is not None and (inside == "" or name.startswith(inside)):
            continue
        if is_convertible(module):
            found.append((name, module))
            inside = f"{name}." if name else ""
    return found


def convert_batchnorms(model: nn.Module, spec: NormSpec, *, allow_none: bool = False) -> list[str]:
    """Replace, in place, every BatchNorm of ``model`` by its adaptive counterpart (an :class:`AdaptiveNorm`,
    or the replacement its registered converter builds, see :mod:`tta_norm.norm.registry`).

    A layer shared under several names is replaced by one module installed under each (sharing is kept).  The
    replacement runs the forward and backward hooks registered on the layer it replaces.

    Returns the names of the replaced layers (the first name of a shared one).  Raises ``ValueError`` if there
    is none (unless ``allow_none=True``: then nothing is replaced and ``[]`` is returned), or for an
    uninitialised lazy BatchNorm, and ``TypeError`` for a BatchNorm subclass with its own ``forward`` and no
    registered converter.
    Every replacement is built before the first one is installed: on error the model is unchanged.  Layers with
    running statistics that no converter handles are left as they are, with an :class:`UnadaptedNormWarning`.
    """
    found = find_batchnorms(model)
    if not found and allow_none:
        warn_unadapted_norms(model)
        return []
    if not found:
        kinds = sorted({type(m).__name__ for m in model.modules() if "Norm" in type(m).__name__})
        extra = f" (it has {', '.join(kinds)}, which tta_norm does not adapt)" if kinds else ""
        raise ValueError(
            f"model {type(model).__name__} has no BatchNorm layer to adapt{extra}; tta_norm adapts "
            "nn.BatchNorm1d/2d/3d and nn.SyncBatchNorm statistics"
        )
    converters = [find_norm_converter(type(bn)) for _, bn in found]
    if found[0][0] == "":
        raise ValueError(
            f"the model itself is a norm layer ({type(model).__name__}); wrap it first, e.g. nn.Sequential(model)"
        )
    replacements: dict[int, nn.Module] = {}
    for (name, bn), convert in zip(found, converters, strict=True):
        if id(bn) in replacements:
            continue
        if isinstance(bn, _LazyNormBase) and bn.has_uninitialized_params():
            raise ValueError(f"lazy BatchNorm {name!r} is uninitialised; run one forward pass before adapting")
        new = convert(bn, spec, name)
        if not isinstance(new, nn.Module) or not any(isinstance(m, AdaptiveNorm) for m in new.modules()):
            raise TypeError(
                f"the norm converter for {type(bn).__qualname__} returned {type(new).__name__} for layer "
                f"{name!r}; it must return an AdaptiveNorm or a module containing one"
            )
        replacements[id(bn)] = new
    for bn in {id(bn): bn for _, bn in found}.values():
        _take_over_hooks(bn, replacements[id(bn)])
    for name, bn in found:
        model.set_submodule(name, replacements[id(bn)])
    firsts: dict[int, str] = {}
    for name, bn in found:
        firsts.setdefault(id(bn), name)
    warn_unadapted_norms(model)
    return list(firsts.values())


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
