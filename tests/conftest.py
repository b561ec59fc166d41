"""Fixtures shared across the test packages: a small slice of the JPEG mirror, the released checkpoints and a
throw-away cache for tests that write decoded arrays, regenerated data or checkpoints (``_isolated_cache``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tta_norm.data.paths import default_data_dirs, model_search_dirs


@pytest.fixture(scope="session")
def _session_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tta-norm-cache")


@pytest.fixture()
def _isolated_cache(_session_cache, monkeypatch):
    """Decoded arrays, regenerated data and checkpoints written by tests go to a temporary cache."""
    monkeypatch.setenv("TTA_NORM_CACHE", str(_session_cache))
    monkeypatch.delenv("TTA_NORM_CHECKPOINTS", raising=False)
    monkeypatch.delenv("TTA_NORM_DATA", raising=False)


def _mirror_root() -> Path | None:
    for d in default_data_dirs():
        cand = d / "cifar10-jpeg"
        if (cand / "test").is_dir():
            return cand
    return None


@pytest.fixture(scope="session")
def mirror_root() -> Path:
    root = _mirror_root()
    if root is None:
        pytest.skip("the CIFAR-10 JPEG mirror (../shared/data/cifar10-jpeg) is not available")
    return root


@pytest.fixture(scope="session")
def resnet20_checkpoint() -> Path:
    for d in model_search_dirs():
        hits = sorted(d.glob("resnet20-*.th")) if d.is_dir() else []
        if hits:
            return hits[0]
    pytest.skip("the released resnet20 checkpoint (../shared/models) is not available")


@pytest.fixture(scope="session")
def mirror_test_small(mirror_root, tmp_path_factory):
    """30 test images per class (300) of the mirror, decoded into a throw-away cache."""
    from tta_norm.data import read_image_folder

    cache = tmp_path_factory.mktemp("imagefolder-cache")
    return read_image_folder(mirror_root / "test", max_per_class=30, cache_dir=cache, progress=False)
