"""The argument set and driver every grid command shares (``tta-norm bench``, ``tta-norm attack``):
:func:`add_grid_arguments` and :func:`run_grid_command`.  Exit status: 0 every cell ok, 1 some cells failed
(recorded; ``--resume`` retries them), 2 a user or config error (one line on stderr, nothing run).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

LOG_FORMAT = "[tta-norm] %(levelname)s %(message)s"


@dataclass(frozen=True)
class GridCommand:
    """What differs between grid commands: their name, configs and job type (loaded lazily)."""

    name: str
    shipped: Callable[[], dict[str, Any]]
    load: Callable[[str, list[str]], Any]
    job: Callable[[Any], Any]


def add_grid_arguments(parser: argparse.ArgumentParser, default_config: str, config_help: str) -> None:
    """The argument set every grid command shares."""
    parser.add_argument("config", nargs="?", default=default_config, help=config_help)
    parser.add_argument(
        "--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key with a YAML value, e.g. -s batch_sizes=[1,16] (repeatable)",
    )  # fmt: skip
    parser.add_argument("--output", "-o", help="output directory (config key 'output')")
    parser.add_argument("--data-dir", help="where to look for datasets (config key 'data_dir')")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 or auto (config key 'device')")
    stored = parser.add_mutually_exclusive_group()
    stored.add_argument(
        "--resume", action="store_true",
        help="keep the results in the output directory; run only cells without an ok result",
    )  # fmt: skip
    stored.add_argument("--overwrite", action="store_true", help="delete the results in the output directory first")
    parser.add_argument("--shard", metavar="K/N", help="run only the K-th of N deterministic slices of the cells")
    parser.add_argument("--executor", choices=["local", "ray"], default="local",
                        help="local: cells one after the other in this process (default); ray: one Ray task per "
                             "cell with the config's 'resources'")  # fmt: skip
    parser.add_argument("--ray-address", help="address of a running Ray cluster (default: start a local one)")
    parser.add_argument("--list-configs", action="store_true", help="list the shipped configs and exit")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the config, model, data and device, list the cells, run nothing")  # fmt: skip
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="logging level on stderr (log.txt in the run directory gets info and above)")  # fmt: skip
    parser.add_argument("--quiet", action="store_true", help="no progress bar and only warnings on stderr")


def configure_logging(level: str) -> None:
    """One stderr handler on the ``tta_norm`` logger (replaced on every call)."""
    logger = logging.getLogger("tta_norm")
    for h in list(logger.handlers):
        if getattr(h, "_tta_norm_cli", False):
            logger.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.setLevel(getattr(logging, level.upper()))
    handler._tta_norm_cli = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)


def run_grid_command(args: argparse.Namespace, command: GridCommand) -> int:
    from tta_norm.bench.engine import RunOptions, check_output_dir, run_grid
    from tta_norm.bench.grid import parse_shard, shard_cells
    from tta_norm.bench.validate import ConfigError

    configure_logging("warning" if args.quiet else args.log_level)
    if args.list_configs:
        for name, path in sorted(command.shipped().items()):
            print(f"{name:<16} {path}")
        return 0
    overrides = list(args.overrides)
    for key in ("output", "data_dir", "device"):
        value = getattr(args, key)
        if value is not None:  # verbatim: a path is not YAML (``runs/exp #2`` would lose its comment)
            overrides.append(f"{key}={json.dumps(str(value), ensure_ascii=False)}")
    try:
        shard = parse_shard(args.shard)
        cfg = command.load(args.config, overrides)
        job = command.job(cfg)
        cells = job.cells()
        if args.dry_run:
            check_output_dir(cfg.output)
            job.validate()
            mine = shard_cells(cells, shard)
            print(f"{len(mine)} cells" + (f" (shard {args.shard} of {len(cells)})" if shard else "") + ":")
            for c in mine:
                print(f"  {c.index:>4}  {c.label}")
            print(f"config ok: model {cfg.model}, dataset {cfg.dataset}, device {cfg.device}, output {cfg.output}")
            return 0
        options = RunOptions(resume=args.resume, overwrite=args.overwrite, shard=shard, executor=args.executor,
                             ray_address=args.ray_address, progress=False if args.quiet else None)  # fmt: skip
        outcome = run_grid(job, options)
    except ConfigError as err:
        print(f"tta-norm {command.name}: {err}", file=sys.stderr)
        return 2
    if outcome.report is not None:
        print(outcome.report.read_text())
    print(f"[tta-norm {command.name}] {outcome.cells} cells: {outcome.reused} reused, {outcome.ran} run, "
          f"{outcome.failed} failed; wrote {outcome.out / 'results.jsonl'}, {outcome.out / 'results.csv'}, "
          f"{outcome.report}")  # fmt: skip
    return outcome.exit_status
