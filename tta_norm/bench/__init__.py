"""The benchmark harness: configs (grid of presets x methods x streams x batch sizes x seeds), the grid engine
(keyed store, resume, shards, executors), runner, report."""

from tta_norm.bench.config import BenchConfig, Cell, ConfigError, MethodEntry, load_config, shipped_configs
from tta_norm.bench.engine import GridOutcome, RunOptions, run_grid
from tta_norm.bench.grid import GridCell, GridJob
from tta_norm.bench.report import write_report
from tta_norm.bench.runner import BenchJob, run_benchmark, run_cell
from tta_norm.bench.store import ResultStore

__all__ = [
    "BenchConfig",
    "BenchJob",
    "Cell",
    "ConfigError",
    "GridCell",
    "GridJob",
    "GridOutcome",
    "MethodEntry",
    "ResultStore",
    "RunOptions",
    "load_config",
    "run_benchmark",
    "run_cell",
    "run_grid",
    "shipped_configs",
    "write_report",
]
