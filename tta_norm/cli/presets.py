"""``tta-norm presets``: list the registered presets and gradient methods."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", "-v", action="store_true", help="print each preset's full spec")


def run(args: argparse.Namespace) -> int:
    from tta_norm.methods import get_method_class, methods
    from tta_norm.presets import get_preset, presets

    print("presets:")
    for name in presets():
        preset = get_preset(name)
        print(f"  {name:<10} {preset.summary}")
        if args.verbose:
            print(f"  {'':<10} {preset.spec}")
    print("methods:")
    for name in methods():
        doc = (get_method_class(name).__doc__ or "").strip().splitlines()[0]
        print(f"  {name:<10} {doc}")
    return 0
