"""Shift-simulating augmentations for post-training on source data (TTN's prior and fit, SaBN's domains).

They stand in for an unknown test-time domain shift **without using any corruption of the test benchmark**
(no code, parameters or images of ``corruptions`` / CIFAR-10-C).  Three families, torchvision-like but
vectorized over a whole float NCHW batch in [0, 1]:

* ``"color"``: colour jitter -- brightness factor, contrast factor (around the per-image grey mean) and
  saturation factor (around the per-pixel grey value), as ``torchvision.transforms.ColorJitter``;
* ``"blur"``: Gaussian blur with a separable kernel of width ``2 * ceil(2 sigma) + 1`` and reflect padding, as
  ``torchvision.transforms.GaussianBlur``;
* ``"noise"``: additive i.i.d. Gaussian pixel noise, clipped to [0, 1].

Honest caveat: the benchmark also contains a Gaussian-noise corruption and blur corruptions (defocus, glass,
motion, zoom).  The *families* overlap; the implementation and magnitudes here are our own (noise std
0.02-0.08, against 0.08-0.10 at CIFAR-10-C severities 4-5), and :data:`SHIFT_OPS` can be narrowed to
``("color",)`` to avoid any overlap.

**A domain is one op with one magnitude for a whole batch** (:meth:`ShiftAugment.sample_domain`): test batches
come from one domain at a time, so their batch statistics should too.  Random numbers come from an explicit
CPU ``torch.Generator``; results are on the input's device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

SHIFT_OPS: tuple[str, ...] = ("color", "blur", "noise")
_GREY = (0.299, 0.587, 0.114)  # ITU-R 601 luma weights, as torchvision's rgb_to_grayscale


def _grey(x: Tensor) -> Tensor:
    w = torch.tensor(_GREY, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def color_jitter(x: Tensor, brightness: float, contrast: float, saturation: float) -> Tensor:
    """Brightness, then contrast (blend with the image's mean grey value), then saturation (blend with the
    per-pixel grey image); each factor 1 is the identity.  ``x``: float ``(N, 3, H, W)`` in [0, 1]."""
    if x.shape[1] != 3:
        raise ValueError(f"color_jitter expects RGB images (N, 3, H, W), got shape {tuple(x.shape)}")
    out = (x * brightness).clamp(0, 1)
    mean = _grey(out).mean(dim=(1, 2, 3), keepdim=True)
    out = (contrast * out + (1 - contrast) * mean).clamp(0, 1)
    out = (saturation * out + (1 - saturation) * _grey(out)).clamp(0, 1)
    return out


def gaussian_kernel1d(sigma: float, *, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """Normalised 1-D Gaussian kernel of width ``2 * ceil(2 sigma) + 1``."""
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    half = max(1, math.ceil(2 * sigma))
    t = torch.arange(-half, half + 1, dtype=dtype, device=device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of every channel with reflect padding (the kernel is cut to the image size)."""
    k = gaussian_kernel1d(sigma, dtype=x.dtype, device=x.device)
    half = min(k.numel() // 2, x.shape[-1] - 1, x.shape[-2] - 1)
    if half < 1:
        return x
    mid = k.numel() // 2
    k = k[mid - half : mid + half + 1]
    k = k / k.sum()
    c = x.shape[1]
    out = F.pad(x, (half, half, 0, 0), mode="reflect")
    out = F.conv2d(out, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    out = F.pad(out, (0, 0, half, half), mode="reflect")
    return F.conv2d(out, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def gaussian_noise(x: Tensor, std: float, generator: torch.Generator) -> Tensor:
    """``clip(x + std * N(0, 1), 0, 1)``; the noise is drawn on the CPU from ``generator``."""
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    return (x + std * noise).clamp(0, 1)


def _uniform(lo_hi: tuple[float, float], generator: torch.Generator) -> float:
    lo, hi = lo_hi
    return lo + (hi - lo) * float(torch.rand((), generator=generator))


@dataclass(frozen=True)
class ShiftAugment:
    """Random shift domains: one op of ``ops`` with magnitudes drawn uniformly from the given ranges.

    ``color`` draws brightness, contrast and saturation factors; ``blur`` a sigma in pixels; ``noise`` a
    standard deviation in [0, 1] pixel units.
    """

    ops: tuple[str, ...] = SHIFT_OPS
    brightness: tuple[float, float] = (0.6, 1.4)
    contrast: tuple[float, float] = (0.5, 1.5)
    saturation: tuple[float, float] = (0.3, 1.7)
    blur_sigma: tuple[float, float] = (0.6, 1.5)
    noise_std: tuple[float, float] = (0.02, 0.08)

    def __post_init__(self) -> None:
        bad = [op for op in self.ops if op not in SHIFT_OPS]
        if bad or not self.ops:
            raise ValueError(f"unknown or no shift op(s) {bad or self.ops}; choose from {SHIFT_OPS}")

    def apply(self, x: Tensor, op: str, generator: torch.Generator) -> Tensor:
        """Apply ``op`` (``"clean"`` or one of :data:`SHIFT_OPS`) with magnitudes drawn once for the batch."""
        if op == "clean":
            return x
        if op == "color":
            return color_jitter(
                x,
                _uniform(self.brightness, generator),
                _uniform(self.contrast, generator),
                _uniform(self.saturation, generator),
            )
        if op == "blur":
            return gaussian_blur(x, _uniform(self.blur_sigma, generator))
        if op == "noise":
            return gaussian_noise(x, _uniform(self.noise_std, generator), generator)
        raise ValueError(f"unknown shift op {op!r}; choose from {('clean',) + SHIFT_OPS}")

    def sample_domain(self, generator: torch.Generator, clean_prob: float = 0.0) -> str:
        """A random op name (``"clean"`` with probability ``clean_prob``)."""
        if clean_prob > 0 and float(torch.rand((), generator=generator)) < clean_prob:
            return "clean"
        return self.ops[int(torch.randint(len(self.ops), (), generator=generator))]

    def __call__(self, x: Tensor, generator: torch.Generator, clean_prob: float = 0.0) -> Tensor:
        """A randomly shifted copy of the batch: one sampled domain for all its images."""
        return self.apply(x, self.sample_domain(generator, clean_prob), generator)


def parse_ops(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"color,blur"`` -> ``("color", "blur")`` (validated)."""
    ops = tuple(s.strip() for s in (text.split(",") if isinstance(text, str) else text) if s.strip())
    ShiftAugment(ops=ops)
    return ops
