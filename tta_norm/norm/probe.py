"""Look at what every adaptive norm layer of a model receives, without changing what it computes."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from torch import Tensor, nn

from tta_norm.norm.adaptive import adaptive_layers

T = TypeVar("T")


@contextlib.contextmanager
def record_inputs(model: nn.Module, transform: Callable[[Tensor], T]) -> Iterator[dict[str, T]]:
    """Within the block, every forward of ``model`` stores ``transform(input)`` of each adaptive norm layer in
    the yielded dict ``{layer name: value}`` (a later forward overwrites it). The hooks are removed on exit.

    >>> with record_inputs(model, lambda x: x.detach()) as inputs:  # doctest: +SKIP
    ...     model(x)
    """
    found: dict[str, T] = {}
    handles = []
    for name, layer in adaptive_layers(model):

        def hook(_layer: nn.Module, args: tuple[Any, ...], _name: str = name) -> None:
            found[_name] = transform(args[0])

        handles.append(layer.register_forward_pre_hook(hook))
    try:
        yield found
    finally:
        for h in handles:
            h.remove()
