"""Run a benchmark grid: every cell adapts a fresh copy of the source model over a deterministic stream.

Results are written as each cell finishes (``results.jsonl`` and ``results.csv``, atomically replaced), so
an interrupted grid resumes with ``resume=True`` by skipping the cells already stored.  A cell that fails
(e.g. a preset that is undefined at batch size 1 for the model) is stored with its error and the grid goes on.
"""

from __future__ import annotations

import json
import platform
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import tta_norm
from tta_norm.bench.config import BenchConfig, Cell
from tta_norm.bench.store import ResultStore, atomic_write
from tta_norm.data.benchmark import CorruptionBenchmark, load_corruption_benchmark
from tta_norm.device import resolve_device
from tta_norm.methods.entries import resolve_entry_kwargs
from tta_norm.metrics import BatchTimer, MetricsAccumulator, PeakMemory
from tta_norm.streams import StreamLoader, StreamSpec, build_stream, domain_schedule
from tta_norm.streams.plan import GRADUAL_SEVERITIES, StreamPlan


def needed_severities(cfg: BenchConfig) -> list[int]:
    sev = set(cfg.severities)
    if any(s == "gradual" for s in (StreamSpec(setting=x).setting for x in cfg.settings)):
        sev |= set(GRADUAL_SEVERITIES)
    return sorted(sev)


def load_source_model(cfg: BenchConfig, device: torch.device) -> torch.nn.Module:
    """The source model: ``checkpoint`` null (the model's default/shared weights), ``"finetuned"``
    (prepared on the source split by :func:`tta_norm.training.prepare_source_model`, trained on first use) or a path;
    ``weights`` / ``random_init`` as for :func:`tta_norm.models.load_model`; outputs restricted to the dataset's
    classes (ImageNet-R/A: 200 logits)."""
    from tta_norm.data.natural import restrict_outputs
    from tta_norm.models import load_model

    checkpoint = cfg.checkpoint
    if checkpoint == "finetuned":
        from tta_norm.training import prepare_source_model

        checkpoint = str(prepare_source_model(cfg.model, data_dir=cfg.data_dir, device=device))
    weights, random_init = getattr(cfg, "weights", None), getattr(cfg, "random_init", False)  # attack configs lack them
    model = load_model(cfg.model, checkpoint, weights=weights, random_init=random_init, device=device)
    return restrict_outputs(model, cfg.dataset)


def cell_plan(cell: Cell, bench: CorruptionBenchmark, cfg: BenchConfig) -> StreamPlan:
    """The cell's stream: its domains in benchmark order, its setting/order/batch size, seeded by the cell."""
    severities = [cell.severity] if cell.setting != "gradual" else [5]
    schedule = domain_schedule(cfg.corruptions, severities, cell.setting, clean_interleaved=cfg.clean_interleaved)
    spec = StreamSpec(
        setting=cell.setting,
        order=cell.order,
        delta=cell.delta if cell.delta is not None else 0.1,
        batch_size=cell.batch_size,
        clean_interleaved=cfg.clean_interleaved,
    )
    return build_stream(bench.labels(), schedule, spec, seed=cell.seed)


def run_cell(
    cell: Cell,
    model: torch.nn.Module,
    bench: CorruptionBenchmark,
    cfg: BenchConfig,
    device: torch.device,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Adapt a copy of ``model`` over the cell's stream; return the metrics summary (JSON-friendly)."""
    plan = cell_plan(cell, bench, cfg)
    loader = StreamLoader(plan, bench.domains, device=device, batch_size=cell.batch_size)
    torch.manual_seed(cell.seed)
    entry = cell.entry
    kwargs = resolve_entry_kwargs(entry.preset, entry.method, dict(entry.kwargs), model, dataset=cfg.dataset,
                                  data_dir=cfg.data_dir, device=device)  # fmt: skip
    tta = tta_norm.adapt(model, entry.preset, entry.method, device=device, on_bad_batch=cfg.on_bad_batch, **kwargs)
    acc = MetricsAccumulator.from_plan(plan)
    timer = BatchTimer(device)
    no_grad = torch.no_grad() if entry.method is None else torch.enable_grad()
    with PeakMemory(device) as mem, no_grad:
        for batch in loader:
            if batch.reset:
                tta.reset()
            skipped = tta.skipped_batches
            with timer:
                logits = tta(batch.x)
            acc.update(logits, batch.y, batch.domain, latency=timer.last,
                       skipped=tta.skipped_batches - skipped, segment=batch.segment)  # fmt: skip
            if progress is not None:
                progress(len(batch.y))
    acc.memory = mem.result
    summary = acc.summary()
    summary["stream_fingerprint"] = plan.fingerprint()
    summary["samples_per_second"] = len(plan) / max(sum(timer.times), 1e-9)
    return summary


def environment() -> dict[str, Any]:
    return {
        "tta_norm": tta_norm.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }


def cell_record(
    key: str, cell: dict[str, Any], data: dict[str, Any] | str, work: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """Run one cell's ``work()`` (its metrics) and wrap the outcome in a result record: ``key``, ``cell``,
    ``env``, ``data``, ``status`` ("ok", or "failed" with ``error`` and ``traceback`` for a ``ValueError`` /
    ``RuntimeError``, so one bad cell does not stop a grid) and ``seconds``."""
    start = time.perf_counter()
    record: dict[str, Any] = {"key": key, "cell": cell, "env": environment(), "data": data}
    try:
        record["metrics"] = work()
        record["status"] = "ok"
    except (ValueError, RuntimeError) as err:
        record["status"] = "failed"
        record["error"] = f"{type(err).__name__}: {err}"
        record["traceback"] = traceback.format_exc(limit=3)
    record["seconds"] = time.perf_counter() - start
    return record


def run_benchmark(cfg: BenchConfig, *, resume: bool = False, progress: bool = True) -> Path:
    """Run every cell of ``cfg`` (skipping stored ones with ``resume``), write results and the report."""
    out = Path(cfg.output)
    cells = cfg.cells()  # validates the grid before any data or model is loaded
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "config.json", json.dumps(cfg.to_dict(), indent=1))
    store = ResultStore(out, resume)
    todo = [c for c in cells if not store.done(c.key())]
    if progress:
        print(f"[tta-norm bench] {len(cells)} cells, {len(cells) - len(todo)} already done; results in {out}")
    if todo:
        device = resolve_device(cfg.device)
        model = load_source_model(cfg, device)
        bench = load_corruption_benchmark(
            cfg.dataset, cfg.corruptions, needed_severities(cfg), data_dir=cfg.data_dir, source=cfg.source,
            include_clean=cfg.clean_interleaved, n_examples=cfg.n_examples, seed=cfg.data_seed, progress=progress,
            imagenet_ids=cfg.imagenet_ids,
        )  # fmt: skip
        if progress:
            print(f"[tta-norm bench] data: {bench.describe()}")
        total = sum(len(cell_plan(c, bench, cfg)) for c in todo)
        with tqdm(total=total, unit="img", desc="bench", disable=not progress, smoothing=0.05) as bar:
            for cell in todo:
                bar.set_postfix_str(f"{cell.entry.label} {cell.setting} b{cell.batch_size} s{cell.seed}")
                record = cell_record(
                    cell.key(), cell.describe(), bench.describe(),
                    lambda: run_cell(cell, model, bench, cfg, device, progress=bar.update),  # noqa: B023
                )  # fmt: skip
                if progress and record["status"] == "failed":
                    tqdm.write(f"[tta-norm bench] cell {cell.entry.label} failed: {record['error']}")
                store.add(record)
    from tta_norm.bench.report import write_report

    write_report(out, list(store.records.values()), cfg, plots=cfg.plots)
    return out
