"""Where computation runs: one rule for every entry point that takes a ``device`` argument."""

from __future__ import annotations

import torch
from torch import nn


def resolve_device(device: torch.device | str | None = None, model: nn.Module | None = None) -> torch.device:
    """The device to run on.

    ``device`` wins when given (``"auto"`` means CUDA when available, else CPU); otherwise the device of
    ``model``'s first parameter or buffer; otherwise ``"auto"``. An unknown device name raises ``ValueError``."""
    if device is not None and str(device) != "auto":
        try:
            return torch.device(device)
        except RuntimeError as err:
            raise ValueError(f"unknown device {device!r}: use 'cpu', 'cuda', 'cuda:<index>', 'mps' or 'auto'") from err
    if model is not None and device is None:
        for t in (*model.parameters(), *model.buffers()):
            return t.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def available_device(device: torch.device | str) -> torch.device:
    """``device`` as a ``torch.device`` that exists on this machine: an unknown name, or a CUDA / MPS device
    that is not there, is a ``ValueError`` saying so (``"auto"`` picks CUDA when available, else CPU)."""
    dev = resolve_device(device)
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"device {str(device)!r} requested but this machine has {torch.cuda.device_count()} CUDA "
                         "device(s); use 'cpu' or 'auto'")  # fmt: skip
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("device 'mps' requested but MPS is not available; use 'cpu' or 'auto'")
    return dev



def input_dtype(model: nn.Module, given: torch.dtype) -> torch.dtype | None:
    """The dtype an input of dtype ``given`` is fed to ``model`` in: ``given`` itself when some floating
    parameter of the model has it (mixed-precision networks keep working as they are), else the most common
    floating parameter dtype (float64 images on a float32 model); ``None`` (no cast) for a model without any."""
    counts: dict[torch.dtype, int] = {}
    for t in model.parameters():
        if t.is_floating_point():
            if t.dtype == given:
                return given
            counts[t.dtype] = counts.get(t.dtype, 0) + 1
    return max(counts, key=counts.__getitem__) if counts else None
