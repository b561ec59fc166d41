"""The grid engine: run the cells of a :class:`~tta_norm.bench.grid.GridJob` into a result store.

``run_grid(job, RunOptions(...))``:

1. refuses a directory that already holds results unless ``resume`` or ``overwrite`` is given;
2. loads what the cells need (model, data) once and fingerprints it (the identity that enters every cell key),
   before touching the directory, so a user mistake (:class:`ConfigError`) leaves it as it was; with
   ``resume`` a cell is reused only if a record with its full key is ``ok`` (failed cells are retried), and
   the log says how many cells were reused and why the others were not;
3. runs the remaining cells (this shard's slice of them) with the ``local`` executor (one after the other in
   this process, :mod:`tta_norm.bench.executors`) or the ``ray`` executor (one Ray task per cell; the driver
   owns the store and the progress bar, a task whose worker died is retried by Ray and recorded once);
4. appends each record as it arrives, then writes the CSV and report from the stored records only.

``provenance.json`` in the run directory lists every run into it: resolved config, git revision, versions,
device, start and end time, and the cell counts.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tta_norm._files import unwritable_ancestor
from tta_norm.bench.executors import CellRun, run_locally
from tta_norm.bench.grid import GridCell, GridJob, code_revisions, environment, git_revision, shard_cells
from tta_norm.bench.store import ResultStore, StoreContents, atomic_write
from tta_norm.bench.validate import ConfigError
from tta_norm.device import resolve_device

log = logging.getLogger("tta_norm.bench")

EXECUTORS = ("local", "ray")


@dataclass
class RunOptions:
    """How to run a grid: what to do with stored results, which shard, which executor, progress display."""

    resume: bool = False
    overwrite: bool = False
    shard: tuple[int, int] | None = None
    executor: str = "local"
    ray_address: str | None = None
    progress: bool | None = None  # None: a progress bar only when stderr is a terminal

    def check(self) -> None:
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite exclude each other; choose one")
        if self.executor not in EXECUTORS:
            raise ConfigError(f"--executor: must be one of {', '.join(EXECUTORS)}, got {self.executor!r}")


@dataclass
class GridOutcome:
    """What a run did: the directory, its cells, how many were reused/run/failed, and every stored record."""

    out: Path
    cells: int
    reused: int
    ran: int
    failed: int
    records: list[dict[str, Any]] = field(default_factory=list)
    report: Path | None = None

    @property
    def exit_status(self) -> int:
        """0 when every cell of this run is ok, 1 when some failed."""
        return 1 if self.failed else 0


def _device_name(device: Any) -> str:
    import torch

    if getattr(device, "type", "") == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    import platform

    return f"{device} ({platform.processor() or platform.machine()})"


def explain_stale(cell: GridCell, kind: str, identity: dict[str, Any], stored: StoreContents) -> str | None:
    """Why a stored record with the same coordinates cannot be reused: the identity parts that differ."""
    axes_key = cell.axes_key(kind)
    for rec in stored.records.values():
        if rec.get("axes_key") != axes_key or rec.get("kind") != kind:
            continue
        old = rec.get("identity") or {}
        diff = [part for part in sorted(set(identity) | set(old)) if identity.get(part) != old.get(part)]
        if diff:
            return f"{', '.join(diff)} differ"
    return None


def plan_cells(
    job: GridJob, cells: list[GridCell], identity: dict[str, Any], stored: StoreContents
) -> tuple[list[GridCell], list[GridCell], Counter]:
    """Split ``cells`` into reused (an ``ok`` record with the full key) and to-run, counting the reasons."""
    reused, todo, reasons = [], [], Counter()
    for cell in cells:
        rec = stored.records.get(job.cell_key(cell, identity))
        if rec is not None and rec.get("status") == "ok":
            reused.append(cell)
            continue
        todo.append(cell)
        if rec is not None:
            reasons["failed before, retried"] += 1
        else:
            reasons[explain_stale(cell, job.kind, job.cell_identity(cell, identity), stored) or "not stored"] += 1
    return reused, todo, reasons


def tracker_writers(names: list[str]) -> list[Any]:
    """The writer class of each tracker name; :class:`ConfigError` when its package is missing."""
    writers = []
    for name in names:
        if name == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ConfigError(f"trackers: tensorboard needs the tensorboard package ({err}); "
                                  "pip install 'tta-norm[tensorboard]'") from None  # fmt: skip
            writers.append(SummaryWriter)
    return writers


class Trackers:
    """Optional per-cell scalar loggers (``trackers: [tensorboard]``)."""

    def __init__(self, names: list[str], out: Path) -> None:
        self.writers = [writer(log_dir=str(out / "tensorboard")) for writer in tracker_writers(names)]

    def log(self, label: str, step: int, scalars: dict[str, float]) -> None:
        for w in self.writers:
            for name, value in scalars.items():
                w.add_scalar(f"{name}/{label}", value, step)
            w.flush()

    def close(self) -> None:
        for w in self.writers:
            w.close()


def write_provenance(out: Path, entry: dict[str, Any]) -> None:
    """Add or update this run's entry (by ``started``) in ``provenance.json``."""
    path = out / "provenance.json"
    store = ResultStore(out)
    with store.lock:
        runs = []
        if path.is_file():
            try:
                runs = json.loads(path.read_text()).get("runs", [])
            except (json.JSONDecodeError, AttributeError):
                runs = []
        runs = [r for r in runs if not (r.get("started") == entry["started"] and r.get("pid") == entry["pid"])]
        runs.append(entry)
        atomic_write(path, json.dumps({"runs": runs}, indent=1, default=str))


def check_output_dir(out: str | os.PathLike) -> Path:
    """``out`` as a run directory, or :class:`ConfigError`: an existing file, or under no writable directory
    (found before the model and data are loaded, and by a dry run)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output: {out} is a file, not a directory; choose another --output")
    parent = unwritable_ancestor(out)
    if parent is not None:
        raise ConfigError(f"output: cannot write into {out} ({parent} is not a writable directory)")
    return out


def run_grid(job: GridJob, options: RunOptions | None = None) -> GridOutcome:
    """Run ``job``'s cells into ``job.config.output`` (see the module docstring); raises :class:`ConfigError`
    for a user mistake before any cell runs."""
    options = options or RunOptions()
    options.check()
    cfg = job.config
    out = check_output_dir(cfg.output)
    cells = job.cells()
    mine = shard_cells(cells, options.shard)
    store = ResultStore(out)
    if store.exists() and not (options.resume or options.overwrite):
        n = len(store.read().records)
        raise ConfigError(
            f"output: {out} already holds {n} result(s); pass --resume to keep and extend them or --overwrite "
            "to replace them (or choose another --output)"
        )
    device = resolve_device(cfg.device)
    # model and data are loaded and fingerprinted before the directory is touched: a user mistake
    # (ConfigError) leaves it as it was, even with --overwrite
    state = job.prepare(device)
    identity = job.identity(state)
    tracker_writers(list(getattr(cfg, "trackers", []) or []))  # a missing package, too
    if options.executor == "ray":
        from tta_norm.bench.ray_executor import import_ray

        import_ray()
    if options.overwrite and options.shard is not None:  # the grid's other shards may share the directory
        store.retain({job.cell_key(c, identity) for c in cells} - {job.cell_key(c, identity) for c in mine})
    elif options.overwrite:
        store.clear()
    out.mkdir(parents=True, exist_ok=True)
    file_log = logging.FileHandler(out / "log.txt")
    file_log.setLevel(logging.INFO)
    file_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("tta_norm")
    root.addHandler(file_log)
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    try:
        return _run(job, options, cells, mine, store, out, device, state, identity)
    finally:
        root.removeHandler(file_log)
        file_log.close()


def _run(
    job: GridJob,
    options: RunOptions,
    cells: list[GridCell],
    mine: list[GridCell],
    store: ResultStore,
    out: Path,
    device: Any,
    state: Any,
    identity: dict[str, Any],
) -> GridOutcome:
    import os

    cfg = job.config
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    entry: dict[str, Any] = {
        "started": started, "pid": os.getpid(), "command": sys.argv, "config": cfg.to_dict(), "kind": job.kind,
        "git": git_revision(), "env": environment(), "device": _device_name(device), "executor": options.executor,
        "shard": options.shard, "status": "running",
        "grid_keys": sorted(job.cell_key(c, identity) for c in cells),  # a merge of shards checks it is complete
    }  # fmt: skip
    write_provenance(out, entry)
    atomic_write(out / "config.json", json.dumps(cfg.to_dict(), indent=1, default=str))

    stored = store.read()
    reused, todo, reasons = plan_cells(job, mine, identity, stored)
    shard_txt = f" (shard {options.shard[0]}/{options.shard[1]} of {len(cells)})" if options.shard else ""
    why = f" ({', '.join(f'{n} {why}' for why, n in reasons.items())})" if todo else ""
    log.info(f"{job.kind} {cfg.name}: {len(mine)} cells{shard_txt}, {len(reused)} reused from "
             f"{out / 'results.jsonl'}, {len(todo)} to run{why}")  # fmt: skip
    data = job.data_description(state)
    if data:
        log.info(f"data: {data}")

    trackers: Trackers | None = None
    failed = 0

    def on_record(rec: dict[str, Any], cell: GridCell) -> None:
        nonlocal failed
        rec["grid"] = cfg.name
        store.append(rec)
        if rec["status"] != "ok":
            failed += 1
            log.warning(f"cell {cell.index} {cell.label} failed: {rec.get('error')}")
        else:
            log.info(f"cell {cell.index} {cell.label}: done in {rec['seconds']:.1f} s")
            if trackers is not None:
                trackers.log(cell.label, cell.index, job.scalars(rec))

    status = "interrupted"
    try:
        trackers = Trackers(list(getattr(cfg, "trackers", []) or []), out)
        if todo:
            run = CellRun(job, todo, state, device, identity, on_record)
            if options.executor == "ray":
                from tta_norm.bench.ray_executor import run_on_ray

                run_on_ray(run, options.progress, options.ray_address)
            else:
                run_locally(run, options.progress)
        status = "finished"
    finally:
        if trackers is not None:
            trackers.close()
        entry.update(ended=time.strftime("%Y-%m-%dT%H:%M:%S%z"), cells=len(mine), reused=len(reused),
                     ran=len(todo), failed=failed, status=status)  # fmt: skip
        write_provenance(out, entry)
    keys = {job.cell_key(c, identity) for c in cells}  # the whole grid: other shards may share the directory
    stored_now = store.read().ordered()
    records = [r for r in stored_now if r["key"] in keys]
    others = len(stored_now) - len(records)
    if others:
        log.info(f"{others} stored record(s) of other grids (another model, data, parameters or cells) stay in "
                 f"{store.path.name} but are not in this report")  # fmt: skip
    revisions = code_revisions(records)
    if len(revisions) > 1:
        log.warning(f"the {len(records)} records come from {len(revisions)} code revisions "
                    f"({', '.join(revisions)}): a resumed run mixed code versions under the same keys; "
                    "--overwrite reruns every cell on one")  # fmt: skip
    stored_keys = {r["key"] for r in records}
    lost = sum(job.cell_key(c, identity) not in stored_keys for c in mine)
    if lost:
        log.warning(f"{lost} of this run's cells have no record in {store.path.name} now (another process cleared "
                    "or replaced it?); they count as failed, --resume runs them")  # fmt: skip
        failed += lost
    report = job.write_outputs(out, records, missing=len(cells) - len(records))
    if failed:
        log.warning(f"{failed} of {len(todo)} cells failed (their errors are in {out / 'results.jsonl'}); "
                    "--resume retries them")  # fmt: skip
    return GridOutcome(out, len(mine), len(reused), len(todo), failed, records, report)
