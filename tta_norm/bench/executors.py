"""What the grid engine's executors share: the cells to run with what their records need (:class:`CellRun`),
the progress bar, and the ``local`` executor (one cell after the other in this process).  The ``ray`` executor
is :mod:`tta_norm.bench.ray_executor`; :mod:`tta_norm.bench.engine` chooses between them."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tta_norm.bench.grid import GridCell, GridJob, failed_record


@dataclass
class CellRun:
    """The cells an executor runs, what every record needs (the job, its prepared state, the device, the grid's
    identity) and ``on_record``, called in this process with each record as it arrives."""

    job: GridJob
    cells: list[GridCell]
    state: Any
    device: Any
    identity: dict[str, Any]
    on_record: Callable[[dict[str, Any], GridCell], None]

    def failed(self, cell: GridCell, error: str) -> dict[str, Any]:
        """The record of a cell that could not finish, with ``error`` as its message."""
        identity = self.job.cell_identity(cell, self.identity)
        return failed_record(self.job.kind, cell, identity, self.job.data_description(self.state), error)


class LogProgress:
    """Progress as log lines (``tta_norm.bench`` logger, INFO), at most one every ``interval`` seconds: for runs
    whose stderr is a file (``nohup``, batch jobs), where a bar would be invisible until the end.  The subset
    of tqdm's interface the executors use (``update``, ``set_postfix_str``, a context manager)."""

    def __init__(self, total: int, desc: str, interval: float = 300.0, clock: Callable[[], float] = time.monotonic):
        self.total, self.desc, self.interval, self.clock = total, desc, interval, clock
        self.done, self.postfix = 0, ""
        self.start = self.last = clock()

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def update(self, n: int = 1) -> None:
        self.done += n
        now = self.clock()
        if now - self.last < self.interval or self.done >= self.total:
            return
        self.last = now
        elapsed = now - self.start
        left = elapsed * (self.total - self.done) / self.done if self.done else float("nan")
        at = f"; at {self.postfix}" if self.postfix else ""
        logging.getLogger("tta_norm.bench").info(
            f"{self.desc}: {self.done}/{self.total} work units ({100 * self.done / max(self.total, 1):.0f} %), "
            f"{elapsed / 60:.1f} min elapsed, about {left / 60:.0f} min left{at}"
        )


def progress_bar(total: int, enabled: bool | None, desc: str) -> Any:
    """A tqdm bar on stderr; ``enabled=None`` shows it when stderr is a terminal and otherwise logs a progress
    line every 5 minutes (:class:`LogProgress`); ``False`` shows nothing."""
    from tqdm.auto import tqdm

    if enabled is None and not sys.stderr.isatty():
        return LogProgress(total, desc)
    return tqdm(total=total, desc=desc, disable=not enabled, smoothing=0.05, file=sys.stderr)


def planned(measure: Callable[[GridCell, Any], float], cell: GridCell, state: Any) -> float:
    """``measure(cell, state)`` (a job's ``work`` or ``cost``), or 0 when planning the cell fails (an infeasible
    stream): that cell then fails on its own when it runs, with the reason in its record, and the grid goes on."""
    try:
        return measure(cell, state)
    except Exception:  # noqa: BLE001 - reported by the cell's own run
        return 0


def run_locally(run: CellRun, progress: bool | None = None) -> None:
    """Run the cells one after the other in this process, with a progress bar over their work units."""
    job = run.job
    total = int(sum(planned(job.work, c, run.state) for c in run.cells))
    with progress_bar(total, progress, job.kind) as bar:
        for cell in run.cells:
            bar.set_postfix_str(cell.label)
            try:
                rec = job.record(cell, run.state, run.device, run.identity, progress=bar.update)
            except KeyboardInterrupt:
                raise
            except BaseException as err:  # noqa: BLE001 - e.g. SystemExit from inside a cell
                rec = run.failed(cell, f"{type(err).__name__}: {err}")
            run.on_record(rec, cell)
