"""The one conversion from the readers' uint8 NHWC images to model input."""

from __future__ import annotations

import torch


def to_float_nchw(images: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> contiguous float32 NCHW in [0, 1] (on the tensor's device). Contiguous matters: a plain
    ``permute`` keeps channels-last strides, CPU convolutions of small CIFAR networks are then ~10x slower, and
    some libraries (pyautoattack 0.2) ``.view()`` such tensors and fail."""
    return images.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)
