"""Motion blur against a real ImageMagick 6 (Q16, non-HDRI) binary, when one is installed.

The original generator calls ``MagickMotionBlurImage`` through Wand on a PNG and decodes the 8-bit PNG it
writes. Skipped when no ImageMagick 6 Q16 ``convert`` is found (e.g. Debian: ``apt-get install imagemagick``).
"""

from __future__ import annotations

import shutil
import subprocess

import cv2
import numpy as np
import pytest
from conftest import make_images
from PIL import Image

from corruptions import _ops
from corruptions._params import param


def _find_im6() -> str | None:
    for name in ("convert-im6.q16", "convert"):
        path = shutil.which(name)
        if not path:
            continue
        try:
            out = subprocess.run([path, "-version"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        if "ImageMagick 6." in out and "Q16" in out and "HDRI" not in out:
            return path
    return None


IM6 = _find_im6()
pytestmark = pytest.mark.skipif(IM6 is None, reason="no ImageMagick 6 Q16 (non-HDRI) convert binary")


def _magick(tmp_path, img: np.ndarray, radius: float, sigma: float, angle: float) -> np.ndarray:
    src, dst = tmp_path / "in.png", tmp_path / "out.png"
    Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(src)
    subprocess.run([IM6, str(src), "-motion-blur", f"{radius}x{sigma}{angle:+.12f}", str(dst)], check=True)
    out = cv2.imread(str(dst), cv2.IMREAD_UNCHANGED)
    return out[..., ::-1] if out.ndim == 3 else out[..., None]


def test_rgb_motion_blur_matches_imagemagick(tmp_path):
    x = make_images()
    rng = np.random.default_rng(0)
    for i, s in enumerate([1, 2, 3, 4, 5, 5]):
        radius, sigma = param("motion_blur", "cifar", s)
        angle = rng.uniform(-45, 45, size=1)
        ours = _ops.motion_blur(x[3 + i : 4 + i], radius, sigma, angle)[0]
        assert np.array_equal(ours, _magick(tmp_path, x[3 + i], radius, sigma, float(angle[0])))


def test_snow_layer_motion_blur_matches_imagemagick(tmp_path):
    rng = np.random.default_rng(1)
    for s in range(1, 6):
        c = param("snow", "cifar", s)
        flakes = rng.integers(140, 256, (32, 32, 1))
        layer = np.where(rng.random((32, 32, 1)) > 0.85, flakes, 0).astype(np.uint8)
        angle = rng.uniform(-135, -45, size=1)
        ours = _ops.motion_blur(layer[None], c[4], c[5], angle)[0]
        assert np.array_equal(ours, _magick(tmp_path, layer, c[4], c[5], float(angle[0])))
