"""Blur corruptions: defocus, glass, motion, zoom, gaussian (Hendrycks & Dietterich, ICLR 2019)."""

from __future__ import annotations

import functools

import numpy as np

from . import _ops
from ._common import finish_unit, require_cv2

# --------------------------------------------------------------------------------------------------------
# defocus_blur
# --------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    """The original ``disk()``: a normalized float32 disk on ``arange(-8, 9)`` (or ``arange(-r, r+1)`` for
    ``r > 8``), anti-aliased by ``cv2.GaussianBlur`` with a 3x3 (or 5x5) window and ``sigmaX=alias_blur``."""
    cv2 = require_cv2()

    if radius <= 8:
        coords = np.arange(-8, 8 + 1)
        ksize = (3, 3)
    else:
        coords = np.arange(-radius, radius + 1)
        ksize = (5, 5)
    xx, yy = np.meshgrid(coords, coords)
    aliased = np.array((xx**2 + yy**2) <= radius**2, dtype=np.float32)
    aliased /= np.sum(aliased)
    return cv2.GaussianBlur(aliased, ksize=ksize, sigmaX=alias_blur)


def correlate_reflect101(xf: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """``cv2.filter2D(channel, -1, kernel)`` (correlation, centred anchor, BORDER_REFLECT_101) for every
    channel of float64 ``(N, H, W, C)`` images, as shifted sums in float64.

    Taps below ``1e-15`` of the largest weight are skipped: their contributions (CIFAR severity 5 has 16
    taps of ~2e-22) vanish below the float64 resolution of the sum, so the result does not change.
    """
    kh, kw = kernel.shape
    cy, cx = kh // 2, kw // 2
    taps = np.argwhere(np.abs(kernel) > 1e-15 * np.abs(kernel).max())
    ry = int(np.abs(taps[:, 0] - cy).max())
    rx = int(np.abs(taps[:, 1] - cx).max())
    _, h, w, _ = xf.shape
    xp = np.pad(xf, ((0, 0), (ry, ry), (rx, rx), (0, 0)), mode="reflect")
    acc = np.zeros_like(xf)
    for i, j in taps:
        oy = i - cy + ry
        ox = j - cx + rx
        acc += float(kernel[i, j]) * xp[:, oy : oy + h, ox : ox + w, :]
    return acc


_DIRECT_TAPS = 32  # up to this many non-zero taps, shifted sums beat OpenCV's per-image DFT filtering


def defocus_blur(x: np.ndarray, c: tuple, rng: np.random.Generator) -> np.ndarray:
    """Correlation of ``x / 255`` with the anti-aliased disk of radius ``c[0]`` (alias sigma ``c[1]``).

    Small kernels (all CIFAR severities) use batched shifted sums in float64; large ImageNet disks call
    ``cv2.filter2D`` per image and channel, exactly as the original does.
    """
    cv2 = require_cv2()

    kernel = disk_kernel(*c)
    xf = x / 255.0
    if np.count_nonzero(kernel) <= _DIRECT_TAPS:
        return finish_unit(correlate_reflect101(xf, kernel))
    out = np.empty_like(xf)
    for i in range(xf.shape[0]):
        for ch in range(xf.shape[3]):
            out[i, :, :, ch] = cv2.filter2D(np.ascontiguousarray(xf[i, :, :, ch]), -1, kernel)
    return finish_unit(out)


def defocus_min_size(c: tuple) -> int:
    """Smallest image side for which the disk kernel's reflect-101 border is defined once."""
    k = disk_kernel(*c)
    taps = np.argwhere(np.abs(k) > 1e-15 * np.abs(k).max())
    return int(np.abs(taps - np.array(k.shape) // 2).max()) + 1


# --------------------------------------------------------------------------------------------------------
# glass_blur
# --------------------------------------------------------------------------------------------------------


def glass_shuffle(y: np.ndarray, dx: np.ndarray, dy: np.ndarray, delta: int) -> np.ndarray:
    """One pass of the original's pixel "swap" loop on uint8 images ``(N, H, W, C)``.

    The original walks ``h`` from ``H - delta`` down to ``delta + 1`` and, inside, ``w`` the same way over
    ``W``, and executes ``x[h, w], x[h', w'] = x[h', w'], x[h, w]`` with ``(h', w') = (h + dy, w + dx)``.
    On NumPy views this copies ``x[h', w']`` into ``x[h, w]`` and does nothing else. ``dx``/``dy`` are the
    offsets for the visited pixels, ``(N, H - 2*delta, W - 2*delta)`` in ascending ``(h, w)`` order.

    Every pixel is written once; it receives the value its source holds at that moment, which is the
    source's new value if the source was visited earlier (later rows, or the same row further right) and
    its old value otherwise. For ``delta = 1`` the offsets are in {-1, 0}, sources are never visited
    earlier, and the pass is a single gather. Larger ``delta`` (ImageNet) resolves the chains of earlier
    visits by pointer doubling.
    """
    n, h, w, c = y.shape
    rows = np.arange(delta + 1, h - delta + 1)
    cols = np.arange(delta + 1, w - delta + 1)
    if rows.size == 0 or cols.size == 0:
        return y.copy()
    y = np.ascontiguousarray(y)
    pixels = y.view(np.dtype((np.void, c * y.itemsize))).reshape(n * h * w)  # one item per pixel
    region = (rows[:, None] * w + cols[None, :]).ravel()
    src = (region[None, :] + (dy * w + dx).reshape(n, -1)).astype(np.intp)  # source within each image
    if delta > 1:
        src_r = rows[None, :, None] + dy
        src_c = cols[None, None, :] + dx
        in_region = (src_r >= delta + 1) & (src_r <= h - delta) & (src_c >= delta + 1) & (src_c <= w - delta)
        earlier = in_region & (
            (src_r > rows[None, :, None]) | ((src_r == rows[None, :, None]) & (src_c > cols[None, None, :]))
        )
        ident = np.broadcast_to(np.arange(h * w), (n, h * w))
        nxt = ident.copy()  # pixel whose *new* value a pixel takes (itself: it reads an old value)
        nxt[:, region] = np.where(earlier.reshape(n, -1), src, region[None, :])
        while True:
            jumped = np.take_along_axis(nxt, nxt, axis=1)
            if np.array_equal(jumped, nxt):
                break
            nxt = jumped
        srcmap = ident.copy()
        srcmap[:, region] = src
        src = np.take_along_axis(srcmap, nxt[:, region], axis=1)
    src += (np.arange(n, dtype=np.intp) * (h * w))[:, None]
    out = y.copy()
    out[:, delta + 1 : h - delta + 1, delta + 1 : w - delta + 1] = (
        pixels[src.ravel()].view(y.dtype).reshape(n, rows.size, cols.size, c)
    )
    return out


def glass_blur(x: np.ndarray, c: tuple, rng: np.random.Generator) -> np.ndarray:
    """Gaussian (sigma ``c[0]``) -> uint8 -> ``c[2]`` shuffle passes with offsets in ``[-c[1], c[1])`` ->
    Gaussian again. At CIFAR severity 1 (sigma 0.05) the Gaussian's radius is 0: no blur at all."""
    sigma, delta, iterations = c
    n, h, w, _ = x.shape
    y = (_ops.gaussian_filter(x / 255.0, sigma) * 255).astype(np.uint8)
    shape = (n, h - 2 * delta, w - 2 * delta)
    for _ in range(iterations):
        d = rng.integers(-delta, delta, size=shape + (2,))
        y = glass_shuffle(y, d[..., 0], d[..., 1], delta)
    return finish_unit(_ops.gaussian_filter(y / 255.0, sigma))


# --------------------------------------------------------------------------------------------------------
# motion_blur, zoom_blur, gaussian_blur
# --------------------------------------------------------------------------------------------------------


def motion_blur(x: np.ndarray, c: tuple, rng: np.random.Generator) -> np.ndarray:
    """ImageMagick motion blur (radius ``c[0]``, sigma ``c[1]``) at an angle ~ U(-45, 45) per image."""
    angles = rng.uniform(-45, 45, size=x.shape[0])
    return _ops.motion_blur(x, c[0], c[1], angles)


def zoom_blur(x: np.ndarray, factors: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``(x + sum_z clipped_zoom(x, z)) / (len(factors) + 1)`` in float32, like the original.

    Fast path: the sum over zoom factors is one sparse linear operator shared by the whole batch, evaluated
    in float64 and rounded to float32 once. The original instead rounds every zoom to float32 and adds them
    one by one in float32, which decides the final truncation whenever ``255 * y`` lands within float32
    noise of an integer (flat regions do). Those pixels are recomputed exactly the original's way
    (SciPy's interpolation arithmetic per factor, sequential float32 sums), so the result is bit-identical.
    """
    n, h, w, c = x.shape
    facs = tuple(float(z) for z in factors)
    op = _ops.zoom_sum_operator(h, w, facs)
    x32 = (x / 255.0).astype(np.float32)
    cols = x32.transpose(1, 2, 0, 3).reshape(h * w, n * c).astype(np.float64)
    zsum = (op @ cols).reshape(h, w, n, c).transpose(2, 0, 1, 3).astype(np.float32)
    y = (x32 + zsum) / (len(facs) + 1)
    np.clip(y, 0, 1, out=y)
    y *= 255
    frac = y - np.floor(y)
    near = np.nonzero((frac < 2e-3) | (frac > 1 - 2e-3))  # the fast path's error is < 1e-3 grey levels
    if near[0].size:
        y[near] = _zoom_blur_exact(x32, facs, *near)
    return y.astype(np.uint8)


def _zoom_blur_exact(x32: np.ndarray, factors: tuple[float, ...], ni, yi, xi, ci) -> np.ndarray:
    """The original's float32 zoom-blur value ``clip(y, 0, 1) * 255`` at the given pixels."""
    _, h, w, _ = x32.shape
    acc = np.zeros(ni.size, dtype=np.float32)
    cache: dict[tuple[int, int, int, int], np.ndarray] = {}
    for z in factors:
        key = (*_ops.zoom_shape(h, z), *_ops.zoom_shape(w, z))
        zoomed = cache.get(key)
        if zoomed is None:  # factors with the same crop and output sizes give the same zoom
            ry0, ry1, wy0, wy1 = (a[yi] for a in _ops.zoom_axis(h, z))
            rx0, rx1, wx0, wx1 = (a[xi] for a in _ops.zoom_axis(w, z))

            def tap(r: np.ndarray, q: np.ndarray) -> np.ndarray:
                return x32[ni, r, q, ci].astype(np.float64)

            zoomed = (tap(ry0, rx0) * wy0) * wx0
            zoomed += (tap(ry0, rx1) * wy0) * wx1
            zoomed += (tap(ry1, rx0) * wy1) * wx0
            zoomed += (tap(ry1, rx1) * wy1) * wx1
            zoomed = zoomed.astype(np.float32)
            cache[key] = zoomed
        acc += zoomed
    out = (x32[ni, yi, xi, ci] + acc) / (len(factors) + 1)
    np.clip(out, 0, 1, out=out)
    out *= 255
    return out


def gaussian_blur(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    """skimage ``gaussian(x / 255, sigma=c, channel_axis=-1)`` (mode 'nearest', truncate 4)."""
    return finish_unit(_ops.gaussian_filter(x / 255.0, c))
