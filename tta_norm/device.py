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
