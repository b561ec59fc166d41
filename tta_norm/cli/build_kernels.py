"""``tta-norm build-kernels``: build, verify and load the compiled CPU kernel now instead of on first use."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "Builds into the private directory <cache>/kernels/private-<uid> ($TTA_NORM_CACHE), records the "
        "library's SHA-256 there and loads it once to check it. Exit status 1 when the kernel cannot be used."
    )


def run(args: argparse.Namespace) -> int:
    from tta_norm import kernels

    try:
        print(kernels.build())
    except RuntimeError as err:
        print(f"tta-norm build-kernels: {err}", file=sys.stderr)
        return 1
    return 0
