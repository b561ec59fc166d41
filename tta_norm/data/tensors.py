"""The one conversion from the readers' uint8 NHWC images to model input."""

from __future__ import annotations

import torch


def to_float_nchw(
    images: torch.Tensor, memory_format: torch.memory_format = torch.contiguous_format
) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW in [0, 1] (on the tensor's device), contiguous by default.  Contiguous matters:
    a plain ``permute`` keeps channels-last strides, CPU convolutions of a small CIFAR network in the default
    format are then ~10x slower, and some libraries (pyautoattack 0.2) ``.view()`` such tensors and fail.
    ``memory_format=torch.channels_last`` is for a model converted to channels-last (no copy of the layout).
    Any other dtype is a ``TypeError`` (float images were divided by 255 a second time)."""
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 NHWC images, got dtype {images.dtype} (floats are model input already)")
    return images.permute(0, 3, 1, 2).to(torch.float32, memory_format=memory_format).div_(255.0)
