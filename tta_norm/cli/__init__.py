"""The ``tta-norm`` command line.

One module per subcommand in this package (``corrupt`` lives in the independent ``corruptions`` package), each
with two functions: ``add_arguments(parser)`` and ``run(args) -> int``. This module only wires them together.
Subcommand modules keep heavy imports (data, models) inside ``run``; option defaults are read from the config
dataclasses, so help strings cannot drift from them.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name -> (module path, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "presets": ("tta_norm.cli.presets", "list the adaptation presets and gradient methods"),
    "bench": ("tta_norm.cli.bench", "run a benchmark grid (presets x methods x streams x batch sizes x seeds)"),
    "train": ("tta_norm.cli.train", "fine-tune or train a source model on a source ImageFolder"),
    "corrupt": ("corruptions.cli", "write CIFAR-10-C / ImageNet-C style corrupted datasets"),
    "attack": ("tta_norm.cli.attack", "run a malicious-sample attack grid against test-time adaptation"),
    "ttn-fit": ("tta_norm.cli.ttn_fit", "fit TTN's channel-wise mixing weights on source data"),
    "sabn-train": ("tta_norm.cli.sabn_train", "train SaBN per-domain affine heads on source data"),
    "build-kernels": ("tta_norm.cli.build_kernels", "build and verify the compiled CPU kernel now (else: at adapt)"),
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tta-norm")
    except PackageNotFoundError:  # run from a source tree without installation
        from tta_norm import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tta-norm",
        description="Test-time adaptation of normalization layers: presets, benchmarks, corruptions.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
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
