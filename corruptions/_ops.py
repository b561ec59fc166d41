"""Batched re-implementations of the library steps the original generator calls per image.

Each helper reproduces one library operation of the original pipeline (Hendrycks & Dietterich, ICLR 2019,
``make_cifar_c.py`` / ``make_imagenet_c.py``) on a whole batch, with the same arithmetic where that is
affordable:

* :func:`gaussian_filter` - ``skimage.filters.gaussian`` (SciPy ``gaussian_filter``, batched: bit-exact).
* :func:`zoom_axis` / :func:`clipped_zoom_2d` - ``scipy.ndimage.zoom(order=1)`` as used by ``clipped_zoom``
  (corner-aligned linear interpolation with SciPy's weights and term order: bit-exact);
  :func:`zoom_sum_operator` - the sum over zoom factors of ``zoom_blur`` as one sparse operator.
* :func:`motion_blur` - ImageMagick ``MotionBlurImage`` plus its 8-bit PNG round trip, implemented
  directly: one-sided Gaussian kernel of width ``2*ceil(radius)+1``, offsets ``ceil(i*cos - 0.5)``,
  ``ceil(i*sin - 0.5)``, edge virtual pixels, Q16 accumulation rounded to a quantum and truncated by the
  8-bit writer (validated bit-exactly against ImageMagick 6.9.11 Q16).
* :func:`pil_box_resize` - Pillow ``Image.resize(..., BOX)`` with Pillow's fixed-point two-pass resampler
  (bit-exact with Pillow).
* :func:`plasma_fractal` - the diamond-square plasma of ``fog``.
* :func:`rgb2hsv` / :func:`hsv2rgb` - the scikit-image formulas, operation for operation (planar).
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


def zoom_shape(n: int, factor: float) -> tuple[int, int]:
    """``clipped_zoom``'s crop ``ceil(n / factor)`` and SciPy's zoomed length ``round(crop * factor)``."""
    ch = int(np.ceil(n / factor))
    return ch, int(round(ch * factor))


@functools.lru_cache(maxsize=256)
def zoom_axis(n: int, factor: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One axis of ``clipped_zoom(img, factor)`` for an axis of length ``n``.

    The original crops ``ch = ceil(n / factor)`` pixels from ``top = (n - ch) // 2``, zooms them with
    ``scipy.ndimage.zoom(order=1)`` to ``round(ch * factor)`` pixels (corner-aligned: output ``j`` samples
    input ``j * (ch - 1) / (out - 1)``) and keeps ``n`` pixels from ``(out - n) // 2``. Returns, for each of
    the ``n`` kept outputs, the two source indices into the full axis and their weights.
    """
    ch, out = zoom_shape(n, factor)
    top = (n - ch) // 2
    if out < n:
        raise ValueError(
            f"zoom factor {factor} shrinks an axis of length {n}; clipped_zoom needs factor >= 1"
        )
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

    Images are processed sorted by angle in small groups, so that at every tap the images sharing an
    offset are contiguous and each run is one shifted slice.
    """
    n = x.shape[0]
    k = motion_kernel(float(radius), float(sigma))
    order = np.argsort(np.asarray(angles_deg, dtype=np.float64), kind="stable")
    dx, dy = motion_offsets(k.size, np.asarray(angles_deg, dtype=np.float64)[order])
    xs = x[order]
    out = np.empty_like(x)
    sub = 32  # keeps the float64 accumulators in cache
    for s0 in range(0, n, sub):
        out[order[s0 : s0 + sub]] = _motion_sorted(xs[s0 : s0 + sub], k, dx[s0 : s0 + sub], dy[s0 : s0 + sub])
    return out


def _motion_sorted(x: np.ndarray, k: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    n, h, w, c = x.shape
    pad = int(max(np.abs(dx).max(initial=0), np.abs(dy).max(initial=0)))
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge").astype(np.float64)
    xp *= 257.0
    acc = np.zeros((n, h, w, c))
    tmp = np.empty((n, h, w, c))
    for i in range(k.size):
        key = dy[:, i] * (4 * pad + 3) + dx[:, i]
        bounds = np.concatenate([[0], np.flatnonzero(np.diff(key)) + 1, [n]])
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            oy = int(dy[a, i]) + pad
            ox = int(dx[a, i]) + pad
            t = tmp[a:b]
            np.multiply(xp[a:b, oy : oy + h, ox : ox + w], k[i], out=t)
            acc[a:b] += t
    np.clip(acc, 0.0, 65535.0, out=acc)
    acc += 0.5
    np.floor(acc, out=acc)  # ClampToQuantum
    acc /= 257.0  # exact for multiples of 257 (a reciprocal multiply is not)
    return np.floor(acc).astype(np.uint8)  # 8-bit PNG writer


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
            fixed = (
                int(-0.5 + k * (1 << _PIL_PRECISION_BITS))
                if k < 0
                else int(0.5 + k * (1 << _PIL_PRECISION_BITS))
            )
            mat[xx, xmin + x] = fixed
    return mat


@functools.lru_cache(maxsize=128)
def _pil_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The non-zero fixed-point coefficients as ``(out_size, taps)`` index and int32 weight arrays."""
    mat = pil_box_coefficients(in_size, out_size)
    taps = max(1, int((mat != 0).sum(axis=1).max()))
    idx = np.zeros((out_size, taps), dtype=np.intp)
    wts = np.zeros((out_size, taps), dtype=np.int32)
    for o in range(out_size):
        nz = np.flatnonzero(mat[o])
        idx[o, : nz.size] = nz
        wts[o, : nz.size] = mat[o, nz]
    return idx, wts


def _pil_pass(x: np.ndarray, in_size: int, out_size: int, axis: int) -> np.ndarray:
    # Pillow's integer arithmetic: 2**21 + sum(k * v) fits in int32 because the k sum to about 2**22.
    idx, wts = _pil_taps(in_size, out_size)
    shape = [1] * x.ndim
    shape[axis] = out_size
    acc = np.full(
        x.shape[:axis] + (out_size,) + x.shape[axis + 1 :], 1 << (_PIL_PRECISION_BITS - 1), np.int32
    )
    for t in range(idx.shape[1]):
        acc += np.take(x, idx[:, t], axis=axis).astype(np.int32) * wts[:, t].reshape(shape)
    acc >>= _PIL_PRECISION_BITS
    np.clip(acc, 0, 255, out=acc)
    return acc.astype(np.uint8)


def pil_box_resize(x: np.ndarray, out_w: int, out_h: int) -> np.ndarray:
    """``PIL.Image.fromarray(img).resize((out_w, out_h), Image.BOX)`` for uint8 ``(N, H, W, C)`` batches."""
    _, h, w, _ = x.shape
    if (out_w, out_h) == (w, h):
        return x.copy()
    out = x
    if out_w != w:
        out = _pil_pass(out, w, out_w, axis=2)
    if out_h != h:
        out = _pil_pass(out, h, out_h, axis=1)
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


def rgb2hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``skimage.color.rgb2hsv`` on planar float64 ``(3, ...)`` data, returning ``(h, s, v)``.

    Same operations per element as scikit-image (``s = delta / v``, hue offsets 0/2/4 plus a difference over
    ``delta``, ``(h / 6) % 1``, zero where ``delta == 0``); ties resolve like skimage (blue > green > red).
    """
    r, g, b = rgb
    v = np.maximum(np.maximum(r, g), b)
    delta = v - np.minimum(np.minimum(r, g), b)
    zero = delta == 0.0
    bmax = b == v
    gmax = (g == v) & ~bmax
    h = np.where(bmax, r - g, np.where(gmax, b - r, g - b))
    base = np.where(bmax, 4.0, np.where(gmax, 2.0, 0.0))
    with np.errstate(invalid="ignore", divide="ignore"):
        s = delta / v
        h /= delta
    s[zero] = 0.0
    h += base
    h /= 6.0
    np.remainder(h, 1.0, out=h)
    h[zero] = 0.0
    return h, s, v


def hsv2rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``skimage.color.hsv2rgb`` of planar float64 ``h, s, v``; returns planar ``(3, ...)`` RGB."""
    h6 = h * 6
    hi = np.floor(h6)
    f = h6 - hi
    p = v * (1 - s)
    q = v * (1 - f * s)
    t = v * (1 - (1 - f) * s)
    sector = hi.astype(np.uint8) % 6
    r = np.choose(sector, (v, q, p, p, t, v))
    g = np.choose(sector, (t, v, v, q, p, p))
    b = np.choose(sector, (p, p, t, v, v, q))
    return np.stack([r, g, b])


# --------------------------------------------------------------------------------------------------------
# scipy.ndimage.map_coordinates(order=1, mode='reflect') for HWC images
# --------------------------------------------------------------------------------------------------------


def _reflect_pair(i: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Half-sample symmetric extension (``d c b a | a b c d | d c b a``) of ``i`` and ``i + 1``."""
    if n == 1:
        return np.zeros_like(i), np.zeros_like(i)
    lo = int(i.min(initial=0))
    span = np.arange(lo, int(i.max(initial=0)) + 2)
    period = 2 * n
    m = np.mod(span, period)
    lut = np.where(m >= n, period - 1 - m, m)
    k = i - lo
    return lut[k], lut[k + 1]


def map_coordinates_reflect(img: np.ndarray, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """``map_coordinates(img[n], (yy[n], xx[n], c), order=1, mode='reflect')`` for each image of a batch.

    ``img`` is ``(N, H, W, C)`` (float32 in the original), ``yy``/``xx`` are float64 ``(N, H, W)`` sample
    coordinates. Linear interpolation in double with SciPy's weights and term order (corners in row-major
    order, each term ``(v * wy) * wx``), cast to ``img``'s dtype.
    """
    n, h, w, c = img.shape
    y0, wy0, wy1 = _spline1_weights(yy.ravel())
    x0, wx0, wx1 = _spline1_weights(xx.ravel())
    ya, yb = _reflect_pair(y0, h)
    xa, xb = _reflect_pair(x0, w)
    base = np.repeat(np.arange(n, dtype=np.intp) * (h * w), h * w)
    planar = np.ascontiguousarray(img.reshape(n * h * w, c).T)  # (C, N*H*W), input dtype
    ra = base + ya * w
    rb = base + yb * w
    out = np.empty((c, n * h * w))
    tmp = np.empty((c, n * h * w))
    vals = np.empty((c, n * h * w), dtype=img.dtype)
    corners = ((ra, wy0, xa, wx0), (ra, wy0, xb, wx1), (rb, wy1, xa, wx0), (rb, wy1, xb, wx1))
    for k, (r, a, xi, b) in enumerate(corners):
        np.take(planar, r + xi, axis=1, out=vals)
        np.multiply(vals, a, out=tmp)  # exact widening of the float32 value, then (v * wy) in double
        tmp *= b
        if k == 0:
            out[...] = tmp
        else:
            out += tmp
    return out.T.astype(img.dtype, order="C").reshape(n, h, w, c)
