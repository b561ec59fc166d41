from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tta_norm.data import (
    ArrayDataset,
    DataFormatError,
    check_cifar_c,
    data_search_dirs,
    find_dataset_dir,
    list_image_folder,
    read_cifar10_python,
    read_cifar100_python,
    read_cifar_c,
    read_image_folder,
    read_imagenet_c,
)
from tta_norm.data.readers import is_image_folder_split, npy_header

# ---------------------------------------------------------------------------------------------------- search paths

pytestmark = pytest.mark.usefixtures("_isolated_cache")  # tests here write to the cache


def test_search_order(monkeypatch, tmp_path):
    monkeypatch.delenv("TTA_NORM_DATA", raising=False)
    assert data_search_dirs(tmp_path) == [tmp_path]  # an explicit directory is searched alone
    monkeypatch.setenv("TTA_NORM_DATA", os.pathsep.join([str(tmp_path / "a"), str(tmp_path / "b")]))
    assert data_search_dirs() == [tmp_path / "a", tmp_path / "b"]
    monkeypatch.delenv("TTA_NORM_DATA")
    defaults = data_search_dirs()
    assert defaults[0] == Path.cwd() / "data" and Path.cwd().parent / "shared" / "data" in defaults


def test_default_search_finds_mirror_from_any_cwd(mirror_root, monkeypatch, tmp_path):
    """A fresh clone beside shared/ finds shared/data/cifar10-jpeg without flags, whatever the cwd."""
    monkeypatch.delenv("TTA_NORM_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "test" / "some_class").mkdir(parents=True)  # ./data is a container, not a dataset
    found = find_dataset_dir(["cifar10-jpeg"], is_image_folder_split)
    assert found is not None and found.resolve() == mirror_root.resolve()
    # --data-dir may point at the dataset itself or at its parent
    assert find_dataset_dir(["cifar10-jpeg"], is_image_folder_split, mirror_root) == mirror_root
    assert find_dataset_dir(["cifar10-jpeg"], is_image_folder_split, mirror_root.parent) == mirror_root
    assert find_dataset_dir(["cifar10-jpeg"], is_image_folder_split, tmp_path / "nothing") is None
    assert find_dataset_dir(["cifar10-jpeg"], is_image_folder_split, tmp_path / "data") == tmp_path / "data"


# ------------------------------------------------------------------------------------------------- ImageFolder


def test_mirror_image_folder_small(mirror_root, mirror_test_small, tmp_path):
    ds = mirror_test_small
    assert ds.images.shape == (300, 32, 32, 3) and ds.images.dtype == np.uint8
    assert ds.labels.dtype == np.int64 and np.bincount(ds.labels).tolist() == [30] * 10
    assert ds.classes[:3] == ("airplane", "automobile", "bird")
    files, _, _ = list_image_folder(mirror_root / "test", max_per_class=30)
    for i in (0, 31, 299):  # decoded pixels equal PIL's
        assert np.array_equal(ds.images[i], np.asarray(Image.open(files[i]).convert("RGB")))
    # the cache is reused (memory-mapped) and identical; disabling the cache gives the same arrays
    again = read_image_folder(mirror_root / "test", max_per_class=30, cache_dir=Path(ds.info["cache"]).parent,
                              progress=False)  # fmt: skip
    assert isinstance(again.images, np.memmap) and np.array_equal(again.images, ds.images)
    fresh = read_image_folder(mirror_root / "test", max_per_class=30, cache=False, progress=False)
    assert np.array_equal(fresh.images, ds.images) and np.array_equal(fresh.labels, ds.labels)


def _write_png_tree(root: Path, classes, n, size=(6, 5), seed=0):
    rng = np.random.default_rng(seed)
    pixels = {}
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(img).save(root / c / f"img{i:03d}.png")
            pixels[f"{c}/img{i:03d}.png"] = img
    return pixels


def test_image_folder_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_image_folder(tmp_path / "missing", cache=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataFormatError, match="class sub-directories"):
        read_image_folder(tmp_path / "empty", cache=False)
    _write_png_tree(tmp_path / "mixed", ["a"], 1, size=(6, 5))
    Image.fromarray(np.zeros((7, 7, 3), np.uint8)).save(tmp_path / "mixed" / "a" / "zz.png")
    with pytest.raises(DataFormatError, match="size="):
        read_image_folder(tmp_path / "mixed", cache=False, progress=False)
    ok = read_image_folder(tmp_path / "mixed", cache=False, progress=False, size=4)
    assert ok.images.shape == (2, 4, 4, 3)


# ----------------------------------------------------------------------------------- torchvision CIFAR pickles


def _cifar_rows(images_nhwc: np.ndarray) -> np.ndarray:
    return images_nhwc.transpose(0, 3, 1, 2).reshape(len(images_nhwc), -1)


def test_cifar10_python_reader(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
        y = rng.integers(0, 10, 7).tolist()
        batches[name] = (x, y)
        # torchvision's files are Python-2 pickles whose keys read back as bytes
        with open(root / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"data": _cifar_rows(x), b"labels": y}, f)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}" for i in range(10)]}, f)
    test = read_cifar10_python(root, "test")
    assert np.array_equal(test.images, batches["test_batch"][0]) and test.labels.dtype == np.int64
    assert test.labels.tolist() == batches["test_batch"][1] and test.classes[0] == "c0"
    train = read_cifar10_python(root, "train")
    assert len(train) == 35 and np.array_equal(train.images[7:14], batches["data_batch_2"][0])
    # the channel-major row layout: pixel (h=1, w=2) of channel 0 is column 1 * 32 + 2
    assert test.images[0, 1, 2, 0] == _cifar_rows(batches["test_batch"][0])[0, 34]
    # truncated / inconsistent files
    data = (root / "test_batch").read_bytes()
    (root / "test_batch").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataFormatError, match="truncated"):
        read_cifar10_python(root, "test")
    with open(root / "test_batch", "wb") as f:
        pickle.dump({"data": _cifar_rows(batches["test_batch"][0]), "labels": [0, 1]}, f)
    with pytest.raises(DataFormatError, match="7 images but 2 labels"):
        read_cifar10_python(root, "test")
    (root / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        read_cifar10_python(root, "train")


def test_cifar100_python_reader(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    x = rng.integers(0, 256, (9, 32, 32, 3), dtype=np.uint8)
    fine, coarse = rng.integers(0, 100, 9).tolist(), rng.integers(0, 20, 9).tolist()
    with open(root / "test", "wb") as f:
        pickle.dump({"data": _cifar_rows(x), "fine_labels": fine, "coarse_labels": coarse}, f)
    with open(root / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"f{i}" for i in range(100)], "coarse_label_names": []}, f)
    ds = read_cifar100_python(root, "test")
    assert np.array_equal(ds.images, x) and ds.labels.tolist() == fine and len(ds.classes) == 100
    assert read_cifar100_python(root, "test", "coarse").labels.tolist() == coarse


# --------------------------------------------------------------------------------------------- CIFAR-C release


def _write_cifar_c(root: Path, corruptions, n=4, seed=0, label_dtype=np.uint8):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    labels = np.tile(rng.integers(0, 10, n), 5).astype(label_dtype)
    np.save(root / "labels.npy", labels)
    arrays = {}
    for c in corruptions:
        arrays[c] = rng.integers(0, 256, (5 * n, 32, 32, 3), dtype=np.uint8)
        np.save(root / f"{c}.npy", arrays[c])
    return arrays, labels


def test_cifar_c_reader_severity_blocks(tmp_path):
    root = tmp_path / "CIFAR-10-C"
    arrays, labels = _write_cifar_c(root, ["fog", "snow"])
    assert check_cifar_c(root, ["fog", "snow"]) == 4
    out = read_cifar_c(root, "fog", (1, 3, 5))
    assert set(out) == {1, 3, 5}
    assert np.array_equal(out[3].images, arrays["fog"][8:12])
    assert out[3].labels.dtype == np.int64 and out[3].labels.tolist() == labels[8:12].tolist()
    assert out[5].source.endswith("fog.npy:s5")
    with pytest.raises(ValueError):
        read_cifar_c(root, "fog", (6,))


def test_cifar_c_missing_and_truncated_files(tmp_path):
    root = tmp_path / "CIFAR-10-C"
    _write_cifar_c(root, ["fog", "snow"])
    with pytest.raises(FileNotFoundError, match="frost.npy"):
        check_cifar_c(root, ["fog", "frost"])
    path = root / "snow.npy"
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(DataFormatError, match="truncated"):
        check_cifar_c(root, ["fog", "snow"])
    with pytest.raises(DataFormatError, match="truncated"):
        read_cifar_c(root, "snow")
    path.write_bytes(b"garbage")
    with pytest.raises(DataFormatError, match="not a valid .npy"):
        npy_header(path)


def test_cifar_c_count_and_dtype_mismatch(tmp_path):
    root = tmp_path / "CIFAR-10-C"
    _write_cifar_c(root, ["fog"])
    np.save(root / "labels.npy", np.zeros(15, np.uint8))
    with pytest.raises(DataFormatError, match="20 images but labels.npy has 15 labels"):
        check_cifar_c(root, ["fog"])
    np.save(root / "labels.npy", np.zeros(20, np.uint8))
    np.save(root / "fog.npy", np.zeros((20, 32, 32, 3), np.float32))
    with pytest.raises(DataFormatError, match="uint8"):
        check_cifar_c(root, ["fog"])
    np.save(root / "fog.npy", np.zeros((18, 32, 32, 3), np.uint8))
    np.save(root / "labels.npy", np.zeros(18, np.uint8))
    with pytest.raises(DataFormatError, match="severity blocks"):
        check_cifar_c(root, ["fog"])


def test_array_dataset_validates():
    with pytest.raises(DataFormatError):
        ArrayDataset(np.zeros((3, 2, 2, 3), np.uint8), np.zeros(2))
    with pytest.raises(DataFormatError):
        ArrayDataset(np.zeros((3, 2, 2, 3), np.float32), np.zeros(3))
    ds = ArrayDataset(np.zeros((3, 2, 2, 3), np.uint8), np.array([1, 2, 3], np.uint8))
    assert ds.labels.dtype == np.int64 and len(ds.head(2)) == 2 and len(ds.subset([0, 2])) == 2


# ------------------------------------------------------------------------------------------------- ImageNet-C


def test_imagenet_c_folders(tmp_path):
    root = tmp_path / "ImageNet-C"
    pixels = _write_png_tree(root / "fog" / "3", ["n01440764", "n01443537"], 3)
    ds = read_imagenet_c(root, "fog", 3, cache_dir=tmp_path / "cache", progress=False)
    assert ds.images.shape == (6, 5, 6, 3) and ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert np.array_equal(ds.images[4], pixels["n01443537/img001.png"])
    assert ds.info["severity"] == 3 and ds.source.startswith("release:")
    sub = read_imagenet_c(root, "fog", 3, ids=["n01443537/img002.png", "n01440764/img000.png"], cache=False,
                          progress=False)  # fmt: skip
    assert sub.labels.tolist() == [1, 0]  # in the order of the ids (robustbench's list order)
    assert np.array_equal(sub.images[0], pixels["n01443537/img002.png"])
    with pytest.raises(DataFormatError, match="ids requested"):
        read_imagenet_c(root, "fog", 3, ids=["n01440764/nope.png"], cache=False, progress=False)
    with pytest.raises(FileNotFoundError, match="layout"):
        read_imagenet_c(root, "fog", 4, cache=False)
