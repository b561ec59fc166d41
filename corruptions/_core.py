"""Dispatch, input validation, deterministic seeding and parallel execution of the corruptions."""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _blur, _digital, _noise, _weather
from ._names import ALL_CORRUPTIONS, PRESETS
from ._params import NOMINAL_SIZE, param, zoom_factors

# Smallest image side accepted by every corruption (kernels, affine control points, crops).
MIN_SIZE = 8


@dataclass(frozen=True)
class _Spec:
    fn: Callable[..., np.ndarray]
    needs_preset: bool = False


_SPECS: dict[str, _Spec] = {
    "gaussian_noise": _Spec(_noise.gaussian_noise),
    "shot_noise": _Spec(_noise.shot_noise),
    "impulse_noise": _Spec(_noise.impulse_noise),
    "speckle_noise": _Spec(_noise.speckle_noise),
    "defocus_blur": _Spec(_blur.defocus_blur),
    "glass_blur": _Spec(_blur.glass_blur),
    "motion_blur": _Spec(_blur.motion_blur),
    "zoom_blur": _Spec(_blur.zoom_blur),
    "gaussian_blur": _Spec(_blur.gaussian_blur),
    "snow": _Spec(_weather.snow),
    "frost": _Spec(_weather.frost, needs_preset=True),
    "fog": _Spec(_weather.fog, needs_preset=True),
    "spatter": _Spec(_weather.spatter),
    "brightness": _Spec(_digital.brightness),
    "contrast": _Spec(_digital.contrast),
    "saturate": _Spec(_digital.saturate),
    "elastic_transform": _Spec(_digital.elastic_transform),
    "pixelate": _Spec(_digital.pixelate),
    "jpeg_compression": _Spec(_digital.jpeg_compression),
}
assert set(_SPECS) == set(ALL_CORRUPTIONS)


def severity_param(name: str, severity: int, preset: str) -> Any:
    """The original's parameter for ``name`` at ``severity`` (zoom factors as the float ``arange``)."""
    if name == "zoom_blur":
        return zoom_factors(preset, severity)
    return param(name, preset, severity)


# --------------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------------


def check_name(name: str) -> str:
    if not isinstance(name, str) or name not in _SPECS:
        raise ValueError(f"unknown corruption {name!r}; expected one of: {', '.join(ALL_CORRUPTIONS)}")
    return name


def check_severity(severity: int) -> int:
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)):
        raise TypeError(f"severity must be an int in 1..5, got {type(severity).__name__}")
    if not 1 <= int(severity) <= 5:
        raise ValueError(f"severity must be in 1..5, got {severity}")
    return int(severity)


def check_preset(preset: str) -> str:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of: {', '.join(PRESETS)}")
    return preset


def check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be a non-negative int, got {type(seed).__name__}")
    if int(seed) < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed}")
    return int(seed)


def check_workers(workers: int | None) -> int:
    if workers is None:
        return default_workers()
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
        raise ValueError(f"workers must be a positive int or None, got {workers!r}")
    return int(workers)


def default_workers() -> int:
    """Worker threads used when none are given: the CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def check_size(name: str, severity: int, preset: str, h: int, w: int) -> None:
    """Raise ``ValueError`` if ``(h, w)`` images are too small (or too large) for this corruption."""
    if min(h, w) < MIN_SIZE:
        raise ValueError(f"{name}: images must be at least {MIN_SIZE}x{MIN_SIZE} pixels, got {h}x{w}")
    p = severity_param(name, severity, preset)
    if name == "defocus_blur":
        need = _blur.defocus_min_size(p)
        if min(h, w) < need:
            raise ValueError(
                f"defocus_blur severity {severity} ({preset}): needs images of at least {need} px"
            )
    elif name == "glass_blur":
        need = 2 * p[1] + 1
        if min(h, w) < need:
            raise ValueError(f"glass_blur severity {severity} ({preset}): needs images of at least {need} px")
    elif name == "pixelate":
        if int(w * p) < 1 or int(h * p) < 1:
            raise ValueError(f"pixelate severity {severity}: {h}x{w} images shrink to nothing")
    elif name == "frost":
        max_h, max_w = _weather.frost_max_size(preset)
        if h > max_h or w > max_w:
            raise ValueError(
                f"frost ({preset} preset): images must be at most {max_h}x{max_w} pixels to fit in the "
                f"frost textures, got {h}x{w}"
                + ("; use preset='imagenet' for larger images" if preset != "imagenet" else "; crop them first")
            )


def as_uint8_batch(images: Any) -> tuple[np.ndarray, Callable[[np.ndarray], Any]]:
    """Validate ``images`` and return ``(N, H, W, 3)`` uint8 numpy data plus a function that converts a
    result back to the caller's type (numpy or torch, same device) and rank (batch or single image).

    Only uint8 is accepted: float images are rejected rather than guessed (is it [0, 1] or [0, 255]?).
    Convert with ``(x * 255).round().clip(0, 255).astype(np.uint8)`` for [0, 1] floats.
    """
    is_torch = False
    device = None
    if isinstance(images, np.ndarray):
        arr = images
    else:
        try:
            import torch
        except ImportError:  # pragma: no cover
            torch = None
        if torch is not None and isinstance(images, torch.Tensor):
            is_torch = True
            device = images.device
            if images.dtype != torch.uint8:
                raise TypeError(
                    f"images must be uint8 with values 0..255, got torch.{str(images.dtype).split('.')[-1]}; "
                    "convert [0, 1] floats with (x * 255).round().clamp(0, 255).to(torch.uint8) and use "
                    "channels-last layout (N, H, W, 3)"
                )
            arr = images.detach().cpu().numpy()
        else:
            raise TypeError(f"images must be a numpy array or torch tensor, got {type(images).__name__}")
    if arr.dtype != np.uint8:
        raise TypeError(
            f"images must be uint8 with values 0..255, got dtype {arr.dtype}; convert [0, 1] floats with "
            "(x * 255).round().clip(0, 255).astype(np.uint8)"
        )
    single = arr.ndim == 3
    if arr.ndim not in (3, 4):
        raise ValueError(f"images must have shape (N, H, W, 3) or (H, W, 3), got {tuple(arr.shape)}")
    if arr.shape[-1] != 3:
        hint = " (channels-first? use (N, H, W, 3))" if arr.ndim == 4 and arr.shape[1] == 3 else ""
        raise ValueError(f"images must have 3 channels in the last axis, got shape {tuple(arr.shape)}{hint}")
    batch = np.ascontiguousarray(arr[None] if single else arr)

    def restore(out: np.ndarray) -> Any:
        res = out[0] if single else out
        if is_torch:
            import torch

            return torch.from_numpy(np.ascontiguousarray(res)).to(device)
        return res

    return batch, restore


# --------------------------------------------------------------------------------------------------------
# seeding and execution
# --------------------------------------------------------------------------------------------------------


def block_size(h: int, w: int) -> int:
    """Images per random stream (and per task): 256 CIFAR images, 5 ImageNet crops."""
    return max(1, (1 << 18) // (h * w))


def block_rng(seed: int, name: str, severity: int, preset: str, block: int) -> np.random.Generator:
    """Independent PCG64 stream of one block of images, keyed by everything that defines the draw."""
    key = (zlib.crc32(name.encode()), severity, PRESETS.index(preset), block)
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=key)))


def run_corruption(
    x: np.ndarray,
    name: str,
    severity: int,
    seed: int,
    preset: str,
    workers: int,
    start: int = 0,
) -> np.ndarray:
    """Corrupt validated uint8 ``(N, H, W, 3)`` images; ``start`` is the index of ``x[0]`` in a larger set.

    The images are cut into blocks of :func:`block_size` at absolute indices (``start`` must be a multiple
    of the block size); block ``b`` draws from :func:`block_rng` ``(seed, name, severity, preset, b)``, so
    results do not depend on ``workers`` and a large set can be processed in block-aligned chunks.
    """
    n, h, w, _ = x.shape
    spec = _SPECS[name]
    p = severity_param(name, severity, preset)
    bs = block_size(h, w)
    if start % bs:
        raise ValueError(f"start must be a multiple of the block size {bs}, got {start}")
    out = np.empty_like(x)
    if n == 0:
        return out

    def task(i0: int) -> None:
        rng = block_rng(seed, name, severity, preset, (start + i0) // bs)
        xb = x[i0 : i0 + bs]
        res = spec.fn(xb, p, rng, preset) if spec.needs_preset else spec.fn(xb, p, rng)
        out[i0 : i0 + bs] = res

    starts = list(range(0, n, bs))
    if workers <= 1 or len(starts) == 1:
        for i0 in starts:
            task(i0)
    else:
        with ThreadPoolExecutor(max_workers=min(workers, len(starts))) as pool:
            for f in [pool.submit(task, i0) for i0 in starts]:
                f.result()
    return out


def corrupt(
    images: Any,
    name: str,
    severity: int = 1,
    seed: int = 0,
    preset: str = "cifar",
    *,
    workers: int | None = None,
    start: int = 0,
) -> Any:
    """Apply corruption ``name`` at ``severity`` (1..5) to uint8 RGB images, as the original generator does.

    Parameters
    ----------
    images:
        uint8 ``(N, H, W, 3)`` (or a single ``(H, W, 3)``) numpy array or torch tensor, RGB, channels last.
        Float input is rejected (no guessing of the value range).
    name:
        One of :data:`CORRUPTIONS` (the 15 benchmark corruptions) or :data:`EXTRA_CORRUPTIONS`.
    severity:
        1..5.
    seed:
        Non-negative int. All randomness comes from NumPy ``Generator`` streams derived from
        ``(seed, name, severity, preset, block)`` where blocks are consecutive runs of images (256 at 32x32,
        see :func:`block_size`): the same call gives the same bytes whatever ``workers`` is, and no global
        random state (``np.random``, ``random``, torch) is read or changed.
    preset:
        ``"cifar"`` (CIFAR-10-C parameters, ``make_cifar_c.py``) or ``"imagenet"`` (ImageNet-C parameters,
        ``make_imagenet_c.py``). Parameters are in pixels; images of other sizes are processed with the same
        parameters.
    workers:
        Threads used across blocks of images (default: available CPUs). Results do not depend on it.
    start:
        Index of ``images[0]`` in the whole set, a multiple of :func:`block_size`: a set corrupted in chunks
        that start at such indices, each with its ``start``, gets the bytes of one call on the whole set.
        Chunks that all pass ``start=0`` with one seed draw the same noise again.

    Returns
    -------
    uint8 images of the same shape, type (numpy/torch) and device.

    Reference: D. Hendrycks and T. Dietterich, "Benchmarking Neural Network Robustness to Common
    Corruptions and Perturbations", ICLR 2019.
    """
    check_name(name)
    severity = check_severity(severity)
    preset = check_preset(preset)
    seed = check_seed(seed)
    nworkers = check_workers(workers)
    batch, restore = as_uint8_batch(images)
    _, h, w, _ = batch.shape
    check_size(name, severity, preset, h, w)
    if not isinstance(start, (int, np.integer)) or isinstance(start, bool) or start < 0:
        raise ValueError(f"start must be a non-negative int, got {start!r}")
    return restore(run_corruption(batch, name, severity, seed, preset, nworkers, int(start)))


def nominal_size(preset: str) -> int:
    """The image side the preset's parameters were designed for (32 or 224)."""
    return NOMINAL_SIZE[check_preset(preset)]
