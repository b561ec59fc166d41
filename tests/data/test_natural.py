"""ImageNet-R / ImageNet-A / ImageNet-Sketch read from release-style folders and selectable as bench datasets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.data.conftest import write_tree
from tta_norm.bench.config import BenchConfig, ConfigError
from tta_norm.data import load_corruption_benchmark
from tta_norm.data.imagenet_classes import IMAGENET_A_WNIDS, IMAGENET_R_WNIDS, IMAGENET_WNIDS, imagenet_index
from tta_norm.data.natural import dataset_output_indices, find_natural_shift, read_natural_shift, restrict_outputs
from tta_norm.models import LogitSubset


def test_class_lists():
    assert len(IMAGENET_WNIDS) == 1000 and list(IMAGENET_WNIDS) == sorted(set(IMAGENET_WNIDS))
    for sub in (IMAGENET_R_WNIDS, IMAGENET_A_WNIDS):
        assert len(sub) == 200 and list(sub) == sorted(set(sub)) and set(sub) <= set(IMAGENET_WNIDS)
    assert IMAGENET_R_WNIDS != IMAGENET_A_WNIDS


def test_class_lists_match_timm_if_installed():
    timm_data = pytest.importorskip("timm.data")
    info = timm_data.ImageNetInfo()
    assert tuple(info.label_names()) == IMAGENET_WNIDS
    from importlib import resources

    folder = resources.files("timm.data") / "_info"
    for name, ours in (("imagenet_r", IMAGENET_R_WNIDS), ("imagenet_a", IMAGENET_A_WNIDS)):
        assert tuple((folder / f"{name}_synsets.txt").read_text().split()) == ours
        indices = [int(i) for i in (folder / f"{name}_indices.txt").read_text().split()]
        assert dataset_output_indices(name) == indices


def test_imagenet_r_labels_and_matching_logits(tmp_path, decode_counter):
    wnids = [IMAGENET_R_WNIDS[i] for i in (0, 5, 199)]
    write_tree(tmp_path / "imagenet-r", wnids, [3, 5, 4], size=(300, 260), ext="jpg")
    (tmp_path / "imagenet-r" / "README.txt").write_text("release notes")
    assert find_natural_shift("imagenet-r", tmp_path) == tmp_path / "imagenet-r"
    ds = read_natural_shift("imagenet_r", data_dir=tmp_path, progress=False)
    assert ds.images.shape == (12, 224, 224, 3)  # short side 256, center crop 224
    assert sorted(set(ds.labels.tolist())) == [0, 5, 199]  # positions among the 200 ImageNet-R classes
    assert ds.classes == IMAGENET_R_WNIDS
    indices = dataset_output_indices("imagenet_r")
    index = imagenet_index()
    assert len(indices) == 200 and indices[5] == index[IMAGENET_R_WNIDS[5]]
    sub = read_natural_shift("imagenet_r", data_dir=tmp_path, n_examples=6, seed=0, progress=False)
    assert len(sub) == 6 and set(sub.labels.tolist()) == {0, 5, 199}  # stratified: every class covered
    assert len(decode_counter) == 12 + 6


def test_imagenet_a_rejects_foreign_classes_and_sketch_is_1000_way(tmp_path):
    not_in_a = next(w for w in IMAGENET_WNIDS if w not in IMAGENET_A_WNIDS)
    write_tree(tmp_path / "imagenet-a", [IMAGENET_A_WNIDS[3], not_in_a], 1)
    with pytest.raises(ValueError, match="not classes of this dataset"):
        read_natural_shift("imagenet_a", data_dir=tmp_path, size=None, cache=False, progress=False)
    write_tree(tmp_path / "ImageNet-Sketch" / "sketch", [IMAGENET_WNIDS[7], IMAGENET_WNIDS[900]], 2)
    ds = read_natural_shift("imagenet-sketch", data_dir=tmp_path, size=None, cache=False, progress=False)
    assert ds.labels.tolist() == [7, 7, 900, 900]
    assert dataset_output_indices("imagenet_sketch") is None and dataset_output_indices("imagenet") is None
    with pytest.raises(FileNotFoundError, match="imagenet_r release folder"):
        find_natural_shift("imagenet_r", tmp_path / "empty")


def test_restrict_outputs_wraps_only_200_class_sets():
    model = torch.nn.Linear(3, 1000)
    wrapped = restrict_outputs(model, "imagenet-a")
    assert isinstance(wrapped, LogitSubset)
    x = torch.randn(2, 3)
    assert torch.equal(wrapped(x), model(x)[:, dataset_output_indices("imagenet_a")])
    assert restrict_outputs(model, "imagenet_sketch") is model and restrict_outputs(model, "cifar10") is model


def test_natural_shift_as_bench_dataset(tmp_path):
    write_tree(tmp_path / "ImageNet-R", [IMAGENET_R_WNIDS[1], IMAGENET_R_WNIDS[2]], 4)
    cfg = BenchConfig.from_mapping({"dataset": "imagenet-r", "data_dir": str(tmp_path), "n_examples": 6})
    assert cfg.dataset == "imagenet_r" and cfg.corruptions == ["imagenet_r"]
    with pytest.raises(ConfigError, match="one domain"):
        BenchConfig.from_mapping({"dataset": "imagenet_r", "corruptions": ["fog"]})
    with pytest.raises(ConfigError, match="imagenet_ids"):
        BenchConfig.from_mapping({"dataset": "imagenet_r", "imagenet_ids": "robustbench"})
    with pytest.raises(ConfigError, match="random_init"):
        BenchConfig.from_mapping({"random_init": "yes"})
    assert BenchConfig.from_mapping({"dataset": "imagenet", "imagenet_ids": "robustbench"}).imagenet_ids
    bench = load_corruption_benchmark(cfg.dataset, cfg.corruptions, cfg.severities, data_dir=cfg.data_dir,
                                      n_examples=cfg.n_examples, seed=cfg.data_seed, progress=False)  # fmt: skip
    ds = bench.domains[("imagenet_r", 5)]
    assert len(ds) == 6 and np.bincount(ds.labels).tolist() == [0, 3, 3]
    assert bench.provenance == {("imagenet_r", 5): "release"}
    with pytest.raises(ValueError, match="no clean test set"):
        load_corruption_benchmark("imagenet_r", ["imagenet_r"], [5], data_dir=tmp_path, include_clean=True)


def test_bench_source_model_gets_the_matching_logits(tmp_path):
    pytest.importorskip("timm")
    from tta_norm.bench.runner import load_source_model

    cfg = BenchConfig.from_mapping({"dataset": "imagenet_a", "model": "timm:test_resnet", "random_init": True})
    model = load_source_model(cfg, torch.device("cpu"))
    assert isinstance(model, LogitSubset) and model(torch.rand(1, 3, 32, 32)).shape == (1, 200)
    with pytest.raises(ValueError, match="random_init"):
        load_source_model(BenchConfig.from_mapping({"model": "resnet18"}), torch.device("cpu"))


def test_fisher_images_of_imagenet_come_from_the_clean_validation_set(tmp_path, monkeypatch, decode_counter):
    """EATA's Fisher source on ImageNet and its natural shifts: a seeded stratified subset of the clean
    validation folders, 224 crops like ImageNet-C (there was no ImageNet source: a FileNotFoundError)."""
    from tta_norm.methods.entries import clean_source_images, locate_entry_inputs

    monkeypatch.setenv("TTA_NORM_CACHE", str(tmp_path / "cache"))
    kwargs = {"fisher_samples": 4}
    with pytest.raises(FileNotFoundError, match="clean ImageNet validation set"):
        locate_entry_inputs("tbn", "eata", kwargs, dataset="imagenet", data_dir=str(tmp_path))
    write_tree(tmp_path / "imagenet" / "val", [IMAGENET_WNIDS[0], IMAGENET_WNIDS[999]], 5, size=(300, 260), ext="jpg")
    for dataset in ("imagenet", "imagenet_r"):
        locate_entry_inputs("tbn", "eata", kwargs, dataset=dataset, data_dir=str(tmp_path))
    a = clean_source_images("imagenet", 4, seed=0, data_dir=str(tmp_path))
    assert a.shape == (4, 3, 224, 224) and a.dtype == torch.float32 and 0 <= a.min() and a.max() <= 1
    assert len(decode_counter) == 4  # chosen before decoding
    assert torch.equal(clean_source_images("imagenet_a", 4, seed=0, data_dir=str(tmp_path)), a)
    assert not torch.equal(clean_source_images("imagenet", 4, seed=1, data_dir=str(tmp_path)), a)
