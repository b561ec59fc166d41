"""Shared fixtures for the corruptions tests: a small varied image batch and a recording RNG."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

SHARED_TEST = Path(__file__).resolve().parents[3] / "shared" / "data" / "cifar10-jpeg" / "test"


def make_images(n_real: int = 6, seed: int = 0, size: tuple[int, int] = (32, 32)) -> np.ndarray:
    """Synthetic 32x32 images covering the cases that matter for exactness (flat, saturated, black,
    gradients, edges, noise), plus a few real CIFAR-10 test images when ../shared is present."""
    h, w = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    imgs = [
        np.full((h, w, 3), 128, np.uint8),
        np.full((h, w, 3), 255, np.uint8),
        np.zeros((h, w, 3), np.uint8),
        np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), (xx + yy) * 255 // (h + w - 2)], -1).astype(
            np.uint8
        ),
        np.where(((xx // 8 + yy // 8) % 2)[..., None] == 1, [250, 30, 60], [10, 200, 240]).astype(np.uint8),
        rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
        np.clip(rng.normal(100, 40, (h, w, 3)), 0, 255).astype(np.uint8),
    ]
    imgs[6][: h // 2] = (255, 255, 255)  # a saturated region next to texture
    if SHARED_TEST.is_dir() and size == (32, 32):
        from PIL import Image

        all_files = sorted(SHARED_TEST.glob("*/*.jpg"))
        files = all_files[:: max(1, len(all_files) // n_real)][:n_real]
        imgs += [np.asarray(Image.open(f).convert("RGB")) for f in files]
    else:
        for _ in range(n_real):
            base = rng.integers(0, 256, (4, 4, 3)).astype(np.float64)
            up = np.kron(base, np.ones((h // 4 + 1, w // 4 + 1, 1)))[:h, :w]
            imgs.append(np.clip(up + rng.normal(0, 8, up.shape), 0, 255).astype(np.uint8))
    return np.stack(imgs)


@pytest.fixture(scope="session")
def images() -> np.ndarray:
    return make_images()


class Recorder:
    """Wraps a numpy Generator and records every array it returns, in call order, by method name."""

    def __init__(self, seed: int = 0):
        self._rng = np.random.default_rng(seed)
        self.calls: list[tuple[str, np.ndarray]] = []

    def __getattr__(self, name):
        fn = getattr(self._rng, name)

        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            self.calls.append((name, np.asarray(out)))
            return out

        return wrapped

    def draws(self, name: str) -> list[np.ndarray]:
        return [a for n, a in self.calls if n == name]
