"""Benchmark entries: honest row labels and the Fisher / TTN arguments resolved per model."""

from __future__ import annotations

import pytest
import torch

from tests.core.nets import tiny_net
from tta_norm.bench.config import parse_method
from tta_norm.methods import entries
from tta_norm.methods import fisher as fisher_mod
from tta_norm.methods.entries import method_label, resolve_entry_kwargs


def test_eata_without_fisher_is_labelled_eta() -> None:
    assert method_label("tbn", "eata") == "tbn+eta"
    assert method_label("tbn", "eata", {"fisher_samples": 2000}) == "tbn+eata"
    assert method_label("tbn", "eata", {"fisher_samples": 2000, "fisher_alpha": 0}) == "tbn+eta"
    assert parse_method("tbn+eata").label == "tbn+eta"
    entry = parse_method({"preset": "tbn", "method": "eata", "kwargs": {"fisher_samples": 500}})
    assert entry.label == "tbn+eata(fisher_samples=500)"


def test_ttn_and_iabn_labels_say_what_runs() -> None:
    assert method_label("ttn") == "mixture(a=0.5)"
    assert method_label("ttn", None, {"ttn_fit": {}}) == "ttn"
    assert method_label("ttn", "tent", {"init_state": "x.pt"}) == "ttn+tent"
    assert method_label("iabn") == "iabn(layer only)"
    assert parse_method({"preset": "ttn", "kwargs": {"ttn_fit": {"epochs": 1}}}).label.startswith("ttn(")


def test_fisher_samples_become_cached_fisher_images(monkeypatch) -> None:
    images = torch.rand(70, 3, 6, 6)
    seen = []

    def fake_source(dataset, n, *, seed=0, data_dir=None, progress=False):
        seen.append((dataset, n, seed))
        return images[:n]

    monkeypatch.setattr(entries, "clean_source_images", fake_source)
    kwargs = resolve_entry_kwargs("tbn", "eata", {"fisher_samples": 70, "lr": 0.01}, tiny_net())
    assert seen == [("cifar10", 70, 0)] and set(kwargs) == {"fisher_images", "lr"}
    import tta_norm

    fisher_mod.clear_fisher_cache()
    a = tta_norm.adapt(tiny_net(), "tbn", "eata", **kwargs)
    b = tta_norm.adapt(tiny_net(), "tbn", "eata", **kwargs)
    assert fisher_mod.cache_stats == {"hits": 1, "misses": 1} and a.method.uses_fisher and b.method.uses_fisher
    fisher_mod.clear_fisher_cache()
    with pytest.raises(ValueError, match="fisher_samples is an EATA setting"):
        resolve_entry_kwargs("tbn", "tent", {"fisher_samples": 10}, tiny_net())
    with pytest.raises(ValueError, match="ttn_fit fits the 'ttn' preset"):
        resolve_entry_kwargs("tbn", None, {"ttn_fit": {}}, tiny_net())
