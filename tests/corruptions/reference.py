"""Hand-written per-image references of the original generator's formulas (Hendrycks & Dietterich 2019).

Each function takes one uint8 ``(H, W, 3)`` image and follows the original step by step with the same
libraries (PIL, scikit-image, SciPy, OpenCV), one image at a time, with the library drift fixed the obvious
way (``channel_axis=-1`` for ``multichannel=True``). Random inputs (offsets, angles, crops, fields) are
parameters, so the batched implementation can be checked under a fixed draw.
"""

from __future__ import annotations

import io
import math

import cv2
import numpy as np
import scipy.ndimage as ndi
import skimage.color
import skimage.filters
from PIL import Image


def to_u8(y: np.ndarray) -> np.ndarray:
    return np.uint8(y)


def brightness(img: np.ndarray, c: float) -> np.ndarray:
    x = skimage.color.rgb2hsv(np.array(img) / 255.0)
    x[:, :, 2] = np.clip(x[:, :, 2] + c, 0, 1)
    return to_u8(np.clip(skimage.color.hsv2rgb(x), 0, 1) * 255)


def saturate(img: np.ndarray, c: tuple) -> np.ndarray:
    x = skimage.color.rgb2hsv(np.array(img) / 255.0)
    x[:, :, 1] = np.clip(x[:, :, 1] * c[0] + c[1], 0, 1)
    return to_u8(np.clip(skimage.color.hsv2rgb(x), 0, 1) * 255)


def contrast(img: np.ndarray, c: float) -> np.ndarray:
    x = np.array(img) / 255.0
    m = np.mean(x, axis=(0, 1), keepdims=True)
    return to_u8(np.clip((x - m) * c + m, 0, 1) * 255)


def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    x = skimage.filters.gaussian(np.array(img) / 255.0, sigma=sigma, channel_axis=-1)
    return to_u8(np.clip(x, 0, 1) * 255)


def disk(radius: float, alias_blur: float) -> np.ndarray:
    if radius <= 8:
        grid = np.arange(-8, 9)
        ksize = (3, 3)
    else:
        grid = np.arange(-radius, radius + 1)
        ksize = (5, 5)
    gx, gy = np.meshgrid(grid, grid)
    d = ((gx**2 + gy**2) <= radius**2).astype(np.float32)
    d /= d.sum()
    return cv2.GaussianBlur(d, ksize=ksize, sigmaX=alias_blur)


def defocus_blur(img: np.ndarray, c: tuple) -> np.ndarray:
    x = np.array(img) / 255.0
    k = disk(*c)
    chans = [cv2.filter2D(x[:, :, ch], -1, k) for ch in range(3)]
    return to_u8(np.clip(np.stack(chans, axis=-1), 0, 1) * 255)


def pixelate(img: np.ndarray, c: float) -> np.ndarray:
    h, w = img.shape[:2]
    im = Image.fromarray(img)
    im = im.resize((int(w * c), int(h * c)), Image.BOX).resize((w, h), Image.BOX)
    return np.asarray(im)


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf))


def clipped_zoom(img: np.ndarray, z: float) -> np.ndarray:
    h = img.shape[0]
    ch = int(np.ceil(h / z))
    top = (h - ch) // 2
    zoomed = ndi.zoom(img[top : top + ch, top : top + ch], (z, z, 1), order=1)
    trim = (zoomed.shape[0] - h) // 2
    return zoomed[trim : trim + h, trim : trim + h]


def zoom_blur(img: np.ndarray, factors: np.ndarray) -> np.ndarray:
    x = (np.array(img) / 255.0).astype(np.float32)
    acc = np.zeros_like(x)
    for z in factors:
        acc += clipped_zoom(x, z)
    return to_u8(np.clip((x + acc) / (len(factors) + 1), 0, 1) * 255)


def glass_loop(y: np.ndarray, dx: np.ndarray, dy: np.ndarray, delta: int) -> np.ndarray:
    """The original's per-pixel loop with its tuple "swap" on NumPy views; offsets given per pixel as
    ``dx[h - delta - 1, w - delta - 1]`` (ascending order)."""
    y = y.copy()
    h_, w_ = y.shape[:2]
    for h in range(h_ - delta, delta, -1):
        for w in range(w_ - delta, delta, -1):
            ddx, ddy = dx[h - delta - 1, w - delta - 1], dy[h - delta - 1, w - delta - 1]
            hp, wp = h + ddy, w + ddx
            y[h, w], y[hp, wp] = y[hp, wp], y[h, w]
    return y


def glass_blur(img: np.ndarray, c: tuple, offsets: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    sigma, delta, iters = c
    y = np.uint8(skimage.filters.gaussian(np.array(img) / 255.0, sigma=sigma, channel_axis=-1) * 255)
    for i in range(iters):
        y = glass_loop(y, offsets[i][0], offsets[i][1], delta)
    return to_u8(np.clip(skimage.filters.gaussian(y / 255.0, sigma=sigma, channel_axis=-1), 0, 1) * 255)


def magick_motion_blur(img: np.ndarray, radius: float, sigma: float, angle: float) -> np.ndarray:
    """ImageMagick MotionBlurImage by its definition, pixel by pixel (slow; for small images)."""
    width = int(2 * math.ceil(radius) + 1)
    kern = [
        math.exp(-(i * i) / (2.0 * sigma * sigma)) / (math.sqrt(2 * math.pi) * sigma) for i in range(width)
    ]
    total = sum(kern)
    kern = [k / total for k in kern]
    rad = math.pi * angle / 180.0
    px, py = width * math.sin(rad), width * math.cos(rad)
    hyp = math.hypot(px, py)
    offs = [(math.ceil(i * py / hyp - 0.5), math.ceil(i * px / hyp - 0.5)) for i in range(width)]
    h, w, c = img.shape
    out = np.zeros_like(img)
    for y in range(h):
        for x in range(w):
            for ch in range(c):
                acc = 0.0
                for k, (ox, oy) in zip(kern, offs, strict=True):
                    yy = min(max(y + oy, 0), h - 1)
                    xx = min(max(x + ox, 0), w - 1)
                    acc += k * 257.0 * float(img[yy, xx, ch])
                q = min(max(math.floor(acc + 0.5), 0), 65535)
                out[y, x, ch] = q // 257
    return out


def fog(img: np.ndarray, c: tuple, plasma: np.ndarray) -> np.ndarray:
    x = np.array(img) / 255.0
    mx = x.max()
    x += c[0] * plasma[: img.shape[0], : img.shape[1]][..., None]
    return to_u8(np.clip(x * mx / (mx + c[0]), 0, 1) * 255)


def frost(img: np.ndarray, c: tuple, crop_rgb: np.ndarray) -> np.ndarray:
    return to_u8(np.clip(c[0] * np.array(img) + c[1] * crop_rgb, 0, 255))


def elastic(img: np.ndarray, c: tuple, shift: np.ndarray, fx: np.ndarray, fy: np.ndarray) -> np.ndarray:
    """Elastic transform given the affine jitter ``shift`` (3, 2) and the raw U(-1, 1) fields."""
    im = np.array(img, dtype=np.float32) / 255.0
    shape = im.shape
    size = shape[:2]
    center = np.float32(size) // 2
    sq = min(size) // 3
    p1 = np.float32([center + sq, [center[0] + sq, center[1] - sq], center - sq])
    p2 = p1 + shift.astype(np.float32)
    im = cv2.warpAffine(im, cv2.getAffineTransform(p1, p2), size[::-1], borderMode=cv2.BORDER_REFLECT_101)
    dx = (skimage.filters.gaussian(fx, sigma=c[1], mode="reflect", truncate=3) * c[0]).astype(np.float32)
    dy = (skimage.filters.gaussian(fy, sigma=c[1], mode="reflect", truncate=3) * c[0]).astype(np.float32)
    gx, gy, gz = np.meshgrid(np.arange(shape[1]), np.arange(shape[0]), np.arange(shape[2]))
    coords = (
        np.reshape(gy + dy[..., None], (-1, 1)),
        np.reshape(gx + dx[..., None], (-1, 1)),
        np.reshape(gz, (-1, 1)),
    )
    out = ndi.map_coordinates(im, coords, order=1, mode="reflect").reshape(shape)
    return to_u8(np.clip(out, 0, 1) * 255)


def snow(img: np.ndarray, c: tuple, layer_draw: np.ndarray, angle: float) -> np.ndarray:
    """Snow given the raw N(loc, scale) layer ``(H, W)`` and the motion-blur angle."""
    h, w = img.shape[:2]
    x = np.array(img, dtype=np.float32) / 255.0
    layer = clipped_zoom(layer_draw[..., None], c[2])
    layer[layer < c[3]] = 0
    layer_img = Image.fromarray((np.clip(layer[..., 0], 0, 1) * 255).astype(np.uint8))
    blurred = magick_motion_blur(np.asarray(layer_img)[..., None], c[4], c[5], angle) / 255.0
    gray = cv2.cvtColor(x, cv2.COLOR_RGB2GRAY).reshape(h, w, 1)
    x = c[6] * x + (1 - c[6]) * np.maximum(x, gray * 1.5 + 0.5)
    return to_u8(np.clip(x + blurred + np.rot90(blurred, k=2), 0, 1) * 255)


def spatter(img: np.ndarray, c: tuple, layer_draw: np.ndarray) -> np.ndarray:
    """Spatter given the raw N(loc, scale) liquid layer ``(H, W)``."""
    x = np.array(img, dtype=np.float32) / 255.0
    liquid = skimage.filters.gaussian(layer_draw, sigma=c[2])
    liquid[liquid < c[3]] = 0
    if c[5] == 0:
        lu8 = (liquid * 255).astype(np.uint8)
        d = 255 - cv2.Canny(lu8, 50, 150)
        d = cv2.distanceTransform(d, cv2.DIST_L2, 5)
        d = cv2.threshold(d, 20, 20, cv2.THRESH_TRUNC)[1]
        d = cv2.equalizeHist(cv2.blur(d, (3, 3)).astype(np.uint8))
        d = cv2.filter2D(d, cv2.CV_8U, np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]]))
        d = cv2.blur(d, (3, 3)).astype(np.float32)
        m = cv2.cvtColor(lu8 * d, cv2.COLOR_GRAY2BGRA)
        m /= np.max(m, axis=(0, 1))
        m *= c[4]
        ones = np.ones_like(m[..., :1])
        color = np.concatenate((175 / 255.0 * ones, 238 / 255.0 * ones, 238 / 255.0 * ones), axis=2)
        color = cv2.cvtColor(color, cv2.COLOR_BGR2BGRA)
        x = cv2.cvtColor(x, cv2.COLOR_BGR2BGRA)
        return to_u8(cv2.cvtColor(np.clip(x + m * color, 0, 1), cv2.COLOR_BGRA2BGR) * 255)
    m = np.where(liquid > c[3], 1, 0)
    m = skimage.filters.gaussian(m.astype(np.float32), sigma=c[4])
    m[m < 0.8] = 0
    ones = np.ones_like(x[..., :1])
    color = np.concatenate((63 / 255.0 * ones, 42 / 255.0 * ones, 20 / 255.0 * ones), axis=2)
    color *= m[..., None]
    x *= 1 - m[..., None]
    return to_u8(np.clip(x + color, 0, 1) * 255)


def plasma(mapsize: int, decay: float, draws: list[np.ndarray]) -> np.ndarray:
    """Diamond-square on one map; ``draws`` are the U(-wibble, wibble) arrays in the order they are used."""
    m = np.empty((mapsize, mapsize))
    m[0, 0] = 0.0
    step = mapsize
    wib = 100.0
    it = iter(draws)
    while step >= 2:
        half = step // 2
        corners = m[0:mapsize:step, 0:mapsize:step]
        sq = corners + np.roll(corners, -1, axis=0)
        sq = sq + np.roll(sq, -1, axis=1)
        m[half::step, half::step] = sq / 4 + wib * next(it)
        dr = m[half::step, half::step]
        ul = m[0:mapsize:step, 0:mapsize:step]
        left = (dr + np.roll(dr, 1, axis=0)) + (ul + np.roll(ul, -1, axis=1))
        m[0:mapsize:step, half::step] = left / 4 + wib * next(it)
        top = (dr + np.roll(dr, 1, axis=1)) + (ul + np.roll(ul, -1, axis=0))
        m[half::step, 0:mapsize:step] = top / 4 + wib * next(it)
        step //= 2
        wib /= decay
    m -= m.min()
    return m / m.max()
