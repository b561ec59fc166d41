"""Benchmark method entries: honest row labels, and the data-dependent keyword arguments resolved per model.

A benchmark entry is a preset, an optional gradient method and keyword arguments for :func:`tta_norm.adapt`.
Two of those arguments need data the config cannot hold, and are resolved here once per source model:

- ``fisher_samples: N`` (EATA): the diagonal Fisher of the adapted parameters on ``N`` clean source images
  (``fisher_seed``, default 0, picks them), in batches of 64 (:mod:`tta_norm.methods.fisher`), memoised per
  model, preset and images.
- ``ttn_fit: {...}`` (the ``ttn`` preset): TTN's channel-wise weights fitted on the labelled source split
  (:func:`tta_norm.fitting.ttn.fit_ttn`; keys ``n_images`` (default 4000), ``seed`` and any
  :class:`~tta_norm.fitting.ttn.TTNConfig` field), cached per model and fit settings in memory and under
  ``<cache>/ttn/``.

One more is resolved per cell: ``lr: paper`` / ``lr: paper-vit`` with ``optimizer: sgd`` is SAR's ImageNet
SGD learning rate at the cell's batch size (:func:`tta_norm.methods.base.paper_sgd_lr`, ResNet or ViT rule).

:func:`method_label` names a row after what it runs: EATA without Fisher weights is ``eta``, ``ttn`` without
fitted weights is ``mixture(a=0.5)``, ``iabn`` is ``iabn(layer only)`` (NOTE's layer without its memory and
step).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tta_norm.methods.base import paper_sgd_lr
from tta_norm.methods.fisher import FISHER_SAMPLES

#: Entry keys resolved here (they are not arguments of :func:`tta_norm.adapt`).
ENTRY_KEYS = ("fisher_samples", "fisher_seed", "ttn_fit")
#: ``lr`` values scaled with the cell's batch size by SAR's SGD rule (ResNet, ViT).
PAPER_LR = {"paper": False, "paper-vit": True}
_FISHER_SOURCES = ("fishers", "fisher_images", "fisher_data", "fisher_samples")
_ttn_states: dict[str, dict[str, torch.Tensor]] = {}


def method_label(preset: str, method: str | None = None, kwargs: Mapping[str, Any] | None = None) -> str:
    """The row label of a benchmark entry, saying what actually runs.

    ``preset`` or ``preset+method``, where an ``eata`` entry without a Fisher source (``fisher_samples``,
    ``fishers``, ``fisher_images``, ``fisher_data``) or with ``fisher_alpha: 0`` reads ``eta``, a ``ttn`` entry
    without ``ttn_fit`` or ``init_state`` reads ``mixture(a=0.5)`` (its untrained weights) and ``iabn`` reads
    ``iabn(layer only)``.
    """
    kwargs = dict(kwargs or {})
    stats = preset
    if preset == "ttn" and "ttn_fit" not in kwargs and "init_state" not in kwargs:
        stats = "mixture(a=0.5)"
    elif preset == "iabn":
        stats = "iabn(layer only)"
    if method is None:
        return stats
    if method == "eata" and (not any(k in kwargs for k in _FISHER_SOURCES) or kwargs.get("fisher_alpha") == 0):
        method = "eta"
    return f"{stats}+{method}"


def clean_source_images(
    dataset: str, n: int, *, seed: int = 0, data_dir: str | None = None, progress: bool = False
) -> torch.Tensor:
    """``n`` clean source images as float NCHW in [0, 1], chosen by a seeded permutation.

    CIFAR-10: the ``cifar10-jpeg`` train split (Marsden & Doebler draw EATA's Fisher images from the source
    training data); ImageNet and its natural shifts: the clean ImageNet validation set, a class-stratified
    subset (:func:`~tta_norm.data.natural.read_imagenet_val`, as ``mr-eggplant/EATA`` does); CIFAR-100: its
    clean test set.
    """
    from tta_norm.data.benchmark import load_clean_test_set
    from tta_norm.data.tensors import to_float_nchw
    from tta_norm.fitting._data import load_source_split, seeded_subset

    if n < 1:
        raise ValueError(f"fisher_samples must be >= 1, got {n}")
    if dataset == "cifar10":
        images, _ = load_source_split("train", n, seed=seed, data_dir=data_dir, progress=progress)
    elif _imagenet_source(dataset):
        from tta_norm.data.natural import read_imagenet_val

        images = read_imagenet_val(n, seed=seed, data_dir=data_dir, progress=progress).images
    else:
        data = load_clean_test_set(dataset, data_dir, progress)
        idx = np.sort(seeded_subset(len(data), n, seed))
        images = np.ascontiguousarray(data.images[idx])
    return to_float_nchw(torch.from_numpy(images))


def _imagenet_source(dataset: str) -> bool:
    """Whether ``dataset``'s source is ImageNet-1k (ImageNet-C and the natural shifts)."""
    from tta_norm.data.natural import natural_shift

    return dataset == "imagenet" or natural_shift(dataset) is not None


def _state_fingerprint(model: nn.Module, extra: Any) -> str:
    h = hashlib.sha1(json.dumps(extra, sort_keys=True, default=str).encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _ttn_source_settings(fit: Mapping[str, Any]) -> tuple[int, int, str]:
    return int(fit.get("n_images", 4000)), int(fit.get("seed", 0)), str(fit.get("source", "cifar10-jpeg"))


def ttn_source_data(fit: Mapping[str, Any], *, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The labelled source images (uint8 NHWC) and labels a ``ttn_fit`` entry is fitted on."""
    from tta_norm.fitting._data import load_source_split

    n_images, seed, source = _ttn_source_settings(fit)
    return load_source_split("train", n_images, seed=seed, data_dir=data_dir, source=source, progress=False)


def fisher_sample_count(value: Any) -> int:
    """``fisher_samples`` as a count: ``true`` is the official 2000."""
    return FISHER_SAMPLES if value is True else int(value)


def check_paper_lr(kwargs: Mapping[str, Any]) -> None:
    """An ``lr`` given as a string is one of :data:`PAPER_LR`, with ``optimizer: sgd`` (the rule is SAR's SGD
    schedule; Adam's lr is not scaled with the batch)."""
    lr = kwargs.get("lr")
    if not isinstance(lr, str):
        return
    if lr not in PAPER_LR:
        raise ValueError(f"lr must be a number or one of {sorted(PAPER_LR)}, got {lr!r}")
    if kwargs.get("optimizer") != "sgd":
        raise ValueError(f"lr: {lr} is SAR's SGD learning-rate rule; it needs optimizer: sgd")


def read_init_state(path: str | os.PathLike) -> tuple[str, dict[str, torch.Tensor]]:
    """The SHA-256 (16 hex digits) of an ``init_state`` file and the state dict loaded from **the same bytes**
    (tensors only, ``weights_only``): a grid reads the file once, so the fingerprint in its keys is the one of
    the state every cell uses."""
    import io

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"init_state file not found: {path}")
    data = path.read_bytes()
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise ValueError(f"init_state {path}: not a tensor state file ({type(err).__name__})") from None
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(f"init_state {path}: must hold a state dict (names to tensors), got {type(state).__name__}")
    return hashlib.sha256(data).hexdigest()[:16], dict(state)


def entry_inputs(
    preset: str,
    method: str | None,
    kwargs: Mapping[str, Any],
    *,
    dataset: str = "cifar10",
    data_dir: str | None = None,
    init_states: Mapping[str, tuple[str, Any]] | None = None,
) -> dict[str, str]:
    """Content fingerprints of what an entry reads besides the model and the test data: an ``init_state``
    file, the Fisher images of ``fisher_samples``, the source split of ``ttn_fit`` (and the fit's version).
    They enter the entry's cell keys, so a changed file or another source data directory never reuses a stored
    result.  ``init_states`` (path -> :func:`read_init_state`) gives the fingerprints of files already read."""
    from tta_norm.bench.identity import array_fingerprint

    out: dict[str, str] = {}
    state = kwargs.get("init_state")
    if isinstance(state, (str, os.PathLike)) and init_states is not None and str(state) in init_states:
        out["init_state_sha256"] = init_states[str(state)][0]
    elif isinstance(state, (str, os.PathLike)):
        path = Path(state).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"init_state file not found: {path}")
        out["init_state_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    if "fisher_samples" in kwargs and method == "eata":
        n = fisher_sample_count(kwargs["fisher_samples"])
        seed = int(kwargs.get("fisher_seed", 0))
        out["fisher_images_sha256"] = array_fingerprint(clean_source_images(dataset, n, seed=seed, data_dir=data_dir))
    fit = kwargs.get("ttn_fit") or {}
    if "ttn_fit" in kwargs and preset == "ttn" and isinstance(fit, Mapping):
        out["ttn_source_sha256"] = array_fingerprint(*ttn_source_data(fit, data_dir=data_dir))
        from tta_norm.fitting.ttn import FIT_VERSION

        out["ttn_fit_version"] = str(FIT_VERSION)
    return out


def locate_entry_inputs(
    preset: str, method: str | None, kwargs: Mapping[str, Any], *, dataset: str = "cifar10",
    data_dir: str | None = None,
) -> None:  # fmt: skip
    """What :func:`entry_inputs` reads, found without decoding an image (a config's dry run): the
    ``init_state`` file is read and checked, the source split of Fisher images and of ``ttn_fit`` located.
    Raises the one-line ``FileNotFoundError`` / ``ValueError`` the run would raise."""
    from tta_norm.data.source import find_source_root

    state = kwargs.get("init_state")
    if isinstance(state, (str, os.PathLike)):
        read_init_state(state)
    splits: list[str] = []
    if "fisher_samples" in kwargs and method == "eata":
        fisher_sample_count(kwargs["fisher_samples"])
        if _imagenet_source(dataset):  # the clean validation folder, found, not decoded
            from tta_norm.data.natural import find_imagenet_val

            find_imagenet_val(data_dir)
        elif dataset != "cifar10":  # the clean test set (a few MB of pickles)
            from tta_norm.data.benchmark import load_clean_test_set

            load_clean_test_set(dataset, data_dir, progress=False)
        else:
            splits.append("cifar10-jpeg")
    fit = kwargs.get("ttn_fit") or {}
    if "ttn_fit" in kwargs and preset == "ttn" and isinstance(fit, Mapping):
        splits.append(_ttn_source_settings(fit)[2])
    for source in splits:
        train = find_source_root(data_dir, source) / "train"
        if not train.is_dir():
            raise FileNotFoundError(f"{train} not found (the source images are read from its train split)")


def fitted_ttn_state(
    model: nn.Module,
    fit: Mapping[str, Any],
    *,
    data_dir: str | None = None,
    device: torch.device | str | None = None,
    expected_source: str | None = None,
) -> dict[str, torch.Tensor]:
    """The ``ttn``-adapted state dict of ``model`` fitted with the ``ttn_fit`` settings, cached per model, fit
    settings and the content of the source images it is fitted on (``expected_source``: their fingerprint
    must be this one).  A cache file that cannot be read, or does not hold a state of the ``ttn``-adapted
    model's tensor names and shapes, is fitted again and replaced."""
    from tta_norm.bench.identity import array_fingerprint
    from tta_norm.data.paths import cache_root
    from tta_norm.fitting.ttn import FIT_VERSION, fit_ttn

    images, labels = ttn_source_data(fit, data_dir=data_dir)
    source_fingerprint = array_fingerprint(images, labels)
    _check_unchanged("TTN source images", expected_source, source_fingerprint)
    n_images, seed, source = _ttn_source_settings(fit)
    fit = {k: v for k, v in fit.items() if k not in ("n_images", "seed", "source")}
    key = _state_fingerprint(model, {"n_images": n_images, "seed": seed, "source": source, **fit,
                                     "images": source_fingerprint, "version": FIT_VERSION})  # fmt: skip
    if key in _ttn_states:
        return _ttn_states[key]
    path = Path(cache_root()) / "ttn" / f"ttn-{key}.pt"
    state = _cached_ttn_state(path, model)
    if state is None:
        result = fit_ttn(model, images, labels, device=device, progress=False, seed=seed, **fit)
        result.save(path)  # atomically, over a file that could not be used
        state = result.state_dict
    _ttn_states[key] = state
    return state


def _cached_ttn_state(path: Path, model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The state dict of the fit cached in ``path``, or ``None`` when there is none, it cannot be read, or it is
    not a state of the ``ttn``-adapted ``model``'s tensor names and shapes."""
    import warnings

    import tta_norm
    from tta_norm.presets import UnfittedTTNWarning

    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a truncated, corrupt or unreadable file is a miss, whatever the loader says
        return None
    state = payload.get("state_dict") if isinstance(payload, Mapping) else None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        return None
    with warnings.catch_warnings():  # the layout only: the weights are unfitted
        warnings.simplefilter("ignore", UnfittedTTNWarning)
        expected = tta_norm.adapt(model, "ttn").model.state_dict()
    if {k: tuple(v.shape) for k, v in state.items()} != {k: tuple(v.shape) for k, v in expected.items()}:
        return None
    return dict(state)


def resolve_entry_kwargs(
    preset: str,
    method: str | None,
    kwargs: Mapping[str, Any],
    model: nn.Module,
    *,
    dataset: str = "cifar10",
    data_dir: str | None = None,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
    init_states: Mapping[str, tuple[str, Any]] | None = None,
    expected_inputs: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The keyword arguments for :func:`tta_norm.adapt` of a benchmark entry, with :data:`ENTRY_KEYS` resolved.

    ``expected_inputs`` (the fingerprints of :func:`entry_inputs` taken when the grid started): the Fisher
    images and TTN source data loaded here must still have them, else ``ValueError`` (a file changed during
    the run; its results would be stored under the old fingerprint).

    ``fisher_samples`` becomes ``fisher_images`` (clean source images, :func:`clean_source_images`),
    ``ttn_fit`` becomes ``init_state`` (:func:`fitted_ttn_state`) and ``lr: paper`` / ``paper-vit`` becomes
    :func:`~tta_norm.methods.base.paper_sgd_lr` at ``batch_size``, and an ``init_state`` path found in
    ``init_states`` (path -> :func:`read_init_state`) the state read from it once.  Other keys pass through
    unchanged.
    """
    check_paper_lr(kwargs)
    out = {k: v for k, v in kwargs.items() if k not in ENTRY_KEYS}
    if isinstance(kwargs.get("lr"), str):
        if batch_size is None:
            raise ValueError(f"lr: {kwargs['lr']} scales with the batch size; none was given")
        out["lr"] = paper_sgd_lr(batch_size, vit=PAPER_LR[kwargs["lr"]], method=method)
    path = kwargs.get("init_state")
    if isinstance(path, (str, os.PathLike)) and init_states is not None and str(path) in init_states:
        out["init_state"] = init_states[str(path)][1]
    if "fisher_samples" in kwargs:
        if method != "eata":
            raise ValueError(f"fisher_samples is an EATA setting; the entry's method is {method!r}")
        n = fisher_sample_count(kwargs["fisher_samples"])
        images = clean_source_images(dataset, n, seed=int(kwargs.get("fisher_seed", 0)), data_dir=data_dir)
        if (expected_inputs or {}).get("fisher_images_sha256") is not None:
            from tta_norm.bench.identity import array_fingerprint

            _check_unchanged("Fisher images", expected_inputs["fisher_images_sha256"], array_fingerprint(images))
        out["fisher_images"] = images.to(device) if device is not None else images
    if "ttn_fit" in kwargs:
        if preset != "ttn":
            raise ValueError(f"ttn_fit fits the 'ttn' preset; the entry's preset is {preset!r}")
        if "init_state" in kwargs:
            raise ValueError("give either ttn_fit or init_state, not both")
        fit = kwargs["ttn_fit"] or {}
        if not isinstance(fit, Mapping):
            raise ValueError(f"ttn_fit must be a mapping of fit settings, got {fit!r}")
        expected = (expected_inputs or {}).get("ttn_source_sha256")
        out["init_state"] = fitted_ttn_state(model, fit, data_dir=data_dir, device=device, expected_source=expected)
    return out


def _check_unchanged(what: str, expected: str | None, found: str) -> None:
    """``ValueError`` when data read for a cell no longer has the fingerprint its grid's keys were made with."""
    if expected is not None and found != expected:
        raise ValueError(f"the {what} changed on disk since the run started (fingerprint {expected} expected, "
                         f"{found} found); rerun the grid on the current files")  # fmt: skip
