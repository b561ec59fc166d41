"""Corruption benchmark assembly: release files, regeneration through ``corruptions.corrupt`` (faked here until
the package provides it), caching, provenance and the opt-in download's offline failure."""

from __future__ import annotations

import sys
import types
import urllib.error
import urllib.request

import numpy as np
import pytest

from tta_norm.data import (
    CLEAN,
    DataFormatError,
    load_clean_test_set,
    load_corruption_benchmark,
    regenerate_domain,
)
from tta_norm.data.readers import ArrayDataset

from .test_data import _write_cifar_c, _write_png_tree

pytestmark = pytest.mark.usefixtures("_isolated_cache")  # tests here write to the cache


def _fake_corrupt(calls):
    def corrupt(images, name, severity=5, seed=0, preset="cifar"):
        calls.append((name, severity, seed, len(images)))
        rng = np.random.default_rng(seed)
        noise = rng.integers(0, 3 * severity + 1, images.shape)
        return np.clip(images.astype(np.int64) + noise, 0, 255).astype(np.uint8)

    return corrupt


@pytest.fixture
def fake_corruptions(monkeypatch):
    """A stand-in ``corruptions`` package with a deterministic seeded ``corrupt``."""
    calls = []
    mod = types.ModuleType("corruptions")
    mod.__path__ = []
    mod.corrupt = _fake_corrupt(calls)
    mod.CORRUPTIONS = ("gaussian_noise", "fog", "snow")
    mod.EXTRA_CORRUPTIONS = ("saturate",)
    monkeypatch.setitem(sys.modules, "corruptions", mod)
    return calls


@pytest.fixture
def jpeg_like_tree(tmp_path):
    """A tiny data directory holding an ImageFolder ``cifar10-jpeg/{train,test}`` (PNG, 32x32)."""
    data = tmp_path / "data"
    _write_png_tree(data / "cifar10-jpeg" / "test", ["airplane", "automobile"], 6, size=(32, 32))
    _write_png_tree(data / "cifar10-jpeg" / "train", ["airplane", "automobile"], 2, size=(32, 32), seed=1)
    return data


def test_release_is_preferred_and_validated(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "corruptions", types.ModuleType("corruptions"))  # no corrupt(): unused
    data = tmp_path / "data"
    arrays, labels = _write_cifar_c(data / "CIFAR-10-C", ["fog", "snow"], n=4)
    bench = load_corruption_benchmark("cifar10", ["fog", "snow"], (2, 5), data_dir=data, progress=False)
    assert set(bench.domains) == {("fog", 2), ("fog", 5), ("snow", 2), ("snow", 5)}
    assert set(bench.provenance.values()) == {"release"} and not bench.regenerated
    assert np.array_equal(bench.domains[("snow", 2)].images, arrays["snow"][4:8])
    assert bench.domains[("snow", 2)].labels.dtype == np.int64
    assert len(load_corruption_benchmark("cifar10", ["fog"], data_dir=data, n_examples=2).domains[("fog", 5)]) == 2
    # a missing or truncated file fails up front, naming the file
    with pytest.raises(FileNotFoundError, match="frost.npy"):
        load_corruption_benchmark("cifar10", ["fog", "frost"], data_dir=data)
    raw = data / "CIFAR-10-C" / "snow.npy"
    raw.write_bytes(raw.read_bytes()[:-10])
    with pytest.raises(DataFormatError, match="truncated"):
        load_corruption_benchmark("cifar10", ["fog", "snow"], data_dir=data)


def test_release_required_but_absent(tmp_path):
    with pytest.raises(FileNotFoundError, match="CIFAR-10-C"):
        load_corruption_benchmark("cifar10", ["fog"], data_dir=tmp_path, source="release")
    with pytest.raises(ValueError):
        load_corruption_benchmark("cifar10", ["fog"], (0,), data_dir=tmp_path)
    with pytest.raises(ValueError):
        load_corruption_benchmark("mnist", ["fog"], data_dir=tmp_path)


def test_regeneration_missing_corrupt_is_clear(tmp_path, monkeypatch, jpeg_like_tree):
    monkeypatch.setitem(sys.modules, "corruptions", types.ModuleType("corruptions"))
    with pytest.raises(RuntimeError, match=r"corruptions package has no corrupt\(\) function"):
        load_corruption_benchmark("cifar10", ["fog"], data_dir=jpeg_like_tree, cache_dir=tmp_path / "c")


def test_regeneration_cached_seeded_and_reported(tmp_path, fake_corruptions, jpeg_like_tree, capsys):
    cache = tmp_path / "cache"
    kw = dict(data_dir=jpeg_like_tree, cache_dir=cache, progress=False)
    bench = load_corruption_benchmark("cifar10", ["fog", "snow"], (3, 5), include_clean=True, seed=7, **kw)
    assert capsys.readouterr().err == ""  # progress=False: no bar while the clean set is decoded either
    assert bench.regenerated and bench.provenance[("fog", 3)] == "regenerated"
    assert bench.provenance[CLEAN] == "clean" and "imagefolder" in bench.clean_source
    assert "regenerated" in bench.describe()
    clean = bench.domains[CLEAN]
    assert len(clean) == 12 and np.array_equal(bench.domains[("fog", 3)].labels, clean.labels)
    # one corrupt() call per domain, over the whole clean set, with the benchmark seed
    assert sorted(fake_corruptions) == [("fog", 3, 7, 12), ("fog", 5, 7, 12), ("snow", 3, 7, 12), ("snow", 5, 7, 12)]
    expected = _fake_corrupt([])(np.asarray(clean.images), "fog", 3, 7)
    assert np.array_equal(bench.domains[("fog", 3)].images, expected)
    # second call: served from the cache (memory-mapped), identical, nothing regenerated; n_examples trims
    again = load_corruption_benchmark("cifar10", ["fog", "snow"], (3, 5), seed=7, n_examples=5, **kw)
    assert len(fake_corruptions) == 4
    assert isinstance(again.domains[("snow", 5)].images, np.memmap) and len(again.domains[("snow", 5)]) == 5
    assert np.array_equal(again.domains[("snow", 5)].images, bench.domains[("snow", 5)].images[:5])
    # another seed -> other images
    other = load_corruption_benchmark("cifar10", ["fog"], (3,), seed=8, **kw)
    assert not np.array_equal(other.domains[("fog", 3)].images, bench.domains[("fog", 3)].images)
    with pytest.raises(ValueError, match="unknown to the corruptions package"):
        load_corruption_benchmark("cifar10", ["not_a_corruption"], **kw)


def test_regeneration_repairs_truncated_cache(tmp_path, fake_corruptions):
    rng = np.random.default_rng(0)
    clean = ArrayDataset(rng.integers(0, 256, (20, 4, 4, 3), dtype=np.uint8), rng.integers(0, 10, 20))
    first = np.array(regenerate_domain(clean, "fog", 2, tmp_path, seed=1).images)  # copy: the file is cut below
    path = tmp_path / "fog-s2.npy"
    path.write_bytes(path.read_bytes()[:-7])
    again = regenerate_domain(clean, "fog", 2, tmp_path, seed=1)
    assert len(fake_corruptions) == 2 and np.array_equal(first, again.images)


def test_regeneration_rejects_bad_generator_output(tmp_path, monkeypatch, jpeg_like_tree, fake_corruptions):
    sys.modules["corruptions"].corrupt = lambda images, name, severity=5, seed=0, preset="cifar": images[:1]
    with pytest.raises(RuntimeError, match="expected uint8"):
        load_corruption_benchmark("cifar10", ["fog"], data_dir=jpeg_like_tree, cache_dir=tmp_path / "c",
                                  progress=False)  # fmt: skip


def test_clean_test_set_on_the_mirror(mirror_root):
    clean = load_clean_test_set("cifar10", mirror_root.parent)
    assert clean.images.shape == (10000, 32, 32, 3) and np.bincount(clean.labels).tolist() == [1000] * 10


def test_download_is_opt_in_and_fails_clearly_offline(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(RuntimeError, match="offline"):
        load_corruption_benchmark("cifar10", ["fog"], data_dir=tmp_path, source="release", download=True)


def _real_corruptions():
    corruptions = pytest.importorskip("corruptions")
    if not callable(getattr(corruptions, "write_cifar_c", None)) or not callable(getattr(corruptions, "corrupt", None)):
        pytest.skip("corruptions does not provide corrupt() and write_cifar_c() yet")
    return corruptions


def test_release_writer_of_corruptions_agrees_with_reader(tmp_path):
    """Files written by ``corruptions.write_cifar_c`` read back exactly; regeneration with the same seed gives the
    same rows; severities the writer has not filled in (manifest.json) are refused."""
    corruptions = _real_corruptions()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 6)
    root = tmp_path / "data" / "CIFAR-10-C"
    corruptions.write_cifar_c(images, labels, root, corruptions=["fog", "gaussian_noise"], severities=(2, 5), seed=3,
                              progress=False)  # fmt: skip
    bench = load_corruption_benchmark("cifar10", ["fog", "gaussian_noise"], (2, 5), data_dir=root.parent,
                                      source="release", progress=False)  # fmt: skip
    clean = ArrayDataset(images, labels)
    for (name, sev), ds in bench.domains.items():
        assert bench.provenance[(name, sev)] == "release"
        assert ds.images.shape == images.shape and ds.labels.tolist() == labels.tolist()
        assert np.array_equal(ds.images, corruptions.corrupt(images, name, severity=sev, seed=3))
        regen = regenerate_domain(clean, name, sev, tmp_path / "regen", seed=3)
        assert np.array_equal(regen.images, ds.images)
    with pytest.raises(DataFormatError, match="manifest"):
        load_corruption_benchmark("cifar10", ["fog"], (3,), data_dir=root.parent, source="release")


def test_regeneration_with_real_corruptions_on_mirror_images(tmp_path, mirror_test_small):
    """A few hundred real mirror images through the real generator: cached, reported, label-preserving."""
    corruptions = _real_corruptions()
    clean = mirror_test_small
    ds = regenerate_domain(clean, "gaussian_noise", 5, tmp_path, seed=0)
    assert ds.images.shape == clean.images.shape and np.array_equal(ds.labels, clean.labels)
    diff = ds.images.astype(np.int16) - np.asarray(clean.images, dtype=np.int16)
    assert 15 < np.abs(diff).mean() < 40  # sigma = 0.10 * 255 ~ 25.5, clipped
    assert np.array_equal(ds.images, corruptions.corrupt(np.asarray(clean.images), "gaussian_noise", 5, seed=0))


def test_mirror_clean_test_set_prefix_is_class_mixed() -> None:
    """n_examples takes a prefix: for the class-sorted mirror the clean set is permuted once (seed 0)."""
    from tta_norm.data.benchmark import load_clean_test_set
    from tta_norm.data.paths import find_dataset_dir

    if find_dataset_dir(["cifar10-jpeg"], lambda p: (p / "test").is_dir()) is None:
        import pytest

        pytest.skip("needs ../shared/data/cifar10-jpeg")
    a = load_clean_test_set("cifar10")
    b = load_clean_test_set("cifar10")
    assert (a.labels == b.labels).all()
    assert len(set(a.labels[:200].tolist())) == 10
