"""Weather corruptions: snow, frost, fog, spatter (Hendrycks & Dietterich, ICLR 2019)."""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from . import _ops
from ._common import finish_255, finish_unit, require_cv2, wrap_to_uint8
from ._frost import frost_textures
from ._params import FOG_MAPSIZE, FROST_SCALE


def _rgb2gray_f32(x32: np.ndarray) -> np.ndarray:
    """``cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)`` of float32 ``(N, H, W, 3)`` images -> ``(N, H, W, 1)``."""
    cv2 = require_cv2()

    n, h, w, _ = x32.shape
    gray = cv2.cvtColor(np.ascontiguousarray(x32).reshape(n * h, w, 3), cv2.COLOR_RGB2GRAY)
    return gray.reshape(n, h, w, 1)


def snow(x: np.ndarray, c: tuple, rng: np.random.Generator) -> np.ndarray:
    """Snow layer N(loc, scale) -> clipped_zoom -> threshold -> 8-bit -> ImageMagick motion blur at an angle
    ~ U(-135, -45) -> blended onto the brightened image together with its 180-degree rotation."""
    loc, scale, zoom, thresh, mb_radius, mb_sigma, blend = c
    n = x.shape[0]
    x32 = x.astype(np.float32) / 255.0
    layer = rng.normal(loc, scale, size=x.shape[:3])
    layer = _ops.clipped_zoom_2d(layer, zoom)
    layer[layer < thresh] = 0
    layer_u8 = (np.clip(layer, 0, 1) * 255).astype(np.uint8)
    angles = rng.uniform(-135, -45, size=n)
    blurred = _ops.motion_blur(layer_u8[..., None], mb_radius, mb_sigma, angles) / 255.0
    x32 = blend * x32 + (1 - blend) * np.maximum(x32, _rgb2gray_f32(x32) * 1.5 + 0.5)
    out = x32 + blurred + np.rot90(blurred, k=2, axes=(1, 2))
    return finish_unit(out)


def frost(x: np.ndarray, c: tuple, rng: np.random.Generator, preset: str) -> np.ndarray:
    """``clip(c[0] * x + c[1] * crop, 0, 255)`` with a random crop of one of the first five frost textures
    (resized by 0.2 for CIFAR). Crop offsets are ``randint(0, side - size)``: the last offset never occurs."""
    textures = frost_textures(FROST_SCALE[preset])
    n, h, w, _ = x.shape
    heights = np.array([t.shape[0] for t in textures])
    widths = np.array([t.shape[1] for t in textures])
    idx = rng.integers(len(textures), size=n)
    top = rng.integers(0, heights[idx] - h)
    left = rng.integers(0, widths[idx] - w)
    crops = np.empty(x.shape, dtype=np.uint8)
    for t, tex in enumerate(textures):
        sel = np.nonzero(idx == t)[0]
        if sel.size:
            windows = sliding_window_view(tex, (h, w), axis=(0, 1))  # (.., .., 3, h, w)
            crops[sel] = windows[top[sel], left[sel]].transpose(0, 2, 3, 1)
    a, b = c
    return finish_255(a * x + b * crops)


def frost_max_size(preset: str) -> tuple[int, int]:
    """Largest (H, W) a frost crop can take: strictly smaller than every texture used."""
    textures = frost_textures(FROST_SCALE[preset])
    return min(t.shape[0] for t in textures) - 1, min(t.shape[1] for t in textures) - 1


def fog_mapsize(preset: str, h: int, w: int) -> int:
    """Plasma map side: the preset's (32 or 256), or the next power of two if the image is larger."""
    side = FOG_MAPSIZE[preset]
    while side < max(h, w):
        side *= 2
    return side


def fog(x: np.ndarray, c: tuple, rng: np.random.Generator, preset: str) -> np.ndarray:
    """``x += a * plasma``; ``clip(x * M / (M + a), 0, 1)`` with ``M`` the clean image's maximum."""
    amplitude, decay = c
    n, h, w, _ = x.shape
    xf = x / 255.0
    max_val = xf.max(axis=(1, 2, 3), keepdims=True)
    plasma = _ops.plasma_fractal(n, fog_mapsize(preset, h, w), decay, rng)[:, :h, :w, None]
    xf += amplitude * plasma
    return finish_unit(xf * max_val / (max_val + amplitude))


def _water_distance(liquid_u8: np.ndarray) -> np.ndarray:
    """The per-image OpenCV chain of the water mode (Canny, distance transform, ..., emboss, blur)."""
    cv2 = require_cv2()

    dist = 255 - cv2.Canny(liquid_u8, 50, 150)
    dist = cv2.distanceTransform(dist, cv2.DIST_L2, 5)
    _, dist = cv2.threshold(dist, 20, 20, cv2.THRESH_TRUNC)
    dist = cv2.blur(dist, (3, 3)).astype(np.uint8)
    dist = cv2.equalizeHist(dist)
    ker = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]], dtype=np.float64)
    dist = cv2.filter2D(dist, cv2.CV_8U, ker)
    return cv2.blur(dist, (3, 3)).astype(np.float32)


_WATER = np.array([175 / 255.0, 238 / 255.0, 238 / 255.0], dtype=np.float64).astype(np.float32)
_MUD = np.array([63 / 255.0, 42 / 255.0, 20 / 255.0], dtype=np.float64).astype(np.float32)


def spatter(x: np.ndarray, c: tuple, rng: np.random.Generator) -> np.ndarray:
    """Liquid layer N(loc, scale) smoothed and thresholded; mode 0 adds pale-turquoise water shaped by an
    embossed distance map, mode 1 covers the image with brown mud (float32 pipeline, as the original)."""
    loc, scale, sigma, thresh, strength, mode = c
    n, h, w, _ = x.shape
    x32 = x.astype(np.float32) / 255.0
    liquid = rng.normal(loc, scale, size=(n, h, w))
    liquid = _ops.gaussian_filter(liquid, sigma)
    liquid[liquid < thresh] = 0
    if mode == 0:
        liquid_u8 = wrap_to_uint8(liquid * 255)
        dist = np.stack([_water_distance(liquid_u8[i]) for i in range(n)])
        m = liquid_u8 * dist
        with np.errstate(invalid="ignore", divide="ignore"):
            m /= m.max(axis=(1, 2), keepdims=True)
        m *= strength
        out = x32 + m[..., None] * _WATER
        np.clip(out, 0, 1, out=out)
        out *= 255
        # a layer without liquid gives 0/0 = NaN above; the original's np.uint8(NaN) is 0 on x86
        return np.nan_to_num(out, nan=0.0).astype(np.uint8)
    m = np.where(liquid > thresh, 1, 0).astype(np.float32)
    m = _ops.gaussian_filter(m, strength)
    m[m < 0.8] = 0
    color = _MUD * m[..., None]
    x32 *= 1 - m[..., None]
    return finish_unit(x32 + color)
