"""``tta-norm attack``: run a malicious-sample attack grid from a YAML config with command-line overrides.

Light module-level imports only (the CLI dispatcher imports this module to build ``--help``).
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "config", nargs="?", default="attack_quick",
        help="a YAML file or a shipped attack config: attack_quick (default), attack_medbn",
    )  # fmt: skip
    parser.add_argument(
        "--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key with a YAML value, e.g. -s fractions=[0.05,0.1] -s budgets=[1,8/255]",
    )  # fmt: skip
    parser.add_argument("--output", "-o", help="output directory (config key 'output')")
    parser.add_argument("--data-dir", help="where to look for datasets (config key 'data_dir')")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 or auto (config key 'device')")
    parser.add_argument("--resume", action="store_true", help="skip the cells already stored in the output")
    parser.add_argument("--list-configs", action="store_true", help="list the shipped attack configs and exit")
    parser.add_argument("--dry-run", action="store_true", help="validate the config and list the cells, run nothing")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from tta_norm.attacks.bench import load_attack_config, run_attack_grid, shipped_attack_configs
    from tta_norm.bench.config import ConfigError

    if args.list_configs:
        for name, path in sorted(shipped_attack_configs().items()):
            print(f"{name:<16} {path}")
        return 0
    overrides = list(args.overrides)
    for key in ("output", "data_dir", "device"):
        value = getattr(args, key)
        if value is not None:
            overrides.append(f"{key}={value}")
    try:
        cfg = load_attack_config(args.config, overrides)
        cells = cfg.cells()
    except (ConfigError, ValueError, KeyError) as err:
        print(f"tta-norm attack: {err}")
        return 2
    if args.dry_run:
        print(f"{len(cells)} cells:")
        for c in cells:
            print(f"  {c.entry.label:<22} {c.objective:<14} eps={c.eps:<8.4g} frac={c.fraction:<5} "
                  f"b{c.batch_size:<4} {c.mode:<10} seed {c.seed}")  # fmt: skip
        return 0
    out = run_attack_grid(cfg, resume=args.resume, progress=not args.quiet)
    report = out / "report.md"
    print(report.read_text())
    print(f"[tta-norm attack] wrote {out / 'results.jsonl'}, {out / 'results.csv'}, {report}")
    return 0
