"""CIFAR-10-C / ImageNet-C corruption generators: a faithful, fast re-implementation.

Re-implements the 15 benchmark corruptions and the 4 extra ones of D. Hendrycks and T. Dietterich,
"Benchmarking Neural Network Robustness to Common Corruptions and Perturbations" (ICLR 2019), following
the original generators (``make_cifar_c.py``, ``make_imagenet_c.py``) step by step, including their quirks,
but vectorized over batches and parallel across blocks of images. Standalone: it does not import
``tta_norm``.

>>> from corruptions import corrupt, CORRUPTIONS
>>> out = corrupt(images, "glass_blur", severity=5, seed=0, preset="cifar")  # doctest: +SKIP

Datasets in the released layouts: :func:`write_cifar_c` (``<name>.npy`` + ``labels.npy``) and
:func:`write_imagenet_c` (``<name>/<severity>/<class>/<file>`` JPEGs); readers :func:`load_cifar_batches`
and :func:`load_image_folder`.
"""

from ._core import ALL_CORRUPTIONS, CORRUPTIONS, EXTRA_CORRUPTIONS, corrupt, nominal_size
from ._params import PRESETS
from .datasets import load_cifar_batches, load_image_folder, load_source, write_cifar_c, write_imagenet_c

__all__ = [
    "ALL_CORRUPTIONS",
    "CORRUPTIONS",
    "EXTRA_CORRUPTIONS",
    "PRESETS",
    "corrupt",
    "load_cifar_batches",
    "load_image_folder",
    "load_source",
    "nominal_size",
    "write_cifar_c",
    "write_imagenet_c",
]
