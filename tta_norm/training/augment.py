"""CIFAR-style training augmentation on whole batches: random crop of the padded image, horizontal flip, cutout.

Every function draws from an explicit CPU ``torch.Generator`` (same generator state -> same batch) and works on
the tensor's own device, with no per-sample Python work. Images are uint8 (or float) batches in NHWC layout, as
decoded by :func:`tta_norm.data.read_image_folder`; ``layout="NCHW"`` takes float model inputs instead.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Layout = Literal["NHWC", "NCHW"]


def augment_batch(
    images: torch.Tensor,
    generator: torch.Generator,
    pad: int = 4,
    pad_mode: str = "zeros",
    layout: Layout = "NHWC",
) -> torch.Tensor:
    """Random crop of the padded image + random horizontal flip, for a whole batch at once.

    Each sample gets its own offset uniform in {0..2*pad}^2 of the (H + 2 pad) x (W + 2 pad) padded image and a
    flip with probability 1/2 (torchvision ``RandomCrop(H, padding=pad)`` + ``RandomHorizontalFlip`` applied per
    sample). ``pad_mode``: ``"zeros"`` (torchvision's default fill 0) or ``"reflect"`` (mirror without repeating
    the edge pixel, torchvision's ``padding_mode="reflect"``; needs ``pad < H, W``). ``layout``: ``"NHWC"``
    (decoded images) or ``"NCHW"`` (model inputs). ``generator`` lives on the CPU; the result is on
    ``images.device``. Draw order: row offsets, column offsets, flips (``n`` values each)."""
    if pad_mode not in ("zeros", "reflect"):
        raise ValueError(f"pad_mode must be 'zeros' or 'reflect', got {pad_mode!r}")
    if layout not in ("NHWC", "NCHW"):
        raise ValueError(f"layout must be 'NHWC' or 'NCHW', got {layout!r}")
    if layout == "NCHW":
        return augment_batch(images.permute(0, 2, 3, 1), generator, pad, pad_mode).permute(0, 3, 1, 2)
    n, h, w, _ = images.shape
    dev = images.device
    if pad > 0:
        oy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(dev)
        ox = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(dev)
        if pad_mode == "zeros":
            source = F.pad(images, (0, 0, pad, pad, pad, pad))
            rows = oy[:, None] + torch.arange(h, device=dev)  # n, h (in padded coordinates)
            cols = ox[:, None] + torch.arange(w, device=dev)
        else:
            if pad >= min(h, w):
                raise ValueError(f"reflect padding needs pad < image size, got pad={pad} for {h}x{w}")
            source = images
            rows = _reflect_index(oy[:, None] - pad + torch.arange(h, device=dev), h)
            cols = _reflect_index(ox[:, None] - pad + torch.arange(w, device=dev), w)
        images = source[torch.arange(n, device=dev)[:, None, None], rows[:, :, None], cols[:, None, :]]
    flip = (torch.rand(n, generator=generator) < 0.5).to(dev)
    return torch.where(flip[:, None, None, None], images.flip(2), images)


def _reflect_index(i: torch.Tensor, size: int) -> torch.Tensor:
    """Map coordinates in [-size+1, 2 size-2] into [0, size) by mirroring at the edges (edge not repeated)."""
    i = i.abs()
    return torch.where(i > size - 1, 2 * (size - 1) - i, i)


CUTOUT_FILL = (124, 116, 104)  # ImageNet mean in uint8: zero after the model's input normalization


def cutout_batch(
    images: torch.Tensor, generator: torch.Generator, size: int, fill: tuple[int, ...] = CUTOUT_FILL
) -> torch.Tensor:
    """Cutout (DeVries & Taylor 2017) on a uint8 NHWC batch: per sample a ``size`` x ``size`` square centred
    at a uniformly drawn pixel (clipped at the borders, so it may be partly outside) is set to ``fill``."""
    n, h, w, c = images.shape
    dev = images.device
    cy = torch.randint(0, h, (n,), generator=generator).to(dev)
    cx = torch.randint(0, w, (n,), generator=generator).to(dev)
    ys = torch.arange(h, device=dev)[None, :]
    xs = torch.arange(w, device=dev)[None, :]
    in_y = (ys >= (cy - size // 2)[:, None]) & (ys < (cy - size // 2 + size)[:, None])  # n, h
    in_x = (xs >= (cx - size // 2)[:, None]) & (xs < (cx - size // 2 + size)[:, None])  # n, w
    mask = (in_y[:, :, None] & in_x[:, None, :])[..., None]  # n, h, w, 1
    value = torch.tensor(fill[:c], dtype=images.dtype, device=dev).view(1, 1, 1, c)
    return torch.where(mask, value, images)
