"""Random-subset corruption benchmarks and the grid runner over them (fake corruption, tiny model)."""

from __future__ import annotations

import numpy as np
import pytest

import tta_norm.data
from tta_norm.bench import BenchConfig
from tta_norm.data import ArrayDataset
from tta_norm.fitting._data import seeded_subset
from tta_norm.fitting.benchdata import error_table, run_grid, subset_corruption_benchmark

from .nets import tiny_net


@pytest.fixture()
def sorted_clean(monkeypatch):
    """A class-sorted 'clean test set' of 60 8x8 images (3 classes x 20), like the JPEG mirror."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (60, 8, 8, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(3), 20)
    data = ArrayDataset(images, labels, ("a", "b", "c"), "fake-sorted")
    monkeypatch.setattr(tta_norm.data, "load_clean_test_set", lambda dataset="cifar10", data_dir=None: data)
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


def test_run_grid_writes_the_harness_records(sorted_clean, tmp_path):
    bench = subset_corruption_benchmark(12, ["fog", "gaussian_noise"], cache_dir=tmp_path / "cache",
                                        corrupt=fake_corrupt, progress=False)  # fmt: skip
    cfg = BenchConfig(name="t", corruptions=["fog", "gaussian_noise"], methods=["source", "tbn"], batch_sizes=[4, 12],
                      device="cpu", output=str(tmp_path / "out"), plots=False)  # fmt: skip
    cfg.validate()
    out = run_grid(cfg, bench, tiny_net(0), progress=False)
    table = error_table(out)
    assert set(table) == {(m, b) for m in ("source", "tbn") for b in (4, 12)}
    assert all(0.0 <= v <= 1.0 for v in table.values())
    assert table[("source", 4)] == table[("source", 12)]  # the source model does not depend on the batch size
    assert (out / "report.md").is_file()
