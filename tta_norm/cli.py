"""The ``tta-norm`` command line.

Each subcommand lives next to the code it drives and exposes two functions:
``add_arguments(parser)`` and ``run(args) -> int``. This module only wires them together. Subcommand
modules keep heavy imports (torch, data) inside ``run`` so that ``tta-norm --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name -> (module path, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "presets": ("tta_norm.presets_cli", "list the adaptation presets and gradient methods"),
    "bench": ("tta_norm.bench.cli", "run a benchmark grid (presets x methods x streams x batch sizes x seeds)"),
    "train": ("tta_norm.train_cli", "fine-tune or train a source model on a source ImageFolder"),
    "corrupt": ("corruptions.cli", "write CIFAR-10-C / ImageNet-C style corrupted datasets"),
    "attack": ("tta_norm.attacks.cli", "run a malicious-sample attack grid against test-time adaptation"),
    "ttn-fit": ("tta_norm.adaptation.cli_ttn_fit", "fit TTN's channel-wise mixing weights on source data"),
    "sabn-train": ("tta_norm.adaptation.cli_sabn_train", "train SaBN per-domain affine heads on source data"),
    "build-kernels": ("tta_norm.kernels.cli", "build and verify the compiled CPU kernel now (else: on first use)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tta-norm",
        description="Test-time adaptation of normalization layers: presets, benchmarks, corruptions.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.set_defaults(_module=module)
        try:
            importlib.import_module(module).add_arguments(sp)
        except ModuleNotFoundError as err:  # an optional part that is not installed
            sp.set_defaults(_missing=str(err))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    missing = getattr(args, "_missing", None)
    if missing:
        print(f"tta-norm {args.command}: unavailable ({missing})", file=sys.stderr)
        return 2
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
