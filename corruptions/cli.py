"""``tta-norm corrupt``: write CIFAR-10-C / ImageNet-C style benchmark sets from clean images.

Two layouts, as released by Hendrycks & Dietterich (ICLR 2019):

* ``cifar``: ``OUT/<corruption>.npy`` uint8 ``(5*N, H, W, 3)``, severity ``k`` in rows ``(k-1)*N .. k*N-1``,
  and ``OUT/labels.npy`` (uint8, tiled 5x) - readable by ``robustbench.data.load_cifar10c`` unchanged.
  Source: CIFAR python batches (``cifar-10-batches-py`` / ``cifar-100-python``, kept in their stored order) or
  an ImageFolder tree (of a directory with ``train/`` and ``test/`` trees, the one ``--split`` names), whose
  class-sorted rows are shuffled once with a fixed seed (the permutation the benchmark applies to the same clean
  set; saved as ``OUT/permutation.npy``) so that any prefix mixes classes.
* ``imagenet``: ``OUT/<corruption>/<severity>/<class>/<file>`` JPEGs (quality 85) from an ImageFolder tree,
  after Resize(256) + CenterCrop(224).

Module-level imports stay light (argparse only); the work happens in :func:`run`.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``corrupt`` subcommand's arguments on ``parser``."""
    parser.add_argument(
        "source", help="CIFAR python batches directory (or its parent) or an ImageFolder tree"
    )
    parser.add_argument("out", help="output directory")
    parser.add_argument(
        "--layout",
        choices=("auto", "cifar", "imagenet"),
        default="auto",
        help="output layout: 'cifar' (<name>.npy + labels.npy) or 'imagenet' "
        "(<name>/<severity>/<class>/*.jpg); auto: cifar for CIFAR batches and 32x32 image folders, "
        "imagenet otherwise",
    )
    parser.add_argument(
        "--preset",
        choices=("cifar", "imagenet"),
        default=None,
        help="corruption parameters (default: cifar for the cifar layout, imagenet for the imagenet layout)",
    )
    parser.add_argument(
        "--corruptions",
        default="common",
        help="'common' (the 15 benchmark corruptions, default), 'extra' (4), 'all' (19) or a comma list",
    )
    parser.add_argument(
        "--severities", default="1,2,3,4,5", help="comma list of severities (default 1,2,3,4,5)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--workers", type=int, default=None, help="worker threads (default: available CPUs)")
    parser.add_argument(
        "--split", choices=("test", "train"), default=None,
        help="split to read (default test): of CIFAR batches, or the test/ or train/ folder of an ImageFolder "
        "dataset directory (such as cifar10-jpeg)",
    )  # fmt: skip
    parser.add_argument(
        "--overwrite", action="store_true",
        help="recompute existing files (needed to reuse a directory written with other settings or another source)",
    )  # fmt: skip
    parser.add_argument(
        "--resize", type=int, default=256, help="imagenet layout: shorter side (0: keep size)"
    )
    parser.add_argument("--crop", type=int, default=224, help="imagenet layout: centre crop (0: no crop)")
    parser.add_argument("--quality", type=int, default=85, help="imagenet layout: JPEG quality (default 85)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _parse_severities(text: str) -> list[int]:
    try:
        sev = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--severities must be a comma list of integers 1..5, got {text!r}") from None
    if not sev or any(not 1 <= s <= 5 for s in sev):
        raise ValueError(f"--severities must be a comma list of integers 1..5, got {text!r}")
    return sev


def run(args: argparse.Namespace) -> int:
    """Execute ``tta-norm corrupt``; returns the process exit code (0 ok, 2 bad input)."""
    from pathlib import Path

    from PIL import Image

    from .datasets import (
        _find_cifar_dir,
        all_names,
        class_mixing_permutation,
        image_folder_split,
        index_image_folder,
        load_cifar_batches,
        load_image_folder,
        read_image,
        write_cifar_c,
        write_imagenet_c,
    )

    try:
        names = all_names(args.corruptions)
        severities = _parse_severities(args.severities)
        source = Path(args.source)
        is_cifar_batches = _find_cifar_dir(source) is not None
        if not is_cifar_batches:  # an ImageFolder tree, or a directory of train/ and test/ trees
            source = image_folder_split(source, args.split)
        layout = args.layout
        if layout == "auto":
            if is_cifar_batches:
                layout = "cifar"
            else:
                index = index_image_folder(source)
                first = read_image(index.root / index.files[0])
                layout = "cifar" if first.shape[:2] == (32, 32) else "imagenet"
        preset = args.preset or ("cifar" if layout == "cifar" else "imagenet")
        progress = not args.no_progress
        if layout == "cifar":
            row_order = None
            if is_cifar_batches:
                images, labels = load_cifar_batches(source, train=args.split == "train")
            else:
                images, labels, _ = load_image_folder(source)
                row_order = class_mixing_permutation(len(images))
            print(
                f"corrupt: {len(images)} images {images.shape[1]}x{images.shape[2]} -> {args.out} "
                f"(cifar layout, preset {preset}, {len(names)} corruptions, severities {severities})",
                file=sys.stderr,
            )
            write_cifar_c(
                images,
                labels,
                args.out,
                names,
                severities,
                seed=args.seed,
                preset=preset,
                workers=args.workers,
                progress=progress,
                overwrite=args.overwrite,
                row_order=row_order,
            )
        else:
            if is_cifar_batches:
                raise ValueError("the imagenet layout needs an ImageFolder source, not CIFAR batches")
            written = write_imagenet_c(
                source,
                args.out,
                names,
                severities,
                seed=args.seed,
                preset=preset,
                resize=args.resize or None,
                crop=args.crop or None,
                quality=args.quality,
                workers=args.workers,
                progress=progress,
                overwrite=args.overwrite,
            )
            print(f"corrupt: wrote {written} JPEG files under {args.out}", file=sys.stderr)
    except (ValueError, TypeError, OSError, RuntimeError, MemoryError, Image.DecompressionBombError) as err:
        # OSError: unreadable images, permissions; MemoryError: a source or an output too large to hold
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if isinstance(err, MemoryError):
            text = f"out of memory: {text}"
        print(f"tta-norm corrupt: error: {text}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m corruptions.cli SOURCE OUT ...``."""
    parser = argparse.ArgumentParser(
        prog="python -m corruptions",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
