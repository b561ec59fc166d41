"""Per-severity parameters of the original generators (Hendrycks & Dietterich, ICLR 2019).

``cifar`` is ``make_cifar_c.py`` (32x32 images), ``imagenet`` is ``make_imagenet_c.py`` (224x224 crops).
Every tuple lists severities 1..5. Values are written the way the original computes them (for example
``32 * 0.05`` for the elastic constants and float ``np.arange`` for the zoom factors) so that the floats are
bit-identical.
"""

from __future__ import annotations

import numpy as np

# Nominal image side of each preset (the original hard-codes it in several places).
NOMINAL_SIZE = {"cifar": 32, "imagenet": 224}

_CIFAR = 32
_IN = 244  # make_imagenet_c.py uses 244 for the elastic constants ("should have been 224")

PARAMS: dict[str, dict[str, tuple]] = {
    "cifar": {
        "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
        "shot_noise": (500, 250, 100, 75, 50),
        "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
        "speckle_noise": (0.06, 0.1, 0.12, 0.16, 0.2),
        "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1),
        # (sigma, max_delta, iterations)
        "glass_blur": ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),
        # (disk radius, alias blur sigma)
        "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),
        # ImageMagick (radius, sigma); angle ~ U(-45, 45)
        "motion_blur": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),
        "zoom_blur": (
            (1, 1.06, 0.01),
            (1, 1.11, 0.01),
            (1, 1.16, 0.01),
            (1, 1.21, 0.01),
            (1, 1.26, 0.01),
        ),
        # (loc, scale, zoom, threshold, motion radius, motion sigma, blend)
        "snow": (
            (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
            (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
            (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
            (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
            (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
        ),
        # (image weight, frost weight)
        "frost": ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)),
        # (amplitude, wibble decay)
        "fog": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),
        "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),
        "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
        # (alpha, sigma, affine jitter)
        "elastic_transform": (
            (_CIFAR * 0, _CIFAR * 0, _CIFAR * 0.08),
            (_CIFAR * 0.05, _CIFAR * 0.2, _CIFAR * 0.07),
            (_CIFAR * 0.08, _CIFAR * 0.06, _CIFAR * 0.06),
            (_CIFAR * 0.1, _CIFAR * 0.04, _CIFAR * 0.05),
            (_CIFAR * 0.1, _CIFAR * 0.03, _CIFAR * 0.03),
        ),
        "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),
        "jpeg_compression": (80, 65, 58, 50, 40),
        # (loc, scale, sigma, threshold, intensity or mud sigma, mode 0=water 1=mud)
        "spatter": (
            (0.62, 0.1, 0.7, 0.7, 0.5, 0),
            (0.65, 0.1, 0.8, 0.7, 0.5, 0),
            (0.65, 0.3, 1, 0.69, 0.5, 0),
            (0.65, 0.1, 0.7, 0.69, 0.6, 1),
            (0.65, 0.1, 0.5, 0.68, 0.6, 1),
        ),
        # (saturation factor, saturation shift)
        "saturate": ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)),
    },
    "imagenet": {
        "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),
        "shot_noise": (60, 25, 12, 5, 3),
        "impulse_noise": (0.03, 0.06, 0.09, 0.17, 0.27),
        "speckle_noise": (0.15, 0.2, 0.35, 0.45, 0.6),
        "gaussian_blur": (1, 2, 3, 4, 6),
        "glass_blur": ((0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)),
        "defocus_blur": ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)),
        "motion_blur": ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15)),
        "zoom_blur": (
            (1, 1.11, 0.01),
            (1, 1.16, 0.01),
            (1, 1.21, 0.02),
            (1, 1.26, 0.02),
            (1, 1.31, 0.03),
        ),
        "snow": (
            (0.1, 0.3, 3, 0.5, 10, 4, 0.8),
            (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
            (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
            (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
            (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55),
        ),
        "frost": ((1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)),
        "fog": ((1.5, 2), (2, 2), (2.5, 1.7), (2.5, 1.5), (3, 1.4)),
        "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),
        "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),
        "elastic_transform": (
            (_IN * 2, _IN * 0.7, _IN * 0.1),
            (_IN * 2, _IN * 0.08, _IN * 0.2),
            (_IN * 0.05, _IN * 0.01, _IN * 0.02),
            (_IN * 0.07, _IN * 0.01, _IN * 0.02),
            (_IN * 0.12, _IN * 0.01, _IN * 0.02),
        ),
        "pixelate": (0.6, 0.5, 0.4, 0.3, 0.25),
        "jpeg_compression": (25, 18, 15, 10, 7),
        "spatter": (
            (0.65, 0.3, 4, 0.69, 0.6, 0),
            (0.65, 0.3, 3, 0.68, 0.6, 0),
            (0.65, 0.3, 2, 0.68, 0.5, 0),
            (0.65, 0.3, 1, 0.65, 1.5, 1),
            (0.67, 0.4, 1, 0.65, 1.5, 1),
        ),
        "saturate": ((0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2)),
    },
}

# Frost: the original resizes the texture files by 0.2 for CIFAR and uses them unscaled for ImageNet.
FROST_SCALE = {"cifar": 0.2, "imagenet": None}
# Fog: side of the plasma map (a power of two, cropped to the image).
FOG_MAPSIZE = {"cifar": 32, "imagenet": 256}


def zoom_factors(preset: str, severity: int) -> np.ndarray:
    """The zoom factors of ``zoom_blur``: the original's float ``np.arange`` (7, 12, 16, 21, 26 for CIFAR)."""
    start, stop, step = PARAMS[preset]["zoom_blur"][severity - 1]
    return np.arange(start, stop, step)


def param(name: str, preset: str, severity: int):
    """The parameter (scalar or tuple) of corruption ``name`` at ``severity`` (1..5) for ``preset``."""
    return PARAMS[preset][name][severity - 1]
