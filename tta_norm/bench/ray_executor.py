"""The Ray executor of the grid engine (``--executor ray``; needs the optional ``ray`` extra).

Each cell is one Ray task declaring the config's per-cell ``resources`` (``num_cpus``, ``num_gpus``); the job and
its prepared state (model, data) are put in the object store once. A task sets its torch thread count to its CPU
share, so N parallel tasks of one CPU each use the same total threads as a serial run with N threads. The driver
keeps the store and the progress bar: records arrive as tasks finish and are appended there only, so each cell is
recorded once. Cells start longest first (:meth:`GridJob.cost`), the classic LPT rule: a grid with a few costly
cells (gradient methods) does not end with one worker busy and the others idle. Ray does not promise to start queued
tasks in submission order, so the driver submits only as many tasks as the cluster can run at once (its CPUs, and
GPUs, over the per-cell ``resources``, read again as tasks finish, so a growing cluster gets more) and the next one
as each finishes. A worker that dies mid-cell (killed, out of memory) makes Ray re-run the task (``max_retries``); a
cell that still cannot finish is recorded as failed with Ray's error. ``ray.init(address=...)`` joins a running
cluster; without an address a local one is started and stopped, with its workers at normal priority (Ray starts
workers at niceness 15 by default, which starves the cells on a shared machine; set ``RAY_worker_niceness`` to
choose otherwise).
"""

from __future__ import annotations

import logging
import os
from collections import deque
from typing import Any

from tta_norm.bench.executors import CellRun, planned, progress_bar
from tta_norm.bench.grid import GridCell, GridJob
from tta_norm.bench.validate import ConfigError

log = logging.getLogger("tta_norm.bench")

#: how many times Ray re-runs a task whose worker process died
MAX_RETRIES = 3


def import_ray():
    try:
        import ray
    except ImportError as err:
        raise ConfigError(f"--executor ray needs the ray package ({err}); pip install 'tta-norm[ray]'") from None
    return ray


def _run_cell_task(job: GridJob, cell: GridCell, state: Any, device: str, identity: dict, threads: int) -> dict:
    import torch

    torch.set_num_threads(max(1, threads))
    return job.record(cell, state, torch.device(device), identity)


def cluster_slots(total: dict[str, float], num_cpus: float, num_gpus: float) -> int:
    """How many cells of ``num_cpus`` CPUs and ``num_gpus`` GPUs a cluster with ``total`` resources runs at once
    (at least 1: a cell larger than the cluster still queues, and Ray says why it waits)."""
    slots = [int(total.get(name, 0) // need) for name, need in (("CPU", num_cpus), ("GPU", num_gpus)) if need > 0]
    return max(1, min(slots)) if slots else 1_000_000


def run_on_ray(run: CellRun, progress: bool | None = None, address: str | None = None) -> None:
    """Run the cells as Ray tasks (joining the cluster at ``address``, or a local one started and stopped here);
    ``run.on_record`` is called in the driver as each finishes."""
    ray = import_ray()
    started_here = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"address": address} if address else {}
        if not address:
            os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(log_to_driver=False, include_dashboard=False, **kwargs)
        started_here = True
    try:
        job = run.job
        res = dict(getattr(job.config, "resources", None) or {"num_cpus": 1, "num_gpus": 0})
        threads = int(res.get("num_cpus", 1) or 1)
        task = ray.remote(_run_cell_task).options(
            num_cpus=res.get("num_cpus", 1), num_gpus=res.get("num_gpus", 0), max_retries=MAX_RETRIES,
            retry_exceptions=False,
        )  # fmt: skip
        job_ref, state_ref = ray.put(job), ray.put(run.state)
        # longest first, and only as many in flight as can run: the costliest cells must not be left for the end
        queue = deque(sorted(run.cells, key=lambda cell: planned(job.cost, cell, run.state), reverse=True))
        pending: dict[Any, GridCell] = {}

        def submit() -> None:
            room = cluster_slots(ray.cluster_resources(), float(res.get("num_cpus", 1)), float(res.get("num_gpus", 0)))
            while queue and len(pending) < room:
                cell = queue.popleft()
                pending[task.remote(job_ref, cell, state_ref, str(run.device), run.identity, threads)] = cell

        log.info(f"ray: {len(queue)} tasks on {ray.cluster_resources().get('CPU', 0):g} CPUs, "
                 f"{res.get('num_cpus', 1):g} CPU(s) and {res.get('num_gpus', 0):g} GPU(s) per cell")  # fmt: skip
        submit()
        with progress_bar(len(run.cells), progress, f"{job.kind} (ray)") as bar:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    cell = pending.pop(ref)
                    try:
                        rec = ray.get(ref)
                    except Exception as err:  # noqa: BLE001 - worker died MAX_RETRIES + 1 times, or Ray failed
                        msg = str(err).strip().splitlines()[0] if str(err).strip() else ""
                        rec = run.failed(cell, f"{type(err).__name__}: {msg}")
                    run.on_record(rec, cell)
                    bar.update(1)
                submit()
    finally:
        if started_here:
            ray.shutdown()
