"""A small grid job for the engine tests: cells are numbers, a cell's metric is ``value * scale``.

Options make a cell fail (``fail``), sleep (``sleep``), or kill its own process the first time it runs
(``kill_marker``: a file created before the kill, so the retried task goes through).  A cell's cost is its
number."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tta_norm.bench.grid import GridCell, GridJob
from tta_norm.bench.store import atomic_write


@dataclass
class ToyConfig:
    output: str
    name: str = "toy"
    values: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    scale: int = 1
    fail: list[int] = field(default_factory=list)
    sleep: float = 0.0
    kill_marker: str | None = None
    kill_value: int | None = None
    record_start: bool = False  # metrics get the wall-clock times the cell started and finished
    device: str = "cpu"
    plots: bool = False
    resources: dict[str, float] = field(default_factory=lambda: {"num_cpus": 1, "num_gpus": 0})
    trackers: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ToyJob(GridJob):
    kind = "toy"

    def __init__(self, cfg: ToyConfig) -> None:
        self.config = cfg

    def cells(self) -> list[GridCell]:
        return [GridCell(i, {"value": v}, f"v{v}", v) for i, v in enumerate(self.config.values)]

    def prepare(self, device: Any) -> dict[str, Any]:
        return {"scale": self.config.scale}

    def identity(self, state: dict[str, Any]) -> dict[str, Any]:
        return {"model": {"name": "toy"}, "params": {"scale": state["scale"]}, "version": "test"}

    def data_description(self, state: dict[str, Any]) -> str:
        return "toy data"

    def warm_up(self, state: Any, device: Any) -> None:
        pass

    def cost(self, cell: GridCell, state: Any) -> float:
        return float(cell.payload)

    def run_cell(self, cell: GridCell, state: dict[str, Any], device: Any, progress: Any) -> dict[str, Any]:
        cfg = self.config
        started = time.time()
        if cfg.kill_marker and cell.payload == cfg.kill_value and not Path(cfg.kill_marker).exists():
            Path(cfg.kill_marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        if cfg.sleep:
            time.sleep(cfg.sleep)
        if cell.payload in cfg.fail:
            raise RuntimeError(f"cell {cell.payload} fails on purpose")
        metrics = {"value": cell.payload * state["scale"], "pid": os.getpid()}
        return {**metrics, "started": started, "finished": time.time()} if cfg.record_start else metrics

    def scalars(self, record: dict[str, Any]) -> dict[str, float]:
        return {"value": float(record["metrics"]["value"])}

    def write_outputs(self, out: Path, records: list[dict[str, Any]], missing: int = 0) -> Path:
        lines = [json.dumps([r["cell"]["value"], r["status"], (r.get("metrics") or {}).get("value")]) for r in records]
        atomic_write(out / "results.csv", "\n".join(lines) + "\n")
        path = out / "report.md"
        atomic_write(path, "\n".join(lines + ([f"missing {missing}"] if missing else [])) + "\n")
        return path
