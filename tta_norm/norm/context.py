"""Per-call options of adaptive norm layers, carried by the calling thread instead of flags on shared layers.

A forward pass of :class:`~tta_norm.norm.AdaptiveNorm` reads ``update_state`` (commit the EMA update),
``use_batch`` (look at the batch at all), ``domain`` (SaBN head) and ``samples`` (test samples in the batch, for
pseudo-count mixing; the layer's row count when unset).  The first three default to the layer's own attributes
of the same names.  :func:`layer_options` overrides them for a set of layers **in the calling
thread only** and for the duration of a ``with`` block: frames nest (the innermost wins per option), are
restored on exit even on an exception, and are invisible to other threads, so two threads running the same
model with different options never see each other's settings.  ``keep_state``, ``without_batch`` and
``with_domain`` (:mod:`tta_norm.norm.convert`) and the wrapper :class:`tta_norm.api.TTAModel` are built on it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator
from typing import Any

from torch import Tensor, nn

#: "this frame does not set this option" (the enclosing frame, or the layer's attribute, decides)
UNSET: Any = type("Unset", (), {"__repr__": lambda self: "UNSET", "__slots__": ()})()


class LayerOptions:
    """One frame's options for the layers it covers; a field left :data:`UNSET` defers to the enclosing one."""

    __slots__ = ("update_state", "use_batch", "domain", "samples")

    def __init__(
        self, update_state: Any = UNSET, use_batch: Any = UNSET, domain: Any = UNSET, samples: Any = UNSET
    ) -> None:
        self.update_state = update_state
        self.use_batch = use_batch
        self.domain = domain
        self.samples = samples

    def over(self, parent: LayerOptions | None) -> LayerOptions:
        """These options on top of ``parent``'s (``self`` where set, else ``parent``)."""
        if parent is None:
            return self
        return LayerOptions(
            parent.update_state if self.update_state is UNSET else self.update_state,
            parent.use_batch if self.use_batch is UNSET else self.use_batch,
            parent.domain if self.domain is UNSET else self.domain,
            parent.samples if self.samples is UNSET else self.samples,
        )

    def __repr__(self) -> str:
        return (f"LayerOptions(update_state={self.update_state}, use_batch={self.use_batch}, domain={self.domain}, "
                f"samples={self.samples})")  # fmt: skip


class _ThreadOptions(threading.local):
    def __init__(self) -> None:
        self.frames: dict[nn.Module, LayerOptions] = {}


_local = _ThreadOptions()


def frames() -> dict[nn.Module, LayerOptions]:
    """The calling thread's ``{layer: options}`` (read-only by convention; replaced, never mutated)."""
    return _local.frames


def effective(layer: nn.Module, name: str) -> Any:
    """The value of option ``name`` for ``layer`` in the calling thread (frame, else the layer's attribute)."""
    frame = _local.frames.get(layer)
    value = UNSET if frame is None else getattr(frame, name)
    return layer.__dict__[f"_{name}_default"] if value is UNSET else value


@contextlib.contextmanager
def layer_options(
    layers: Iterable[nn.Module],
    *,
    update_state: bool | Any = UNSET,
    use_batch: bool | Any = UNSET,
    domain: int | Tensor | None | Any = UNSET,
    samples: int | Any = UNSET,
) -> Iterator[None]:
    """Within the block and in this thread only, the given options for ``layers`` (others unchanged).

    ``samples``: the number of test samples (images) in the batch, for pseudo-count mixing (the ``prior``
    preset), where a layer's rows are not images (a BatchNorm1d over the flattened tokens of a LeViT)."""
    frame = LayerOptions(update_state, use_batch, domain, samples)
    old = _local.frames
    if not old:
        new = dict.fromkeys(layers, frame)
    else:
        new = dict(old)
        merged: dict[int, LayerOptions] = {}
        for layer in layers:
            parent = old.get(layer)
            key = id(parent)
            opts = merged.get(key)
            if opts is None:
                opts = merged[key] = frame.over(parent)
            new[layer] = opts
    _local.frames = new
    try:
        yield
    finally:
        _local.frames = old
