"""CIFAR-10-C / ImageNet-C corruption generators: a faithful, fast re-implementation.

Re-implements the 15 benchmark corruptions and the 4 extra ones of D. Hendrycks and T. Dietterich,
"Benchmarking Neural Network Robustness to Common Corruptions and Perturbations" (ICLR 2019), following
the original generators (``make_cifar_c.py``, ``make_imagenet_c.py``) step by step, including their quirks,
but vectorized over batches and parallel across blocks of images. Standalone: it does not import
``tta_norm``.

>>> from corruptions import corrupt, CORRUPTIONS
>>> out = corrupt(images, "glass_blur", severity=5, seed=0, preset="cifar")  # doctest: +SKIP

Conventions: images are uint8 RGB ``(N, H, W, 3)`` (numpy or torch), computations follow the original
float pipeline on [0, 1] and end with its truncation to uint8.

Datasets in the released layouts: :func:`write_cifar_c` (``<name>.npy`` + ``labels.npy``) and
:func:`write_imagenet_c` (``<name>/<severity>/<class>/<file>`` JPEGs); readers :func:`load_cifar_batches`,
:func:`load_image_folder` and :func:`load_source`.

The heavy modules (NumPy, SciPy, OpenCV) load on first use, so ``import corruptions.cli`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._names import ALL_CORRUPTIONS, CORRUPTIONS, EXTRA_CORRUPTIONS, PRESETS

_LAZY = {
    "corrupt": "._core",
    "nominal_size": "._core",
    "load_cifar_batches": ".datasets",
    "load_image_folder": ".datasets",
    "load_source": ".datasets",
    "write_cifar_c": ".datasets",
    "write_imagenet_c": ".datasets",
}

__all__ = ["ALL_CORRUPTIONS", "CORRUPTIONS", "EXTRA_CORRUPTIONS", "PRESETS", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'corruptions' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
