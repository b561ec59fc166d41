"""Frost textures: the original's image files, taken from the installed ``imagecorruptions`` wheel.

The files ``frost1.png`` .. ``frost6.jpg`` in ``imagecorruptions/frost/`` are byte-identical to the ones in
``hendrycks/robustness/ImageNet-C/create_c``. The package is located with ``importlib.util.find_spec``,
which does not execute its ``__init__`` (that module imports ``pkg_resources`` and OpenCV). As in the
original, only the first five files are ever used (``np.random.randint(5)``).
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np

from ._common import require_cv2

FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg", "frost6.jpg")
N_USED = 5  # the original draws randint(5): frost6.jpg is never used

_INSTALL_HINT = (
    "the frost corruption needs the frost texture files shipped with the 'imagecorruptions' package; "
    "install it with `pip install imagecorruptions` (or `pip install tta-norm[corruptions]`)"
)


def frost_dir() -> Path:
    """Directory holding the frost texture files; raises ``RuntimeError`` with install advice if missing."""
    spec = importlib.util.find_spec("imagecorruptions")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(_INSTALL_HINT)
    for loc in spec.submodule_search_locations:
        d = Path(loc) / "frost"
        if all((d / f).is_file() for f in FROST_FILES[:N_USED]):
            return d
    raise RuntimeError(f"'imagecorruptions' is installed but its frost files are missing; {_INSTALL_HINT}")


@functools.lru_cache(maxsize=4)
def frost_textures(scale: float | None) -> tuple[np.ndarray, ...]:
    """The five usable textures as RGB uint8 arrays, read like the original.

    ``cv2.imread`` (BGR), optionally ``cv2.resize(fx=fy=scale)`` with the default INTER_LINEAR (CIFAR uses
    0.2), then flipped to RGB (the original flips the crop; flipping first is the same).
    """
    cv2 = require_cv2()

    d = frost_dir()
    out = []
    for name in FROST_FILES[:N_USED]:
        img = cv2.imread(str(d / name))
        if img is None:
            raise RuntimeError(f"could not read frost texture {d / name}")
        if scale is not None:
            img = cv2.resize(img, (0, 0), fx=scale, fy=scale)
        out.append(np.ascontiguousarray(img[..., ::-1]))
    return tuple(out)
