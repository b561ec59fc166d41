"""Batched re-implementations of the library steps the original generator calls per image.

Each helper reproduces one library operation of the original pipeline (Hendrycks & Dietterich, ICLR 2019,
``make_cifar_c.py`` / ``make_imagenet_c.py``) on a whole batch, with the same arithmetic where that is
affordable:

* :func:`gaussian_filter` - ``skimage.filters.gaussian`` (SciPy ``gaussian_filter``, batched: bit-exact).
* :func:`zoom_matrix` / :func:`zoom_axis` - ``scipy.ndimage.zoom(order=1)`` as used by ``clipped_zoom``
  (corner-aligned linear interpolation with SciPy's weight formula: bit-exact for the float64 path).
* :func:`motion_blur` - ImageMagick ``MotionBlurImage`` plus its 8-bit PNG round trip, implemented
  directly: one-sided Gaussian kernel of width ``2*ceil(radius)+1``, offsets ``ceil(i*cos - 0.5)``,
  ``ceil(i*sin - 0.5)``, edge virtual pixels, Q16 accumulation (validated bit-exactly against
  ImageMagick 6.9.11 Q16).
* :func:`pil_box_resize` - Pillow ``Image.resize(..., BOX)`` with Pillow's fixed-point two-pass resampler
  (bit-exact with Pillow).
* :func:`plasma_fractal` - the diamond-square plasma of ``fog``.
* :func:`rgb2hsv` / :func:`hsv2rgb` - the scikit-image formulas, operation for operation.
* :func:`map_coordinates_reflect` - ``scipy.ndimage.map_coordinates(order=1, mode='reflect')`` for HWC
  images with an integer channel coordinate.

Conventions: images are ``(N, H, W, C)`` arrays; float images are on [0, 1].
"""

from __future__ import annotations

import functools
import math

import numpy as np
import scipy.ndimage as ndi
import scipy.sparse as sp

# --------------------------------------------------------------------------------------------------------
# Gaussian filtering (skimage.filters.gaussian == scipy.ndimage.gaussian_filter, per image)
# --------------------------------------------------------------------------------------------------------


def gaussian_filter(x: np.ndarray, sigma: float, mode: str = "nearest", truncate: float = 4.0) -> np.ndarray:
    """``skimage.filters.gaussian(img, sigma, mode=mode, truncate=truncate)`` applied to every image.

    ``x`` is ``(N, H, W)`` (grayscale, like the original's 2-D layers) or ``(N, H, W, C)`` (colour, like
    ``multichannel=True``). The batch and channel axes get sigma 0, which SciPy skips, so each image sees
    exactly the per-image computation. The output has the input's float dtype.
    """
    sig = (0.0, sigma, sigma) + ((0.0,) if x.ndim == 4 else ())
    return ndi.gaussian_filter(x, sig, mode=mode, truncate=truncate)


# --------------------------------------------------------------------------------------------------------
# scipy.ndimage.zoom(order=1) as used by clipped_zoom
# --------------------------------------------------------------------------------------------------------


def _spline1_weights(coord: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SciPy's order-1 spline weights: start index, weight of start, weight of start + 1.

    SciPy computes the last weight as ``1 - sum(others)``, i.e. ``1 - (1 - t)``, not ``t``.
    """
    start = np.floor(coord)
    t = coord - start
    w0 = 1.0 - t
    w1 = 1.0 - w0
    return start.astype(np.int64), w0, w1


@functools.lru_cache(maxsize=256)
def zoom_axis(n: int, factor: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One axis of ``clipped_zoom(img, factor)`` for an axis of length ``n``.

    The original crops ``ch = ceil(n / factor)`` pixels from ``top = (n - ch) // 2``, zooms them with
    ``scipy.ndimage.zoom(order=1)`` to ``round(ch * factor)`` pixels (corner-aligned: output ``j`` samples
    input ``j * (ch - 1) / (out - 1)``) and keeps ``n`` pixels from ``(out - n) // 2``. Returns, for each of
    the ``n`` kept outputs, the two source indices into the full axis and their weights.
    """
    ch = int(np.ceil(n / factor))
    top = (n - ch) // 2
    out = int(round(ch * factor))
    if out < n:
        raise ValueError(f"zoom factor {factor} shrinks an axis of length {n}; clipped_zoom needs factor >= 1")
    trim = (out - n) // 2
    if out > 1:
        ratio = np.float64(ch - 1) / np.float64(out - 1)
    else:
        ratio = np.float64(1.0)
    coord = np.arange(out, dtype=np.float64) * ratio
    start, w0, w1 = _spline1_weights(coord)
    i0 = np.clip(start, 0, ch - 1)
    i1 = np.clip(start + 1, 0, ch - 1)  # the clipped neighbour always has weight 0 (SciPy reads cval 0)
    w1 = np.where(start + 1 > ch - 1, 0.0, w1)
    sl = slice(trim, trim + n)
    return i0[sl] + top, i1[sl] + top, w0[sl], w1[sl]


def clipped_zoom_2d(x: np.ndarray, factor: float) -> np.ndarray:
    """``clipped_zoom`` of a batch of 2-D float64 layers ``(N, H, W)``, bit-exact with SciPy.

    SciPy accumulates the four corner terms ``(v * wy) * wx`` in row-major corner order; so do we.
    """
    _, h, w = x.shape
    if factor == 1:
        return x.copy()
    yi0, yi1, wy0, wy1 = zoom_axis(h, float(factor))
    xi0, xi1, wx0, wx1 = zoom_axis(w, float(factor))
    r0 = x[:, yi0, :]
    r1 = x[:, yi1, :]
    a0 = wy0[None, :, None]
    a1 = wy1[None, :, None]
    b0 = wx0[None, None, :]
    b1 = wx1[None, None, :]
    out = (r0[:, :, xi0] * a0) * b0
    out += (r0[:, :, xi1] * a0) * b1
    out += (r1[:, :, xi0] * a1) * b0
    out += (r1[:, :, xi1] * a1) * b1
    return out


def zoom_matrix(n: int, factor: float) -> sp.csr_matrix:
    """The ``(n, n)`` linear map of one axis of ``clipped_zoom`` (two non-zeros per row)."""
    i0, i1, w0, w1 = zoom_axis(n, float(factor))
    rows = np.concatenate([np.arange(n), np.arange(n)])
    cols = np.concatenate([i0, i1])
    vals = np.concatenate([w0, w1])
    return sp.csr_matrix((vals, (rows, cols)), shape=(n, n))


@functools.lru_cache(maxsize=32)
def zoom_sum_operator(h: int, w: int, factors: tuple[float, ...]) -> sp.csr_matrix:
    """Sparse ``(h*w, h*w)`` operator of ``sum_z clipped_zoom(x, z)`` on row-major flattened channels."""
    total = sp.csr_matrix((h * w, h * w))
    for z in factors:
        total = total + sp.kron(zoom_matrix(h, z), zoom_matrix(w, z), format="csr")
    total.sum_duplicates()
    total.eliminate_zeros()
    return total.tocsr()


# --------------------------------------------------------------------------------------------------------
# ImageMagick MotionBlurImage (+ 8-bit PNG round trip)
# --------------------------------------------------------------------------------------------------------

_MAGICK_SQ2PI = 2.50662827463100024161235523934010416269302368164062
_MAGICK_EPSILON = 1.0e-12


@functools.lru_cache(maxsize=64)
def motion_kernel(radius: float, sigma: float) -> np.ndarray:
    """ImageMagick's one-sided motion-blur kernel: width ``2*ceil(radius)+1``, ``k[i] ~ exp(-i^2/2s^2)``."""
    width = int(2.0 * math.ceil(radius) + 1.0)
    s = sigma if abs(sigma) >= _MAGICK_EPSILON else _MAGICK_EPSILON
    i = np.arange(width, dtype=np.float64)
    k = np.exp(-(i * i) / (2.0 * s * s)) / (_MAGICK_SQ2PI * s)
    normalize = 0.0
    for v in k:  # sequential sum, as ImageMagick does
        normalize += v
    return k / normalize


def motion_offsets(width: int, angles_deg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-image integer sample offsets ``(dx, dy)``, each ``(N, width)``, for ImageMagick angles."""
    theta = np.pi * np.asarray(angles_deg, dtype=np.float64) / 180.0
    px = width * np.sin(theta)
    py = width * np.cos(theta)
    hyp = np.hypot(px, py)
    i = np.arange(width, dtype=np.float64)[None, :]
    dx = np.ceil((i * py[:, None]) / hyp[:, None] - 0.5).astype(np.int64)
    dy = np.ceil((i * px[:, None]) / hyp[:, None] - 0.5).astype(np.int64)
    return dx, dy


def motion_blur(x: np.ndarray, radius: float, sigma: float, angles_deg: np.ndarray) -> np.ndarray:
    """ImageMagick ``-motion-blur radius x sigma + angle`` of uint8 images ``(N, H, W, C)``, one angle each.

    Output pixel = ``floor(round(sum_i k[i] * 257 * src[y + dy_i, x + dx_i]) / 257)``: ImageMagick reads the
    8-bit PNG into Q16 (x 257), accumulates in double, rounds to a quantum, and its 8-bit PNG writer
    truncates. Out-of-image samples use the nearest edge pixel (ImageMagick's default virtual pixels).
    """
    n, h, w, c = x.shape
    k = motion_kernel(float(radius), float(sigma))
    width = k.size
    dx, dy = motion_offsets(width, angles_deg)
    pad = int(max(np.abs(dx).max(initial=0), np.abs(dy).max(initial=0)))
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge").astype(np.float64)
    xp *= 257.0
    acc = np.zeros((n, h, w, c), dtype=np.float64)
    # Group the images by their offset at each tap: every group is a plain shifted slice.
    for i in range(width):
        key = (dy[:, i] + pad) * (2 * pad + 1) + (dx[:, i] + pad)
        for kv in np.unique(key):
            sel = np.nonzero(key == kv)[0]
            oy, ox = divmod(int(kv), 2 * pad + 1)
            src = xp[sel, oy : oy + h, ox : ox + w, :]
            if sel.size == n:
                acc += k[i] * src
            else:
                acc[sel] += k[i] * src
    q = np.floor(np.clip(acc, 0.0, 65535.0) + 0.5)
    q = np.minimum(q, 65535.0)
    return np.floor(q / 257.0).astype(np.uint8)


# --------------------------------------------------------------------------------------------------------
# Pillow resize with Image.BOX (fixed-point, two passes, horizontal first)
# --------------------------------------------------------------------------------------------------------

_PIL_PRECISION_BITS = 32 - 8 - 2


@functools.lru_cache(maxsize=128)
def pil_box_coefficients(in_size: int, out_size: int) -> np.ndarray:
    """Pillow's fixed-point BOX coefficients as a dense ``(out_size, in_size)`` float64 matrix of integers."""
    support_base = 0.5
    scale = float(in_size) / out_size
    filterscale = max(scale, 1.0)
    support = support_base * filterscale
    mat = np.zeros((out_size, in_size), dtype=np.float64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        ss = 1.0 / filterscale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        ws = []
        for x in range(xmax):
            arg = (x + xmin - center + 0.5) * ss
            ws.append(1.0 if -0.5 < arg <= 0.5 else 0.0)
        ww = 0.0
        for v in ws:
            ww += v
        for x, v in enumerate(ws):
            k = v / ww if ww != 0.0 else v
            fixed = int(-0.5 + k * (1 << _PIL_PRECISION_BITS)) if k < 0 else int(0.5 + k * (1 << _PIL_PRECISION_BITS))
            mat[xx, xmin + x] = fixed
    return mat


def _pil_pass(x: np.ndarray, coeffs: np.ndarray, axis: int) -> np.ndarray:
    # Integer arithmetic carried exactly in float64 (all partial sums are integers < 2**53).
    moved = np.moveaxis(x, axis, -1).astype(np.float64)
    acc = moved @ coeffs.T + float(1 << (_PIL_PRECISION_BITS - 1))
    out = np.clip(np.floor(acc / float(1 << _PIL_PRECISION_BITS)), 0, 255).astype(np.uint8)
    return np.moveaxis(out, -1, axis)


def pil_box_resize(x: np.ndarray, out_w: int, out_h: int) -> np.ndarray:
    """``PIL.Image.fromarray(img).resize((out_w, out_h), Image.BOX)`` for uint8 ``(N, H, W, C)`` batches."""
    _, h, w, _ = x.shape
    if (out_w, out_h) == (w, h):
        return x.copy()
    out = x
    if out_w != w:
        out = _pil_pass(out, pil_box_coefficients(w, out_w), axis=2)
    if out_h != h:
        out = _pil_pass(out, pil_box_coefficients(h, out_h), axis=1)
    return out


# --------------------------------------------------------------------------------------------------------
# Diamond-square plasma (fog)
# --------------------------------------------------------------------------------------------------------


def plasma_fractal(n: int, mapsize: int, wibbledecay: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` plasma maps ``(n, mapsize, mapsize)`` by the original's diamond-square, normalized to [0, 1].

    Starting wibble 100, divided by ``wibbledecay`` after each level; the noise added to each new point is
    ``wibble * U(-wibble, wibble)``. Vectorized over the batch (axis 0).
    """
    if mapsize & (mapsize - 1):
        raise ValueError(f"plasma map size must be a power of two, got {mapsize}")
    maparray = np.zeros((n, mapsize, mapsize), dtype=np.float64)
    stepsize = mapsize
    wibble = 100.0

    def wibbledmean(array: np.ndarray) -> np.ndarray:
        return array / 4 + wibble * rng.uniform(-wibble, wibble, array.shape)

    while stepsize >= 2:
        half = stepsize // 2
        # squares: the centre of each square gets the mean of its corners
        cornerref = maparray[:, 0:mapsize:stepsize, 0:mapsize:stepsize]
        squareaccum = cornerref + np.roll(cornerref, shift=-1, axis=1)
        squareaccum += np.roll(squareaccum, shift=-1, axis=2)
        maparray[:, half:mapsize:stepsize, half:mapsize:stepsize] = wibbledmean(squareaccum)
        # diamonds
        drgrid = maparray[:, half:mapsize:stepsize, half:mapsize:stepsize]
        ulgrid = maparray[:, 0:mapsize:stepsize, 0:mapsize:stepsize]
        ldrsum = drgrid + np.roll(drgrid, 1, axis=1)
        lulsum = ulgrid + np.roll(ulgrid, -1, axis=2)
        ltsum = ldrsum + lulsum
        maparray[:, 0:mapsize:stepsize, half:mapsize:stepsize] = wibbledmean(ltsum)
        tdrsum = drgrid + np.roll(drgrid, 1, axis=2)
        tulsum = ulgrid + np.roll(ulgrid, -1, axis=1)
        ttsum = tdrsum + tulsum
        maparray[:, half:mapsize:stepsize, 0:mapsize:stepsize] = wibbledmean(ttsum)
        stepsize //= 2
        wibble /= wibbledecay
    maparray -= maparray.min(axis=(1, 2), keepdims=True)
    return maparray / maparray.max(axis=(1, 2), keepdims=True)


# --------------------------------------------------------------------------------------------------------
# HSV (skimage.color.rgb2hsv / hsv2rgb formulas)
# --------------------------------------------------------------------------------------------------------


def rgb2hsv(arr: np.ndarray) -> np.ndarray:
    """``skimage.color.rgb2hsv`` on float64 ``(..., 3)``; ties resolve like skimage (blue > green > red)."""
    r = arr[..., 0]
    g = arr[..., 1]
    b = arr[..., 2]
    out_v = arr.max(-1)
    delta = np.ptp(arr, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out_s = delta / out_v
        h = np.where(
            b == out_v,
            4.0 + (r - g) / delta,
            np.where(g == out_v, 2.0 + (b - r) / delta, (g - b) / delta),
        )
    zero = delta == 0.0
    out_s[zero] = 0.0
    out_h = (h / 6.0) % 1.0
    out_h[zero] = 0.0
    out = np.stack([out_h, out_s, out_v], axis=-1)
    out[np.isnan(out)] = 0
    return out


def hsv2rgb(arr: np.ndarray) -> np.ndarray:
    """``skimage.color.hsv2rgb`` on float64 ``(..., 3)``."""
    h = arr[..., 0]
    s = arr[..., 1]
    v = arr[..., 2]
    hi = np.floor(h * 6)
    f = h * 6 - hi
    p = v * (1 - s)
    q = v * (1 - f * s)
    t = v * (1 - (1 - f) * s)
    sector = hi.astype(np.uint8) % 6
    # (r, g, b) per sector: (v,t,p) (q,v,p) (p,v,t) (p,q,v) (t,p,v) (v,p,q)
    table = np.stack(
        [
            np.stack((v, t, p), axis=-1),
            np.stack((q, v, p), axis=-1),
            np.stack((p, v, t), axis=-1),
            np.stack((p, q, v), axis=-1),
            np.stack((t, p, v), axis=-1),
            np.stack((v, p, q), axis=-1),
        ]
    )
    idx = np.broadcast_to(sector[None, ..., None], (1,) + table.shape[1:])
    return np.take_along_axis(table, idx.astype(np.intp), axis=0)[0]


# --------------------------------------------------------------------------------------------------------
# scipy.ndimage.map_coordinates(order=1, mode='reflect') for HWC images
# --------------------------------------------------------------------------------------------------------


def _reflect_index(i: np.ndarray, n: int) -> np.ndarray:
    """Half-sample symmetric extension (``d c b a | a b c d | d c b a``) of integer indices."""
    if n == 1:
        return np.zeros_like(i)
    period = 2 * n
    i = np.mod(i, period)
    return np.where(i >= n, period - 1 - i, i)


def map_coordinates_reflect(img: np.ndarray, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """``map_coordinates(img[n], (yy[n], xx[n], c), order=1, mode='reflect')`` for each image of a batch.

    ``img`` is ``(N, H, W, C)`` (float32 in the original), ``yy``/``xx`` are float64 ``(N, H, W)`` sample
    coordinates. Linear interpolation in double with SciPy's weights and term order, cast to ``img``'s dtype.
    """
    n, h, w, c = img.shape
    y0, wy0, wy1 = _spline1_weights(yy)
    x0, wx0, wx1 = _spline1_weights(xx)
    ya = _reflect_index(y0, h)
    yb = _reflect_index(y0 + 1, h)
    xa = _reflect_index(x0, w)
    xb = _reflect_index(x0 + 1, w)
    flat = img.reshape(n, h * w, c)
    base = np.arange(n)[:, None, None]

    def tap(yi: np.ndarray, xi: np.ndarray) -> np.ndarray:
        return flat[base, yi * w + xi].astype(np.float64)

    a0 = wy0[..., None]
    a1 = wy1[..., None]
    b0 = wx0[..., None]
    b1 = wx1[..., None]
    out = (tap(ya, xa) * a0) * b0
    out += (tap(ya, xb) * a0) * b1
    out += (tap(yb, xa) * a1) * b0
    out += (tap(yb, xb) * a1) * b1
    return out.astype(img.dtype)
