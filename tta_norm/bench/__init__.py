"""The benchmark harness: configs (grid of presets x methods x streams x batch sizes x seeds), runner, report."""

from tta_norm.bench.config import BenchConfig, Cell, ConfigError, MethodEntry, load_config, shipped_configs
from tta_norm.bench.report import write_report
from tta_norm.bench.runner import run_benchmark, run_cell

__all__ = [
    "BenchConfig",
    "Cell",
    "ConfigError",
    "MethodEntry",
    "load_config",
    "run_benchmark",
    "run_cell",
    "shipped_configs",
    "write_report",
]
