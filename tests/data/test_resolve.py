"""``resolve_benchmark_source``: where the data would come from, checked without decoding any image."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from tests.data.conftest import write_tree
from tta_norm.data import resolve_benchmark_source
from tta_norm.data.imagenet_classes import IMAGENET_R_WNIDS, IMAGENET_WNIDS


def test_resolve_imagenet_c_and_natural_shift(tmp_path, decode_counter):
    write_tree(tmp_path / "ImageNet-C" / "fog" / "5", IMAGENET_WNIDS[:2], 2)
    assert resolve_benchmark_source("imagenet", ["fog"], [5], data_dir=tmp_path) == (
        f"imagenet: release {tmp_path / 'ImageNet-C'}"
    )
    with pytest.raises(FileNotFoundError, match="lacks fog/3"):
        resolve_benchmark_source("imagenet", ["fog"], [3, 5], data_dir=tmp_path)
    (tmp_path / "ids.txt").write_text(f"{IMAGENET_WNIDS[0]}/img000.png\n")
    assert "1 listed images" in resolve_benchmark_source("imagenet", ["fog"], [5], data_dir=tmp_path,
                                                         imagenet_ids=str(tmp_path / "ids.txt"))  # fmt: skip
    with pytest.raises(FileNotFoundError, match="imagenet_r release folder"):
        resolve_benchmark_source("imagenet_r", data_dir=tmp_path)
    write_tree(tmp_path / "imagenet-r", IMAGENET_R_WNIDS[:1], 1)
    assert resolve_benchmark_source("imagenet-r", data_dir=tmp_path).startswith("imagenet_r: release")
    # the dry run refuses what the loader refuses
    with pytest.raises(ValueError, match="imagenet_r cannot be regenerated"):
        resolve_benchmark_source("imagenet_r", data_dir=tmp_path, source="regenerate")
    with pytest.raises(ValueError, match="natural-shift sets use n_examples"):
        resolve_benchmark_source("imagenet_r", data_dir=tmp_path, imagenet_ids=str(tmp_path / "ids.txt"))
    assert decode_counter == []  # nothing decoded


def test_resolve_cifar_release_and_errors(tmp_path):
    root = tmp_path / "CIFAR-10-C"
    root.mkdir()
    np.save(root / "labels.npy", np.zeros(10, np.uint8))
    np.save(root / "fog.npy", np.zeros((10, 32, 32, 3), np.uint8))
    assert resolve_benchmark_source("cifar10", ["fog"], [5], data_dir=tmp_path) == f"cifar10: release {root}"
    with pytest.raises(FileNotFoundError, match="snow.npy"):
        resolve_benchmark_source("cifar10", ["snow"], [5], data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="no clean cifar100 test set"):
        resolve_benchmark_source("cifar100", ["fog"], [5], data_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown dataset"):
        resolve_benchmark_source("mnist")


def test_a_download_goes_where_the_search_finds_it(tmp_path, monkeypatch):
    import tta_norm.data.benchmark as benchmark
    from tta_norm.data.paths import data_search_dirs

    saved = []

    def fake_download(dataset, dest, **kwargs):
        saved.append(Path(dest))
        raise FileNotFoundError("offline")

    monkeypatch.setattr(benchmark, "download_cifar_c", fake_download)
    first, second = tmp_path / "a", tmp_path / "b"
    monkeypatch.setenv("TTA_NORM_DATA", f"{first}{os.pathsep}{second}")
    monkeypatch.setenv("TTA_NORM_CACHE", str(tmp_path / "cache"))
    for data_dir in (None, tmp_path / "explicit"):
        with pytest.raises(FileNotFoundError, match="offline"):
            benchmark.load_corruption_benchmark("cifar10", ["fog"], [5], data_dir=data_dir, source="release",
                                                download=True, progress=False)  # fmt: skip
        assert saved[-1] in data_search_dirs(data_dir)
    assert saved == [first, tmp_path / "explicit"]
