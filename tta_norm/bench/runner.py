"""The benchmark grid as a job of the grid engine: every cell adapts a fresh copy of the source model over a
deterministic stream of the corruption benchmark.

:class:`BenchJob` lists the cells of a :class:`~tta_norm.bench.config.BenchConfig`, loads the model and data
once, fingerprints them for the cell keys, runs one cell (:func:`run_cell`) and writes the CSV and report
from the stored records; :func:`run_benchmark` runs it with :func:`tta_norm.bench.engine.run_grid` (store,
resume, shards, executors: see that module).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import tta_norm
from tta_norm.bench.config import BenchConfig, Cell, MethodEntry
from tta_norm.bench.engine import GridOutcome, RunOptions, run_grid  # noqa: F401 - re-exported
from tta_norm.bench.grid import GridCell, ModelDataJob
from tta_norm.bench.store import atomic_write, records_to_csv
from tta_norm.bench.validate import check_model_outputs, user_error
from tta_norm.data.benchmark import CorruptionBenchmark, load_corruption_benchmark
from tta_norm.methods.entries import resolve_entry_kwargs
from tta_norm.metrics import BatchTimer, MetricsAccumulator, PeakMemory
from tta_norm.presets import get_preset
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
    model = load_model(cfg.model, checkpoint, weights=weights, random_init=random_init, device=device,
                       num_classes=robustbench_classes(cfg.model, cfg.dataset))  # fmt: skip
    return restrict_outputs(model, cfg.dataset)


def robustbench_classes(model: str, dataset: str) -> int | None:
    """For an ``rb:<name>`` model without its own dataset part, the class count of the benchmark's dataset (so
    ``rb:`` resolves to that dataset's checkpoint, not to CIFAR-10's); ``None`` otherwise."""
    from tta_norm.data.benchmark import NUM_CLASSES

    name = model.strip()
    if not name.startswith("rb:") or "/" in name:
        return None
    return NUM_CLASSES.get(dataset, 1000)


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
    init_states: dict[str, tuple[str, Any]] | None = None,
    expected_inputs: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Adapt a copy of ``model`` over the cell's stream; return the metrics summary (JSON-friendly).
    ``init_states`` / ``expected_inputs``: the entries' ``init_state`` files and input fingerprints as taken
    once by the job (:meth:`~tta_norm.bench.grid.ModelDataJob.prepare_entries`)."""
    plan = cell_plan(cell, bench, cfg)
    loader = StreamLoader(plan, bench.domains, device=device, batch_size=cell.batch_size)
    torch.manual_seed(cell.seed)
    entry = cell.entry
    kwargs = resolve_entry_kwargs(entry.preset, entry.method, dict(entry.kwargs), model, dataset=cfg.dataset,
                                  data_dir=cfg.data_dir, device=device, batch_size=cell.batch_size,
                                  init_states=init_states, expected_inputs=expected_inputs)  # fmt: skip
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


#: config keys (besides the cell's axes) that change a bench cell's result
BENCH_PARAMS = ("dataset", "source", "corruptions", "n_examples", "clean_interleaved", "data_seed", "on_bad_batch",
                "imagenet_ids")  # fmt: skip


def load_bench_data(cfg: BenchConfig, progress: bool = False) -> CorruptionBenchmark:
    return load_corruption_benchmark(
        cfg.dataset, cfg.corruptions, needed_severities(cfg), data_dir=cfg.data_dir, source=cfg.source,
        include_clean=cfg.clean_interleaved, n_examples=cfg.n_examples, seed=cfg.data_seed, progress=progress,
        imagenet_ids=cfg.imagenet_ids,
    )  # fmt: skip


#: rough compute per image relative to a norm-only forward (measured on the CIFAR ResNets): a gradient method
#: adds a backward pass and an optimiser step; median statistics need a selection per channel
GRADIENT_METHOD_COST = 2.5
MEDIAN_STATISTICS_COST = 1.3


def method_cost(entry: MethodEntry) -> float:
    """Relative compute of one image through a method entry, for scheduling cells (longest first)."""
    try:
        median = get_preset(entry.preset).spec.estimator.startswith("median")
    except KeyError:  # a preset only the cell knows (validated elsewhere)
        median = False
    return (GRADIENT_METHOD_COST if entry.method else 1.0) * (MEDIAN_STATISTICS_COST if median else 1.0)


class BenchJob(ModelDataJob):
    """The cells of a :class:`BenchConfig` for the grid engine.  ``model`` and ``bench`` skip loading them
    (a model and benchmark prepared by the caller, e.g. a random-subset benchmark)."""

    kind = "bench"
    PARAMS = BENCH_PARAMS

    def __init__(self, cfg: BenchConfig, *, model: torch.nn.Module | None = None, bench: Any = None) -> None:
        self.config = cfg
        self._model = model
        self._bench = bench

    def cells(self) -> list[GridCell]:
        return [GridCell(i, c.describe(), c.label, c) for i, c in enumerate(self.config.cells())]

    def validate(self) -> None:
        from tta_norm.bench.validate import check_data_available, check_model

        cfg = self.config
        if self._model is None:
            check_model(cfg.model, cfg.checkpoint, weights=cfg.weights, random_init=cfg.random_init,
                        num_classes=robustbench_classes(cfg.model, cfg.dataset))  # fmt: skip
        if self._bench is None:
            check_data_available(cfg.dataset, cfg.data_dir, cfg.source, cfg.corruptions, needed_severities(cfg),
                                 cfg.imagenet_ids)  # fmt: skip
        self.locate_entry_inputs()

    def prepare(self, device: Any) -> dict[str, Any]:
        cfg = self.config
        try:
            model = self._model if self._model is not None else load_source_model(cfg, device)
        except (FileNotFoundError, ValueError, KeyError) as err:
            raise user_error("model", err) from None
        try:
            bench = self._bench if self._bench is not None else load_bench_data(cfg)
        except (FileNotFoundError, ValueError) as err:
            raise user_error("data", err) from None
        model = model.to(device)
        check_model_outputs(model, bench, cfg.dataset, device)
        return {"model": model, "bench": bench, **self.prepare_entries()}

    def work(self, cell: GridCell, state: dict[str, Any]) -> int:
        return len(cell_plan(cell.payload, state["bench"], self.config))

    def cost(self, cell: GridCell, state: dict[str, Any]) -> float:
        """Images x the relative cost of the cell's method (:func:`method_cost`)."""
        return self.work(cell, state) * method_cost(cell.payload.entry)

    def run_cell(self, cell: GridCell, state: dict[str, Any], device: Any, progress: Callable[[int], None] | None):
        expected = self.entry_fingerprints(cell, state)
        return run_cell(cell.payload, state["model"], state["bench"], self.config, device, progress=progress,
                        init_states=state.get("init_states"), expected_inputs=expected)  # fmt: skip

    def scalars(self, record: dict[str, Any]) -> dict[str, float]:
        m = record.get("metrics") or {}
        return {k: 100 * float(m[k]) for k in ("error", "mean_domain_error", "ece") if m.get(k) is not None}

    def write_outputs(self, out: Path, records: list[dict[str, Any]], missing: int = 0) -> Path:
        return write_bench_outputs(out, records, plots=self.config.plots, missing=missing)


def write_bench_outputs(out: Path, records: list[dict[str, Any]], *, plots: bool = True, missing: int = 0) -> Path:
    """``results.csv`` and ``report.md`` (and plots) from stored bench records."""
    from tta_norm.bench.report import write_report

    atomic_write(out / "results.csv", records_to_csv(records))
    return write_report(out, records, plots=plots, missing=missing)


def run_benchmark(cfg: BenchConfig, options: RunOptions | None = None, **kwargs: Any) -> GridOutcome:
    """Run every cell of ``cfg`` with the grid engine (``options`` or its fields as keyword arguments:
    ``resume``, ``overwrite``, ``shard``, ``executor``, ``progress``); the CSV and report are written from
    the stored records."""
    return run_grid(BenchJob(cfg), options or RunOptions(**kwargs))
