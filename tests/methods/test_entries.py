"""Benchmark entries: honest row labels and the Fisher / TTN arguments resolved per model."""

from __future__ import annotations

import warnings

import pytest
import torch

from tests.nets import tiny_net
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
    resolve_entry_kwargs("tbn", "eata", {"fisher_samples": True}, tiny_net())
    assert seen[-1] == ("cifar10", 2000, 0)  # EATA's --fisher_size
    with pytest.raises(ValueError, match="fisher_samples is an EATA setting"):
        resolve_entry_kwargs("tbn", "tent", {"fisher_samples": 10}, tiny_net())
    with pytest.raises(ValueError, match="ttn_fit fits the 'ttn' preset"):
        resolve_entry_kwargs("tbn", None, {"ttn_fit": {}}, tiny_net())


TINY_FIT = {"n_images": 16, "prior_batches": 2, "prior_batch_size": 8, "epochs": 1, "batch_size": 8}


def _counted_fits_on_fake_source(monkeypatch, tmp_path, classes: int) -> list:
    """A cache in ``tmp_path``, 16 random source images of ``classes`` classes, and the list of ttn fits run."""
    import numpy as np

    from tta_norm.fitting import _data, ttn

    monkeypatch.setenv("TTA_NORM_CACHE", str(tmp_path))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (16, 6, 6, 3), dtype=np.uint8)
    labels = rng.integers(0, classes, 16)
    monkeypatch.setattr(_data, "load_source_split", lambda *a, **k: (images, labels))
    fits: list = []
    real_fit = ttn.fit_ttn
    monkeypatch.setattr(ttn, "fit_ttn", lambda *a, **k: fits.append(k) or real_fit(*a, **k))
    entries._ttn_states.clear()
    return fits


def test_ttn_fit_is_fitted_once_per_model_and_cached(monkeypatch, tmp_path) -> None:
    import tta_norm
    from tta_norm.fitting import ttn

    fits = _counted_fits_on_fake_source(monkeypatch, tmp_path, classes=5)
    fit = dict(TINY_FIT)
    model = tiny_net()
    first = resolve_entry_kwargs("ttn", None, {"ttn_fit": fit}, model)
    second = resolve_entry_kwargs("ttn", "tent", {"ttn_fit": fit, "lr": 0.01}, model)
    assert len(fits) == 1 and first["init_state"] is second["init_state"] and second["lr"] == 0.01
    assert list((tmp_path / "ttn").glob("ttn-*.pt"))  # on disk for the next run
    entries._ttn_states.clear()
    resolve_entry_kwargs("ttn", None, {"ttn_fit": fit}, model)
    assert len(fits) == 1  # read back from the file
    inputs = entries.entry_inputs("ttn", None, {"ttn_fit": fit})
    monkeypatch.setattr(ttn, "FIT_VERSION", ttn.FIT_VERSION + 1)  # the fit's arithmetic changed:
    assert entries.entry_inputs("ttn", None, {"ttn_fit": fit}) != inputs  # other cells,
    entries._ttn_states.clear()
    resolve_entry_kwargs("ttn", None, {"ttn_fit": fit}, model)
    assert len(fits) == 2  # and a new fit, not the cached one
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fitted ttn does not warn
        tta_norm.adapt(model, "ttn", **first)


def test_a_cached_ttn_fit_that_cannot_be_used_is_fitted_again(monkeypatch, tmp_path) -> None:
    """A corrupt cache file raised UnpicklingError in every cell, for good."""
    fits = _counted_fits_on_fake_source(monkeypatch, tmp_path, classes=3)
    fit = dict(TINY_FIT)
    model = tiny_net()
    good = resolve_entry_kwargs("ttn", None, {"ttn_fit": fit}, model)["init_state"]
    (path,) = (tmp_path / "ttn").glob("ttn-*.pt")
    state = {k: v.clone() for k, v in good.items()}
    for content in (b"garbage", [1, 2], {"state_dict": {"bn1.weight": torch.ones(4)}},
                    {"state_dict": {**state, "bn1.mix_weight": torch.ones(5)}}):  # fmt: skip
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            torch.save(content, path)
        entries._ttn_states.clear()
        again = resolve_entry_kwargs("ttn", None, {"ttn_fit": fit}, model)["init_state"]
        assert all(torch.equal(again[k], v) for k, v in good.items()) and again.keys() == good.keys()
        payload = torch.load(path, weights_only=True)  # replaced by the new fit
        assert all(torch.equal(payload["state_dict"][k], v) for k, v in good.items())
    assert len(fits) == 5
    entries._ttn_states.clear()
    resolve_entry_kwargs("ttn", None, {"ttn_fit": fit}, model)
    assert len(fits) == 5  # a usable file is read back


def test_unfitted_ttn_warns_and_iabn_says_what_it_lacks() -> None:
    import tta_norm

    with pytest.warns(tta_norm.UnfittedTTNWarning, match="alpha=0.5"):
        tta_norm.adapt(tiny_net(), "ttn")
    summary = tta_norm.get_preset("iabn").summary
    assert "without NOTE's PBRS memory" in summary and "momentum-0.01" in summary and "entropy step" in summary


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fisher_samples": None}, "fisher_samples: expected an integer"),
        ({"fisher_samples": 0}, "fisher_samples: must be >= 1"),
        ({"fisher_seed": -1}, "fisher_seed: must be >= 0"),
        ({"momentum": 0.9}, "momentum= is ambiguous with a gradient method"),
        ({"episodic": "false"}, r"kwargs.episodic \(.*\): expected bool, got 'false' \(str\)"),
        ({"alpha": True}, r"kwargs.alpha \(.*\): expected float \| None, got True"),
        ({"e_margin": "0.4"}, "kwargs.e_margin .*expected float"),
        ({"unbiased": "no"}, "kwargs.unbiased .*expected bool"),
        ({"steps": True}, "kwargs.steps .*expected int"),
        ({"betas": [0.9]}, "kwargs.betas .*expected tuple"),
        ({"median": "middle"}, "kwargs.median .*expected Literal"),
        ({"window": 2.5}, "kwargs.window .*expected int"),
    ],
)
def test_entries_that_could_only_fail_per_cell_are_refused_by_the_config(kwargs, message) -> None:
    from tta_norm.bench.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        parse_method({"preset": "ema", "method": "eata", "kwargs": kwargs})
    assert parse_method({"preset": "ema", "kwargs": {"momentum": 0.2}}).preset == "ema"  # statistics only: no clash
    default_size = parse_method({"preset": "tbn", "method": "eata", "kwargs": {"fisher_samples": True}})
    assert default_size.label.startswith("tbn+eata")


def test_paper_lr_follows_each_cells_batch_size() -> None:
    from tta_norm.methods.base import paper_sgd_lr

    entry = {"optimizer": "sgd", "lr": "paper"}
    assert resolve_entry_kwargs("tbn", "sar", entry, tiny_net(), batch_size=4)["lr"] == paper_sgd_lr(4)
    assert resolve_entry_kwargs("tbn", "sar", entry, tiny_net(), batch_size=64)["lr"] == paper_sgd_lr(64)
    # SAR's bs1 experiment doubles its rate; TENT and EATA keep the plain rule
    assert resolve_entry_kwargs("tbn", "sar", entry, tiny_net(), batch_size=1)["lr"] == pytest.approx(1.5625e-5)
    assert resolve_entry_kwargs("tbn", "tent", entry, tiny_net(), batch_size=1)["lr"] == pytest.approx(7.8125e-6)
    assert paper_sgd_lr(1, vit=True, method="sar") == pytest.approx(3.125e-5)
    vit = resolve_entry_kwargs("source", "sar", {**entry, "lr": "paper-vit"}, tiny_net(), batch_size=8)
    assert vit["lr"] == paper_sgd_lr(8, vit=True)
    assert resolve_entry_kwargs("tbn", "tent", {"lr": 0.01}, tiny_net(), batch_size=8)["lr"] == 0.01
    with pytest.raises(ValueError, match="none was given"):
        resolve_entry_kwargs("tbn", "sar", entry, tiny_net())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": "paper"}, "needs optimizer: sgd"),
        ({"lr": "paper", "optimizer": "adam"}, "needs optimizer: sgd"),
        ({"lr": "papr", "optimizer": "sgd"}, "lr must be a number or one of"),
    ],
)
def test_paper_lr_needs_sgd_and_a_known_rule(kwargs, message) -> None:
    from tta_norm.bench.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        parse_method({"preset": "tbn", "method": "sar", "kwargs": kwargs})
    assert parse_method({"preset": "tbn", "method": "sar", "kwargs": {"lr": "paper-vit", "optimizer": "sgd"}})



@pytest.mark.parametrize(
    ("fit", "message"),
    [
        ({"n_imgs": 100}, "unknown setting 'n_imgs' \\(did you mean 'n_images'\\?\\)"),
        ({"epochs": "2"}, "ttn_fit .*epochs: expected int"),
        ({"distance": "cos"}, "distance: expected Literal"),
        ([1, 2], "must be a mapping"),
    ],
)
def test_ttn_fit_settings_are_checked_by_name_and_type(fit, message) -> None:
    from tta_norm.bench.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        parse_method({"preset": "ttn", "kwargs": {"ttn_fit": fit}})
    assert parse_method({"preset": "ttn", "kwargs": {"ttn_fit": {"n_images": 100, "fit_batch_sizes": [1, 4]}}})


@pytest.mark.parametrize(
    ("fit", "message"),
    [
        ({"n_images": 0}, "n_images must be >= 1"),
        ({"prior_batches": 1}, "prior_batches must be >= 2"),
        ({"lr": -1.0}, "lr > 0"),
        ({"lam": float("nan")}, "lam must be a finite number"),
        ({"fit_batch_sizes": [0]}, "fit_batch_sizes must be positive"),
        ({"fit_batch_sizes": [128]}, "fit_batch_sizes has 128 > batch_size 64"),
        ({"ops": ["jpeg"]}, "shift op"),
        ({"epochs": -3}, "epochs must be >= 1"),
        ({"epochs": 0}, "epochs must be >= 1"),
        ({"clean_prob": 2.0}, "clean_prob in \\[0, 1\\]"),
        ({"n_images": 6, "batch_size": 8, "fit_batch_sizes": [4, 8]}, "6 images make no step"),
    ],
)
def test_ttn_fit_values_are_checked_by_the_fit_config(fit, message) -> None:
    """A value the fit refuses is a config error (a dry run passed it, then every cell failed)."""
    from tta_norm.bench.config import ConfigError

    with pytest.raises(ConfigError, match=f"^methods.*ttn_fit.*: .*{message}"):
        parse_method({"preset": "ttn", "kwargs": {"ttn_fit": fit}})


def test_well_typed_entries_pass() -> None:
    entry = {"episodic": False, "alpha": 1, "betas": [0.9, 0.99], "optim": {"amsgrad": True}, "window": None,
             "e_margin": 0.5, "reset_every": 3}  # fmt: skip
    assert parse_method({"preset": "alpha", "method": "eata", "kwargs": entry}).method == "eata"
