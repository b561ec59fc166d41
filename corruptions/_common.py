"""Small helpers shared by the corruption implementations."""

from __future__ import annotations

import numpy as np


def finish_unit(y: np.ndarray) -> np.ndarray:
    """The original's last step on a [0, 1] float image: ``np.uint8(np.clip(y, 0, 1) * 255)``.

    ``np.uint8`` of a float truncates, i.e. floors the non-negative values. Works in place on ``y`` and keeps
    its float dtype for the multiplication (float32 pipelines stay float32, as in the original).
    """
    np.clip(y, 0, 1, out=y)
    y *= 255
    return y.astype(np.uint8)


def finish_255(y: np.ndarray) -> np.ndarray:
    """``np.uint8(np.clip(y, 0, 255))`` for a float image on the 0..255 scale (frost)."""
    np.clip(y, 0, 255, out=y)
    return y.astype(np.uint8)


def wrap_to_uint8(y: np.ndarray) -> np.ndarray:
    """``y.astype(np.uint8)`` with the C-cast wrap-around of out-of-range floats made explicit.

    NumPy's float-to-uint8 cast of values above 255 is platform dependent; on x86 it truncates toward zero
    and keeps the low byte. The original relies on it in ``spatter`` (``(layer * 255).astype(np.uint8)``).
    """
    return (np.trunc(y).astype(np.int64) & 255).astype(np.uint8)


def require_cv2():
    """The ``cv2`` module, or an ``ImportError`` that says how to install it."""
    try:
        import cv2
    except ImportError as err:
        raise ImportError(
            "this corruption needs OpenCV: `pip install opencv-python` "
            "(or `pip install tta-norm[corruptions]`)"
        ) from err
    return cv2
