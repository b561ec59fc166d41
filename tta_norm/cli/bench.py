"""``tta-norm bench``: run a benchmark grid from a YAML config with command-line overrides, or merge run
directories (``tta-norm bench merge DIR... -o OUT``).  Arguments and driver: :mod:`tta_norm.cli.grid`.
Exit status: 0 every cell ok, 1 some cells failed (recorded; ``--resume`` retries them), 2 a user or config
error (one line on stderr, nothing run).
"""

from __future__ import annotations

import argparse
import sys

from tta_norm.cli.grid import GridCommand, add_grid_arguments, run_grid_command


def bench_command() -> GridCommand:
    from tta_norm.bench.config import load_config, shipped_configs
    from tta_norm.bench.runner import BenchJob

    return GridCommand("bench", shipped_configs, load_config, BenchJob)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_grid_arguments(
        parser, "quick",
        "a YAML file or a shipped config name: quick (default), standard, continual, batch_sweep, noniid_sweep; "
        "or 'merge' to combine run directories",
    )  # fmt: skip
    parser.add_argument("dirs", nargs="*", metavar="DIR", help="with 'merge': the run directories to combine")


def run(args: argparse.Namespace) -> int:
    if args.config == "merge":
        from tta_norm.bench.merge import merge_command

        return merge_command(args)
    if args.dirs:
        print(f"tta-norm bench: unexpected argument(s) {args.dirs} (only 'merge' takes directories)", file=sys.stderr)
        return 2
    return run_grid_command(args, bench_command())
