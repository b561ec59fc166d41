"""Random-subset corruption benchmarks, the grid runner over them (fake corruption, tiny model), and the clean and
corruption error of a model without the grid."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from torch import nn

import tta_norm
import tta_norm.data
from tta_norm.bench import BenchConfig
from tta_norm.data import ArrayDataset
from tta_norm.fitting._data import seeded_subset
from tta_norm.fitting.benchdata import (
    classification_error,
    corruption_errors,
    error_table,
    run_grid,
    subset_corruption_benchmark,
)
from tta_norm.models import cifar_resnet

from .nets import tiny_net


@pytest.fixture()
def sorted_clean(monkeypatch):
    """A class-sorted 'clean test set' of 60 8x8 images (3 classes x 20), like the JPEG mirror."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (60, 8, 8, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(3), 20)
    data = ArrayDataset(images, labels, ("a", "b", "c"), "fake-sorted")
    monkeypatch.setattr(tta_norm.data, "load_clean_test_set", lambda *a, **k: data)
    return data


def fake_corrupt(images, corruption, severity, seed, preset):
    shift = {"fog": 40, "gaussian_noise": 80}[corruption]
    return np.clip(images.astype(np.int16) + shift, 0, 255).astype(np.uint8)


def test_subset_is_random_cached_and_shared_across_domains(sorted_clean, tmp_path):
    bench = subset_corruption_benchmark(15, ["fog", "gaussian_noise"], subset_seed=3, cache_dir=tmp_path,
                                        corrupt=fake_corrupt, progress=False)  # fmt: skip
    fog, noise = bench.domains[("fog", 5)], bench.domains[("gaussian_noise", 5)]
    assert len(fog) == 15 and len(set(fog.labels.tolist())) == 3  # not the first 15 images (one class)
    assert np.array_equal(fog.labels, noise.labels)
    idx = np.sort(seeded_subset(60, 15, 3))  # the documented subset: a seeded permutation, sorted
    np.testing.assert_array_equal(fog.images, fake_corrupt(sorted_clean.images[idx], "fog", 5, 0, ""))
    np.testing.assert_array_equal(noise.images, fake_corrupt(sorted_clean.images[idx], "gaussian_noise", 5, 0, ""))
    again = subset_corruption_benchmark(15, ["fog", "gaussian_noise"], subset_seed=3, cache_dir=tmp_path,
                                        corrupt=lambda *a, **k: pytest.fail("must come from the cache"),
                                        progress=False)  # fmt: skip
    assert np.array_equal(again.domains[("fog", 5)].images, fog.images)
    assert "random subset of 15" in bench.describe()


def test_a_substitute_generator_needs_its_own_cache(tmp_path, monkeypatch):
    """Its images went to the default cache, and were later served as the real corruption."""
    from tta_norm import data

    monkeypatch.setenv("TTA_NORM_CACHE", str(tmp_path))
    monkeypatch.setattr(data, "load_clean_test_set", lambda *a, **k: pytest.fail("checked before any work"))
    with pytest.raises(ValueError, match=r"^corrupt= needs its own cache_dir="):
        subset_corruption_benchmark(4, ["fog"], corrupt=fake_corrupt, progress=False)
    assert not any(tmp_path.iterdir())


def test_run_grid_writes_the_harness_records(sorted_clean, tmp_path):
    bench = subset_corruption_benchmark(12, ["fog", "gaussian_noise"], cache_dir=tmp_path / "cache",
                                        corrupt=fake_corrupt, progress=False)  # fmt: skip
    cfg = BenchConfig(name="t", corruptions=["fog", "gaussian_noise"], methods=["source", "tbn"], batch_sizes=[4, 12],
                      device="cpu", output=str(tmp_path / "out"), plots=False)  # fmt: skip
    cfg.validate()
    out = run_grid(cfg, bench, tiny_net(0, num_classes=10), progress=False)
    table = error_table(out)
    assert set(table) == {(m, b) for m in ("source", "tbn") for b in (4, 12)}
    assert all(0.0 <= v <= 1.0 for v in table.values())
    assert table[("source", 4)] == table[("source", 12)]  # the source model does not depend on the batch size
    assert (out / "report.md").is_file()


CPU = torch.device("cpu")


def _cifar_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n)


class _Fixed(nn.Module):
    """Predicts class ``k`` for every image and records the batch sizes it sees."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k, self.sizes = k, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(x.shape[0])
        return nn.functional.one_hot(torch.full((x.shape[0],), self.k), 10).float()


def test_classification_error_counts_in_batches_of_200_without_changing_the_mode():
    images, _ = _cifar_images(450)
    labels = np.array([3] * 300 + [4] * 150)
    model = _Fixed(3).train()
    assert classification_error(model, images, labels, CPU) == 150 / 450
    assert model.sizes == [200, 200, 50] and model.training


def test_corruption_errors_adds_tbn_for_models_with_batchnorm():
    domains = {name: types.SimpleNamespace(images=_cifar_images(20, seed)[0], labels=_cifar_images(20, seed)[1])
               for seed, name in enumerate(["fog-5", "gaussian_noise-5"])}  # fmt: skip
    bench = types.SimpleNamespace(domains=domains)
    torch.manual_seed(0)
    bn_model = cifar_resnet(8).eval()
    before = {k: v.clone() for k, v in bn_model.state_dict().items()}
    errs = corruption_errors(bn_model, bench, CPU)
    d = list(domains.values())
    assert errs["source"] == float(np.mean([classification_error(bn_model, x.images, x.labels, CPU) for x in d]))
    tbn = [classification_error(tta_norm.adapt(bn_model, "tbn"), x.images, x.labels, CPU) for x in d]
    assert errs["tbn"] == float(np.mean(tbn))
    assert all(torch.equal(before[k], v) for k, v in bn_model.state_dict().items())  # the model is not adapted
    gn_model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(4 * 30 * 30, 10))
    assert set(corruption_errors(gn_model, bench, CPU)) == {"source"}
