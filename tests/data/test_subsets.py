"""Seeded class-stratified subsets chosen before decoding, and robustbench-style id lists."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from tests.data.conftest import write_tree
from tta_norm.data import load_corruption_benchmark, read_image_folder, read_imagenet_c
from tta_norm.data.imagenet_classes import IMAGENET_WNIDS, imagenet_index
from tta_norm.data.subsets import read_image_ids, stratified_subset


def test_stratified_subset_equal_classes():
    labels = np.repeat(np.arange(10), 50)  # class-sorted, like an ImageNet-C folder
    idx = stratified_subset(labels, 30, seed=0)
    assert len(idx) == 30 and len(set(idx.tolist())) == 30
    assert np.bincount(labels[idx], minlength=10).tolist() == [3] * 10
    assert len(set(labels[idx[:10]].tolist())) >= 5  # prefixes mix classes (sorted input: 1 class)
    assert np.array_equal(idx, stratified_subset(labels, 30, seed=0))
    assert not np.array_equal(idx, stratified_subset(labels, 30, seed=1))
    few = stratified_subset(labels, 4, seed=3)
    assert len(set(labels[few].tolist())) == 4  # fewer images than classes: distinct classes
    counts = np.bincount(labels[stratified_subset(labels, 25, seed=0)], minlength=10)
    assert sorted(counts.tolist()) == [2] * 5 + [3] * 5


def test_stratified_subset_proportional_and_checked():
    labels = np.array([0] * 60 + [1] * 30 + [2] * 10)
    counts = np.bincount(labels[stratified_subset(labels, 10, seed=0)], minlength=3)
    assert counts.tolist() == [6, 3, 1]
    assert sorted(stratified_subset(labels, 100, seed=0).tolist()) == list(range(100))
    for bad in (0, 101, 2.5, True):
        with pytest.raises(ValueError, match="n_examples"):
            stratified_subset(labels, bad)


def test_image_folder_subset_decodes_only_selected(tmp_path, decode_counter):
    classes = [f"c{i}" for i in range(6)]
    pixels = write_tree(tmp_path / "tree", classes, 8)
    ds = read_image_folder(tmp_path / "tree", n_examples=12, seed=0, progress=False)
    assert len(ds) == 12 and len(decode_counter) == 12  # 12 of 48 images decoded
    assert np.bincount(ds.labels, minlength=6).tolist() == [2] * 6  # every class covered equally
    for img, path in zip(ds.images, decode_counter, strict=True):
        assert np.array_equal(img, pixels[f"{path.parent.name}/{path.name}"])
    assert ds.info["subset"] == "stratified n=12 seed=0" and ds.info["n_listed"] == 48
    again = read_image_folder(tmp_path / "tree", n_examples=12, seed=0, progress=False)
    assert len(decode_counter) == 12 and np.array_equal(again.images, ds.images)  # served from the cache
    other = read_image_folder(tmp_path / "tree", n_examples=12, seed=1, progress=False)
    assert not np.array_equal(other.labels, ds.labels) or not np.array_equal(other.images, ds.images)


def _imagenet_c(root, corruptions=("fog", "snow"), severities=(5,), n=6, seed=0):
    wnids = list(IMAGENET_WNIDS[:3]) + [IMAGENET_WNIDS[500]]
    for c in corruptions:
        for s in severities:
            write_tree(root / c / str(s), wnids, n, seed=seed + len(c) + s)
    return wnids


def test_imagenet_c_labels_are_imagenet_indices(tmp_path):
    wnids = _imagenet_c(tmp_path / "ImageNet-C")
    ds = read_imagenet_c(tmp_path / "ImageNet-C", "fog", 5, cache=False, progress=False)
    assert sorted(set(ds.labels.tolist())) == [0, 1, 2, 500]
    assert ds.classes[500] == wnids[3] and len(ds.classes) == 1000


def test_imagenet_c_benchmark_subset_before_decoding(tmp_path, decode_counter):
    _imagenet_c(tmp_path / "ImageNet-C")
    bench = load_corruption_benchmark("imagenet", ["fog", "snow"], [5], data_dir=tmp_path, n_examples=8, seed=0,
                                      progress=False)  # fmt: skip
    assert len(decode_counter) == 16  # 8 images in each of 2 domains, of 24 per domain
    fog, snow = bench.domains[("fog", 5)], bench.domains[("snow", 5)]
    assert np.array_equal(fog.labels, snow.labels)  # the same images in every domain
    names = [(p.parent.name, p.name) for p in decode_counter]
    assert names[:8] == names[8:]
    assert np.bincount(fog.labels, minlength=1000)[[0, 1, 2, 500]].tolist() == [2, 2, 2, 2]
    assert len(set(fog.labels[:4].tolist())) >= 2  # class-mixed order, not a class-sorted prefix


def test_every_imagenet_c_domain_reads_the_same_files_or_fails(tmp_path, decode_counter):
    from tta_norm.data.benchmark import imagenet_c_subset

    _imagenet_c(tmp_path / "ImageNet-C")
    chosen, _ = imagenet_c_subset(tmp_path / "ImageNet-C" / "fog" / "5", 8, seed=0)
    snow = tmp_path / "ImageNet-C" / "snow" / "5"
    left_out = next(f"{p.parent.name}/{p.name}" for p in sorted(snow.rglob("*.png"))
                    if f"{p.parent.name}/{p.name}" not in chosen)  # fmt: skip
    (snow / left_out).unlink()  # a partly extracted release: one file missing in one domain
    bench = load_corruption_benchmark("imagenet", ["fog", "snow"], [5], data_dir=tmp_path, n_examples=8, seed=0,
                                      progress=False)  # fmt: skip
    read = [(p.parent.parent.parent.name, f"{p.parent.name}/{p.name}") for p in decode_counter]
    assert [f for d, f in read if d == "fog"] == [f for d, f in read if d == "snow"] == chosen
    assert "the same stratified n=8 seed=0 in every domain" in bench.describe()
    (snow / chosen[0]).unlink()  # now the subset itself lacks a file in one domain: loud, not another subset
    with pytest.raises(Exception, match="8 ids requested but only 7 files found"):
        load_corruption_benchmark("imagenet", ["fog", "snow"], [5], data_dir=tmp_path, n_examples=8, seed=0,
                                  progress=False)  # fmt: skip
    with pytest.raises(Exception, match="requested but only"):  # every file: the same listing in every domain
        load_corruption_benchmark("imagenet", ["fog", "snow"], [5], data_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="listed twice"):
        load_corruption_benchmark("imagenet", ["fog"], [5], data_dir=tmp_path, progress=False,
                                  imagenet_ids=[chosen[1]] * 2)  # fmt: skip


def test_imagenet_ids_file_order_and_prefix(tmp_path, decode_counter):
    wnids = _imagenet_c(tmp_path / "ImageNet-C")
    ids = [f"{wnids[3]}/img004.png", f"{wnids[0]}/img001.png", f"{wnids[2]}/img000.png", f"{wnids[0]}/img005.png"]
    (tmp_path / "ids.txt").write_text("".join(f"{i} 7\n" for i in ids) + "\n")  # label column is optional
    assert read_image_ids(tmp_path / "ids.txt") == ids
    bench = load_corruption_benchmark("imagenet", ["fog"], [5], data_dir=tmp_path, n_examples=3,
                                      imagenet_ids=str(tmp_path / "ids.txt"), progress=False)  # fmt: skip
    ds = bench.domains[("fog", 5)]
    index = imagenet_index()
    assert ds.labels.tolist() == [index[wnids[3]], index[wnids[0]], index[wnids[2]]]  # the list's order
    assert [f"{p.parent.name}/{p.name}" for p in decode_counter] == ids[:3]


def test_imagenet_ids_robustbench_from_installed_package(tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "robustbench" / "helper_files").mkdir(parents=True)
    (site / "robustbench" / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    (site / "robustbench" / "helper_files" / "imagenet_test_image_ids.txt").write_text(
        "n09468604/ILSVRC2012_val_00015253.JPEG\nn02823750/ILSVRC2012_val_00020685.JPEG"
    )
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "robustbench", raising=False)
    assert read_image_ids("robustbench") == [
        "n09468604/ILSVRC2012_val_00015253.JPEG", "n02823750/ILSVRC2012_val_00020685.JPEG",
    ]  # fmt: skip


def test_imagenet_ids_errors_are_clear(tmp_path, monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match="robustbench package installed"):
        read_image_ids("robustbench")
    with pytest.raises(FileNotFoundError, match="id list not found"):
        read_image_ids(tmp_path / "nope.txt")
    (tmp_path / "bad.txt").write_text("ILSVRC2012_val_00015253.JPEG\n")
    with pytest.raises(ValueError, match="<class>/<file>"):
        read_image_ids(tmp_path / "bad.txt")
