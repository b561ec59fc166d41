"""Labels follow class names, never a folder's position among stray folders; a data directory is never read as
another dataset; severity blocks and label ranges are checked against the release layout."""

from __future__ import annotations

import numpy as np
import pytest

from tta_norm.data import DataFormatError, load_corruption_benchmark, read_image_folder, read_imagenet_c
from tta_norm.data.benchmark import load_clean_test_set, resolve_benchmark_source
from tta_norm.data.natural import find_natural_shift
from tta_norm.data.readers import CIFAR10_CLASSES, check_cifar_c
from tta_norm.data.source import load_split

from .test_data import _write_cifar_c, _write_png_tree


def test_imagenet_c_labels_are_wnid_indices_whatever_else_is_in_the_folder(tmp_path):
    root = tmp_path / "ImageNet-C"
    folder = root / "fog" / "3"
    _write_png_tree(folder, ["n01440764", "n15075141"], 2)  # ImageNet indices 0 and 999
    (folder / ".ipynb_checkpoints").mkdir()  # hidden: never a class
    (folder / ".ipynb_checkpoints" / "x.png").write_bytes(b"")
    ds = read_imagenet_c(root, "fog", 3, cache=False, progress=False)
    assert ds.labels.tolist() == [0, 0, 999, 999]
    (folder / "__MACOSX").mkdir()
    (folder / "__MACOSX" / "._img000.png").write_bytes(b"")
    with pytest.raises(DataFormatError, match="__MACOSX"):  # not a wnid: refused, not a shift of every label
        read_imagenet_c(root, "fog", 3, cache=False, progress=False)


def test_folder_positions_refuse_empty_folders_and_skip_hidden_ones(tmp_path):
    _write_png_tree(tmp_path / "t", ["a", "b"], 2)
    (tmp_path / "t" / ".cache").mkdir()
    assert read_image_folder(tmp_path / "t", cache=False, progress=False).labels.tolist() == [0, 0, 1, 1]
    (tmp_path / "t" / "0_stray").mkdir()
    (tmp_path / "t" / "0_stray" / ".hidden.png").write_bytes(b"")
    with pytest.raises(DataFormatError, match="0_stray"):
        read_image_folder(tmp_path / "t", cache=False, progress=False)


def test_the_cifar10_mirror_is_labelled_by_class_name(tmp_path):
    data = tmp_path / "data"
    pixels = _write_png_tree(data / "cifar10-jpeg" / "test", ["cat", "truck"], 2, size=(32, 32))  # no airplane...
    _write_png_tree(data / "cifar10-jpeg" / "train", ["cat", "truck"], 1, size=(32, 32))
    (data / "cifar10-jpeg" / "test" / ".ipynb_checkpoints").mkdir()
    clean = load_clean_test_set("cifar10", data, progress=False)
    by_image = {bytes(img): int(y) for img, y in zip(clean.images, clean.labels, strict=True)}
    for name, img in pixels.items():
        assert by_image[bytes(img)] == CIFAR10_CLASSES.index(name.split("/")[0])
    assert sorted(load_split(data / "cifar10-jpeg", "train", progress=False).labels.tolist()) == [3, 9]
    _write_png_tree(data / "cifar10-jpeg" / "test", ["kitten"], 1, size=(32, 32))
    with pytest.raises(DataFormatError, match="kitten"):
        load_clean_test_set("cifar10", data, progress=False)


def test_a_file_with_fewer_severities_is_not_read_as_five_blocks(tmp_path):
    root = tmp_path / "CIFAR-10-C"
    _write_cifar_c(root, ["fog"], n=4)
    assert check_cifar_c(root, ["fog"]) == 4
    labels = np.random.default_rng(0).integers(0, 10, 20).astype(np.uint8)  # 20 test labels, one severity
    labels[:4] = labels[4:8] + 1 - 2 * (labels[4:8] == 9)  # (blocks differ)
    np.save(root / "labels.npy", labels)
    with pytest.raises(DataFormatError, match="not one block of 4 repeated"):
        check_cifar_c(root, ["fog"])


def test_a_release_of_another_dataset_is_never_taken_for_this_one(tmp_path, monkeypatch):
    _write_cifar_c(tmp_path / "CIFAR-10-C", ["fog"], n=4)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_corruption_benchmark("cifar100", ["fog"], data_dir=tmp_path / "CIFAR-10-C", source="release")
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_benchmark_source("cifar100", ["fog"], data_dir=tmp_path / "CIFAR-10-C", source="release")
    _write_cifar_c(tmp_path / "CIFAR-100-C", ["fog"], n=4, seed=1)
    monkeypatch.setenv("TTA_NORM_DATA", f"{tmp_path / 'CIFAR-10-C'}:{tmp_path / 'CIFAR-100-C'}")
    bench = load_corruption_benchmark("cifar100", ["fog"], source="release", progress=False)
    assert "CIFAR-100-C" in bench.describe()
    monkeypatch.delenv("TTA_NORM_DATA")
    for name in ("imagenet-r", "ImageNet-Sketch"):
        _write_png_tree(tmp_path / name, ["n01443537"], 1)
    monkeypatch.setenv("TTA_NORM_DATA", f"{tmp_path / 'imagenet-r'}:{tmp_path / 'ImageNet-Sketch'}")
    assert find_natural_shift("imagenet_sketch").name == "ImageNet-Sketch"
    assert find_natural_shift("imagenet_r").name == "imagenet-r"


def test_labels_outside_the_class_range_are_refused(tmp_path):
    root = tmp_path / "CIFAR-10-C"
    _write_cifar_c(root, ["fog"], n=4)
    np.save(root / "labels.npy", np.tile(np.array([0, 3, 250, 9], np.uint8), 5))
    with pytest.raises(DataFormatError, match="outside 0..9"):
        load_corruption_benchmark("cifar10", ["fog"], data_dir=tmp_path, source="release", progress=False)


def test_a_cifar10_release_read_as_cifar100_is_refused(tmp_path):
    """Labels 0..9 are in CIFAR-100's range; 1,000 images of only 10 of its 100 classes are not CIFAR-100-C."""
    root = tmp_path / "some-release"
    _write_cifar_c(root, ["fog"], n=1000)
    with pytest.raises(DataFormatError, match="1000 images of only 10 of its 100 classes"):
        load_corruption_benchmark("cifar100", ["fog"], data_dir=root, source="release", progress=False)
    bench = load_corruption_benchmark("cifar10", ["fog"], data_dir=root, source="release", progress=False)
    assert len(bench.domains[("fog", 5)]) == 1000
    small = load_corruption_benchmark("cifar100", ["fog"], data_dir=root, source="release", n_examples=500,
                                      progress=False)  # fmt: skip  (a small subset may miss classes: allowed)
    assert len(small.domains[("fog", 5)]) == 500


@pytest.mark.parametrize("wh", [(640, 427), (300, 299), (257, 999), (259, 300), (256, 256)])
def test_resize_and_crop_equal_torchvisions_evaluation_transform(tmp_path, wh):
    from PIL import Image
    from torchvision import transforms

    from tta_norm.data.readers import decode_images

    rng = np.random.default_rng(sum(wh))
    base = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)  # smooth content: a difference is a geometry one
    image = Image.fromarray(base).resize(wh, Image.BILINEAR)
    image.save(tmp_path / "a.png")
    expected = np.asarray(transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224)])(image))
    out = decode_images([tmp_path / "a.png"], size=256, crop=224, progress=False)[0]
    assert np.array_equal(out, expected)


def test_a_broken_image_or_a_pickled_array_is_named_in_the_error(tmp_path):
    _write_png_tree(tmp_path / "t", ["a"], 2)
    path = tmp_path / "t" / "a" / "img001.png"
    path.write_bytes(path.read_bytes()[:60])  # truncated
    with pytest.raises(DataFormatError, match="img001.png"):
        read_image_folder(tmp_path / "t", cache=False, progress=False)
    root = tmp_path / "CIFAR-10-C"
    _write_cifar_c(root, ["fog"], n=4)
    np.save(root / "fog.npy", np.empty(20, dtype=object), allow_pickle=True)
    with pytest.raises(DataFormatError, match="Python objects"):
        check_cifar_c(root, ["fog"])


def test_an_imagenet_c_directory_given_explicitly_may_have_any_name(tmp_path):
    _write_png_tree(tmp_path / "in-c-5k" / "fog" / "3", ["n01440764"], 2)
    assert resolve_benchmark_source("imagenet", ["fog"], [3], data_dir=tmp_path / "in-c-5k").endswith("in-c-5k")
    with pytest.raises(FileNotFoundError, match="not found"):  # a container is searched by the usual names
        resolve_benchmark_source("imagenet", ["fog"], [3], data_dir=tmp_path)
    _write_png_tree(tmp_path / "imagenet_c" / "fog" / "3", ["n01440764"], 2)
    assert resolve_benchmark_source("imagenet", ["fog"], [3], data_dir=tmp_path).endswith("imagenet_c")
