"""Digital corruptions: brightness, contrast, saturate, elastic_transform, pixelate, jpeg_compression
(Hendrycks & Dietterich, ICLR 2019)."""

from __future__ import annotations

import functools
import io

import numpy as np

from . import _ops
from ._common import finish_unit, require_cv2


def contrast(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    """``(x - m) * c + m`` with ``m`` the per-image, per-channel spatial mean of ``x / 255``."""
    xf = x / 255.0
    means = xf.mean(axis=(1, 2), keepdims=True)
    return finish_unit((xf - means) * c + means)


def _planar(x: np.ndarray) -> np.ndarray:
    """uint8 ``(N, H, W, 3)`` -> float64 ``(3, N, H, W)`` on [0, 1]."""
    return np.ascontiguousarray(x.transpose(3, 0, 1, 2)) / 255.0


def _interleaved(rgb: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(finish_unit(rgb).transpose(1, 2, 3, 0))


def brightness(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    """HSV value ``V <- clip(V + c, 0, 1)`` (skimage colour conversions)."""
    h, s, v = _ops.rgb2hsv(_planar(x))
    return _interleaved(_ops.hsv2rgb(h, s, np.clip(v + c, 0, 1)))


def saturate(x: np.ndarray, c: tuple, rng: np.random.Generator) -> np.ndarray:
    """HSV saturation ``S <- clip(S * c[0] + c[1], 0, 1)``; severities 1-2 desaturate, 3-5 oversaturate."""
    h, s, v = _ops.rgb2hsv(_planar(x))
    return _interleaved(_ops.hsv2rgb(h, np.clip(s * c[0] + c[1], 0, 1), v))


def elastic_transform(x: np.ndarray, c: tuple, rng: np.random.Generator) -> np.ndarray:
    """Random affine warp of three control points (``cv2.warpAffine``, bilinear, reflect-101), then a
    smoothed random displacement field (sigma ``c[1]``, amplitude ``c[0]``) sampled bilinearly with
    reflection (``map_coordinates(order=1, mode='reflect')``). float32 pipeline, as the original."""
    cv2 = require_cv2()

    alpha, sigma, jitter = c
    n, h, w, _ = x.shape
    img = x.astype(np.float32) / 255.0
    center = np.float32((h, w)) // 2
    square = min(h, w) // 3
    pts1 = np.float32([center + square, [center[0] + square, center[1] - square], center - square])
    shifts = rng.uniform(-jitter, jitter, size=(n, 3, 2)).astype(np.float32)
    warped = np.empty_like(img)
    for i in range(n):
        mat = cv2.getAffineTransform(pts1, pts1 + shifts[i])
        warped[i] = cv2.warpAffine(img[i], mat, (w, h), borderMode=cv2.BORDER_REFLECT_101).reshape(h, w, -1)
    fields = rng.uniform(-1, 1, size=(2, n, h, w))
    dx = (_ops.gaussian_filter(fields[0], sigma, mode="reflect", truncate=3) * alpha).astype(np.float32)
    dy = (_ops.gaussian_filter(fields[1], sigma, mode="reflect", truncate=3) * alpha).astype(np.float32)
    yy = np.arange(h)[None, :, None] + dy
    xx = np.arange(w)[None, None, :] + dx
    return finish_unit(_ops.map_coordinates_reflect(warped, yy, xx))


def pixelate(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    """PIL BOX resize down to ``(int(W*c), int(H*c))`` and back up (Pillow's fixed-point resampler)."""
    _, h, w, _ = x.shape
    small = _ops.pil_box_resize(x, int(w * c), int(h * c))
    return _ops.pil_box_resize(small, w, h)


def pil_jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    """The original: ``PIL.Image.save(buf, 'JPEG', quality=q)`` and decode (4:2:0, libjpeg defaults)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB"))


def _cv2_jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    cv2 = require_cv2()

    ok, buf = cv2.imencode(".jpg", img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:  # pragma: no cover - OpenCV failure
        raise RuntimeError("cv2.imencode failed")
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1]


@functools.lru_cache(maxsize=1)
def cv2_jpeg_matches_pil() -> bool:
    """Whether OpenCV's JPEG codec gives byte-identical round trips to Pillow's on probe images.

    Both wheels bundle libjpeg-turbo with the standard quantization tables and 4:2:0 subsampling; when
    the probe agrees, the faster OpenCV path is used, otherwise Pillow (the original's library).
    """
    try:
        import cv2  # noqa: F401
    except ImportError:  # pragma: no cover - opencv is a dependency
        return False
    rng = np.random.default_rng(12345)
    yy, xx = np.mgrid[0:48, 0:40]
    smooth = np.stack([xx * 6, yy * 5, (xx + yy) * 3], axis=-1).astype(np.uint8)
    probes = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), smooth, np.full((17, 23, 3), 200, np.uint8)]
    for img in probes:
        for q in (95, 80, 65, 58, 50, 40, 25, 18, 15, 10, 7):
            if not np.array_equal(_cv2_jpeg(img, q), pil_jpeg(img, q)):
                return False
    return True


def jpeg_compression(x: np.ndarray, c: int, rng: np.random.Generator) -> np.ndarray:
    """JPEG round trip at quality ``c`` (Pillow semantics; OpenCV when it is byte-identical)."""
    codec = _cv2_jpeg if cv2_jpeg_matches_pil() else pil_jpeg
    return np.stack([codec(np.ascontiguousarray(img), c) for img in x])
