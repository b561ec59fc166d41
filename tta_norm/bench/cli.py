"""``tta-norm bench``: run a benchmark grid from a YAML config with command-line overrides."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "config", nargs="?", default="quick",
        help="a YAML file or a shipped config name: quick (default), standard, continual, batch_sweep, noniid_sweep",
    )  # fmt: skip
    parser.add_argument(
        "--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key with a YAML value, e.g. -s batch_sizes=[1,16] (repeatable)",
    )  # fmt: skip
    parser.add_argument("--output", "-o", help="output directory (config key 'output')")
    parser.add_argument("--data-dir", help="where to look for datasets (config key 'data_dir')")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 or auto (config key 'device')")
    parser.add_argument("--resume", action="store_true", help="skip the cells already stored in the output")
    parser.add_argument("--list-configs", action="store_true", help="list the shipped configs and exit")
    parser.add_argument("--dry-run", action="store_true", help="validate the config and list the cells, run nothing")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from tta_norm.bench import ConfigError, load_config, run_benchmark, shipped_configs

    if args.list_configs:
        for name, path in sorted(shipped_configs().items()):
            print(f"{name:<14} {path}")
        return 0
    overrides = list(args.overrides)
    for key in ("output", "data_dir", "device"):
        value = getattr(args, key)
        if value is not None:
            overrides.append(f"{key}={value}")
    try:
        cfg = load_config(args.config, overrides)
        cells = cfg.cells()
    except (ConfigError, ValueError, KeyError) as err:
        print(f"tta-norm bench: {err}")
        return 2
    if args.dry_run:
        print(f"{len(cells)} cells:")
        for c in cells:
            desc = f"{c.setting:<17} {c.order:<9} b{c.batch_size:<4} sev {c.severity} seed {c.seed}"
            print(f"  {c.entry.label:<24} {desc}")
        return 0
    out = run_benchmark(cfg, resume=args.resume, progress=not args.quiet)
    report = out / "report.md"
    print(report.read_text())
    print(f"[tta-norm bench] wrote {out / 'results.jsonl'}, {out / 'results.csv'}, {report}")
    return 0
