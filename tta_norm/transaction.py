"""All-or-nothing adaptation steps: a snapshot of everything a forward may change, restored bit for bit.

:class:`tta_norm.api.TTAModel` runs every adapting forward as a transaction: it takes a :class:`Snapshot`
before the forward, and either keeps the new state (the forward, the method's step and the output check all
succeeded) or restores the snapshot.  The snapshot holds exactly the state that can change:

* the model's mutable buffers (the EMA state of adaptive norm layers, any other module's buffers; the
  source statistics of :class:`~tta_norm.norm.AdaptiveNorm` never change and are skipped);
* with a gradient method: its trainable parameters, its optimiser's state and its own attributes
  (EATA's moving average, SAR's loss EMA...);
* with ``full=True`` (a reset is due in this forward): every parameter and buffer of the model.

Copies are exact (a concatenation, or ``x * 1.0``, which keeps signed zeros, infinities and NaN), so a
restored state equals the old one bit for bit.  The cost is one ``torch.cat`` of the mutable buffers per
forward (a few microseconds).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from tta_norm.norm.adaptive import AdaptiveNorm

_IMMUTABLE_BUFFERS = frozenset({"source_mean", "source_var"})


def mutable_buffer_slots(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """``(module, buffer name)`` of every buffer of ``model`` that a forward may change (see the module doc)."""
    slots = []
    for module in model.modules():
        skip = _IMMUTABLE_BUFFERS if isinstance(module, AdaptiveNorm) else frozenset()
        for name, buf in module._buffers.items():
            if buf is not None and name not in skip:
                slots.append((module, name))
    return slots


class MutableBuffers:
    """The mutable buffers of a model (:func:`mutable_buffer_slots`), copied in one ``torch.cat``.

    Buffers are looked up through their slots at every :meth:`tensors` call (``model.to(...)`` replaces buffer
    tensors); their flat views, which ``torch.cat`` reads in one call, are rebuilt only when a tensor changed."""

    def __init__(self, model: nn.Module) -> None:
        self.slots = mutable_buffer_slots(model)
        self._tensors: list[Tensor] = []
        self._views: list[Tensor] | None = None

    def tensors(self) -> tuple[list[Tensor], list[Tensor] | None]:
        """The current buffers, and their flat views if they share a dtype and device (else ``None``)."""
        tensors = [m._buffers[name] for m, name in self.slots]
        cached = self._tensors
        if len(cached) != len(tensors) or any(a is not b for a, b in zip(cached, tensors, strict=True)):
            same = len({(t.dtype, t.device) for t in tensors}) == 1 and all(t.is_contiguous() for t in tensors)
            self._views = [t.view(-1) for t in tensors] if same else None
            self._tensors = tensors
        return tensors, self._views


def _copy(tensors: list[Tensor]) -> list[Tensor]:
    """Exact copies; floating tensors in one fused call."""
    if tensors and all(t.is_floating_point() for t in tensors):
        with torch.no_grad():
            return list(torch._foreach_mul(tensors, 1.0))
    return [t.detach().clone() for t in tensors]


def _restore(targets: list[Tensor], saved: list[Tensor]) -> None:
    with torch.no_grad():
        for t, s in zip(targets, saved, strict=True):
            t.copy_(s)


class Snapshot:
    """The state a forward may change (see the module doc); :meth:`restore` puts it back bit for bit."""

    __slots__ = ("_buffers", "_buffer_copies", "_params", "_param_copies", "_optimizer", "_opt_state",
                 "_method", "_method_vars", "_owner_vars", "_owner")  # fmt: skip

    def __init__(
        self,
        owner: Any,
        buffers: MutableBuffers,
        method: Any = None,
        *,
        full: bool = False,
        owner_attributes: tuple[str, ...] = (),
    ) -> None:
        views = None
        if full:
            params = list(owner.model.parameters())
            tensors = list(owner.model.buffers())
        else:
            params = list(method.params) if method is not None else []
            tensors, views = buffers.tensors()
        if views:  # one copy of all buffers
            self._buffers, self._buffer_copies = views, torch.cat(views)
        else:
            self._buffers, self._buffer_copies = tensors, _copy(tensors)
        self._params, self._param_copies = params, _copy([p.detach() for p in params])
        self._optimizer = self._opt_state = self._method = self._method_vars = None
        if method is not None:
            opt = method.optimizer
            self._optimizer = opt
            self._opt_state = {p: {k: v.clone() if isinstance(v, Tensor) else copy.deepcopy(v) for k, v in st.items()}
                               for p, st in opt.state.items()}  # fmt: skip
            self._method = method
            self._method_vars = dict(vars(method))
        self._owner = owner
        self._owner_vars = {name: getattr(owner, name) for name in owner_attributes}

    def restore(self) -> None:
        """Back to the state at construction (parameters, buffers, optimiser, method and owner attributes)."""
        saved = self._buffer_copies
        if isinstance(saved, Tensor):
            saved = list(saved.split([t.numel() for t in self._buffers]))
        _restore(self._buffers, saved)
        _restore([p.detach() for p in self._params], self._param_copies)
        for p in self._params:
            p.grad = None
        if self._optimizer is not None:
            self._optimizer.state.clear()
            self._optimizer.state.update(self._opt_state)
            vars(self._method).clear()
            vars(self._method).update(self._method_vars)
        for name, value in self._owner_vars.items():
            setattr(self._owner, name, value)
