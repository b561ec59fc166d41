"""Synthetic ImageFolder trees for the data tests, an isolated cache, and a decoder-call counter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("TTA_NORM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TTA_NORM_DATA", raising=False)


def write_tree(root: Path, classes, n_per_class, size=(6, 5), seed=0, ext="png") -> dict[str, np.ndarray]:
    """``root/<class>/img<i>.<ext>`` with random pixels; ``n_per_class`` an int or one count per class."""
    rng = np.random.default_rng(seed)
    counts = [n_per_class] * len(classes) if isinstance(n_per_class, int) else list(n_per_class)
    pixels = {}
    for c, n in zip(classes, counts, strict=True):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            name = f"img{i:03d}.{ext}"
            Image.fromarray(img).save(root / c / name)
            pixels[f"{c}/{name}"] = img
    return pixels


@pytest.fixture
def decode_counter(monkeypatch):
    """Counts calls of the ImageFolder decoder (one per decoded image)."""
    from tta_norm.data import readers

    calls = []
    real = readers._decode

    def counting(path, *args, **kwargs):
        calls.append(Path(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(readers, "_decode", counting)
    return calls
