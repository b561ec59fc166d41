"""Random-subset corruption benchmarks and a grid runner over them, for CPU-budget measurements.

``tta_norm.data.load_corruption_benchmark(n_examples=n)`` keeps the *first* n test images, which for the
class-sorted JPEG mirror are one class.  :func:`subset_corruption_benchmark` instead draws a seeded random
subset of the clean test set and regenerates the corruptions for those images only (with the harness's
``regenerate_domain``, cached in its own directory).  :func:`run_grid` runs the cells of a
:class:`~tta_norm.bench.BenchConfig` over such a benchmark with the grid engine (the bench's job, store and
report).  :func:`corruption_errors` is a quicker measurement without the grid: a model's mean error over the
domains as it is and with test-batch statistics (the small-batch training study's).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from tta_norm.data.tensors import to_float_nchw
from tta_norm.fitting._data import seeded_subset


def subset_corruption_benchmark(
    n_per_domain: int,
    corruptions: Sequence[str] | None = None,
    severities: Sequence[int] = (5,),
    *,
    subset_seed: int = 0,
    data_seed: int = 0,
    include_clean: bool = False,
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    corrupt: Any = None,
    progress: bool = True,
):
    """A CIFAR-10-C benchmark on ``n_per_domain`` random clean test images (the same images in every domain).

    ``corrupt`` replaces the generator ``corruptions.corrupt`` (tests); it needs its own ``cache_dir`` (the
    default cache holds the real generator's images, and serves them by corruption name)."""
    from tqdm.auto import tqdm

    from tta_norm.data import CLEAN, CORRUPTIONS, CorruptionBenchmark, load_clean_test_set, regenerate_domain
    from tta_norm.data.paths import data_cache_dir

    if corrupt is not None and cache_dir is None:
        raise ValueError("corrupt= needs its own cache_dir= (the default cache is the real generator's)")
    corruptions = list(corruptions or CORRUPTIONS)
    clean_all = load_clean_test_set("cifar10", data_dir, progress)
    idx = np.sort(seeded_subset(len(clean_all), n_per_domain, subset_seed))
    clean = clean_all.subset(idx)
    h = hashlib.sha1(np.ascontiguousarray(clean.images).data)
    try:
        from tta_norm.data.benchmark import _generator_hash

        gen_hash = _generator_hash()
    except Exception:  # pragma: no cover - the generator package is optional
        gen_hash = "unknown"
    root = Path(cache_dir) if cache_dir is not None else data_cache_dir() / "regenerated-subsets"
    directory = root / f"cifar10-{h.hexdigest()[:12]}-n{len(idx)}" / f"cifar-seed{data_seed}-{gen_hash}"
    domains, provenance = {}, {}
    todo = [(c, s) for c in corruptions for s in severities]
    with tqdm(total=len(todo), desc="corruption subset", unit="domain", disable=not progress) as bar:
        for c, s in todo:
            domains[(c, s)] = regenerate_domain(clean, c, s, directory, seed=data_seed, corrupt=corrupt)
            provenance[(c, s)] = "regenerated"
            bar.update(1)
    if include_clean:
        domains[CLEAN] = clean
        provenance[CLEAN] = "clean"
    note = (
        f"regenerated from a random subset of {len(idx)} images of {clean_all.source} "
        f"(subset seed {subset_seed}, corruption seed {data_seed}, cache {directory})"
    )
    return CorruptionBenchmark("cifar10", domains, provenance, clean_all.source, [note])


def run_grid(
    cfg: Any,
    bench: Any,
    model: torch.nn.Module,
    *,
    resume: bool = True,
    overwrite: bool = False,
    progress: bool | None = None,
) -> Path:
    """Run every cell of ``cfg`` (a ``BenchConfig``) over ``bench`` with the grid engine
    (:func:`tta_norm.bench.engine.run_grid`: keyed append-only store, resume, report from the records);
    returns the output directory."""
    from tta_norm.bench.engine import RunOptions
    from tta_norm.bench.engine import run_grid as run_job
    from tta_norm.bench.runner import BenchJob

    options = RunOptions(resume=resume, overwrite=overwrite, progress=progress)
    return run_job(BenchJob(cfg, model=model, bench=bench), options).out


def error_table(out: str | os.PathLike, metric: str = "error") -> dict[tuple[str, int], float]:
    """``{(method label, batch size): error %}`` of the last run's grid in ``out`` (the records listed in its
    ``results.csv``; status ok only)."""
    import csv

    from tta_norm.bench.store import ResultStore

    with open(Path(out) / "results.csv", newline="") as f:
        listed = {row["key"] for row in csv.DictReader(f)}
    table = {}
    for rec in ResultStore(out).read().ordered():
        if rec.get("status") != "ok" or rec["key"] not in listed:
            continue
        m = rec["metrics"]
        value = m.get(metric)
        if value is None:
            continue
        table[(rec["cell"]["method"]["name"], rec["cell"]["batch_size"])] = float(value)
    return table


@torch.no_grad()
def classification_error(
    model: nn.Module, images: np.ndarray, labels: np.ndarray, device: torch.device, batch_size: int = 200
) -> float:
    """Top-1 error of ``model`` (called as it is: its mode is not changed) on uint8 NHWC ``images``, in batches."""
    wrong = 0
    for i in range(0, len(labels), batch_size):
        x = to_float_nchw(torch.from_numpy(np.array(images[i : i + batch_size]))).to(device)
        wrong += int((model(x).argmax(1).cpu().numpy() != labels[i : i + batch_size]).sum())
    return wrong / len(labels)


def corruption_errors(model: nn.Module, bench: Any, device: torch.device) -> dict[str, float]:
    """Mean :func:`classification_error` over the domains of ``bench`` (a corruption benchmark): ``source``, the
    model as it is, always; ``tbn``, a fresh ``tta_norm.adapt(model, "tbn")`` per domain (batches of 200, reset
    per corruption), when the model has BatchNorm layers."""
    import tta_norm

    domains = bench.domains.values()
    out = {"source": float(np.mean([classification_error(model, d.images, d.labels, device) for d in domains]))}
    if any(isinstance(m, _BatchNorm) for m in model.modules()):
        out["tbn"] = float(np.mean([classification_error(tta_norm.adapt(model, "tbn"), d.images, d.labels, device)
                                    for d in domains]))  # fmt: skip
    return out
