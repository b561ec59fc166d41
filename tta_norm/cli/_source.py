"""Options, loading and the fit-and-save run shared by the subcommands that fit on source data (``ttn-fit``,
``sabn-train``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """Model, source data, seed, device and output options."""
    parser.add_argument("--model", default="resnet20", help="model name as for load_model (default resnet20)")
    parser.add_argument("--checkpoint", default=None,
                        help="source checkpoint path (default: the model's shared/released weights)")  # fmt: skip
    parser.add_argument("--data-dir", default=None, help="data directory (default: the built-in search list)")
    parser.add_argument("--source", default="cifar10-jpeg", help="source ImageFolder dataset (uses its train/)")
    parser.add_argument("--n-images", type=int, default=4000,
                        help="random source images to train on (seeded permutation; default 4000)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the subset, batches and augmentations")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 or auto (default: auto)")
    parser.add_argument("--out", required=True, help="output file (torch.save of {state_dict, meta, ...})")
    parser.add_argument("--force", action="store_true", help="replace an existing --out file")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def load_model_and_source(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """The source model and ``n_images`` seeded images + labels of the source's train split."""
    from tta_norm.fitting._data import load_source_split
    from tta_norm.models import load_model

    model = load_model(args.model, args.checkpoint, device=args.device)
    images, labels = load_source_split(
        "train", args.n_images, seed=args.seed, data_dir=args.data_dir, source=args.source, progress=not args.quiet
    )
    return model, images, labels


def given(args: argparse.Namespace, names: tuple[str, ...]) -> dict[str, Any]:
    """The options among ``names`` that were given on the command line (the others keep the config defaults)."""
    return {k: getattr(args, k) for k in names if getattr(args, k) is not None}


def fit_on_source(
    args: argparse.Namespace,
    command: str,
    fit: Callable[..., Any],
    options: tuple[str, ...],
    parsed: dict[str, Callable[[str], Any]] | None = None,
    check: Callable[[dict[str, Any]], Any] | None = None,
) -> tuple[Any, Path] | None:
    """Run ``fit(model, images, labels, device=..., progress=..., **config)`` on the model and source images of
    ``args`` and save the result, with the model and source it was fitted on in its ``meta``, to ``--out``.

    ``config`` holds the ``options`` given on the command line, and the text options named in ``parsed``
    converted by their function (``{"domains": parse_domains}``); ``check(config)`` raises ``ValueError`` for a
    bad value before anything is loaded.  Returns the result and the saved file; ``None`` after printing
    ``tta-norm COMMAND: ...`` for a missing file, a bad value or an ``--out`` that cannot be written (the
    command then exits with status 2)."""
    from tta_norm._files import unwritable_ancestor

    try:
        from tta_norm.device import available_device

        args.device = str(available_device(args.device if args.device is not None else "auto"))
        if args.n_images < 1:
            raise ValueError(f"--n-images must be >= 1, got {args.n_images}")
        out = Path(args.out)
        if out.is_dir():
            raise ValueError(f"--out {out} is a directory; give a file path, e.g. {out / 'fit.pt'}")
        if out.exists() and not args.force:  # checked before the fit, which takes minutes
            raise ValueError(f"--out {out} exists; --force replaces it, or choose another --out")
        parent = unwritable_ancestor(out.parent)
        if parent is not None:
            raise ValueError(f"cannot write --out {out}: {parent} is not a writable directory")
        config = given(args, options)
        for name, parse in (parsed or {}).items():
            if getattr(args, name) is not None:  # an empty text is the option's own error, not its default
                config[name] = parse(getattr(args, name))
        if check is not None:
            check(config)
        model, images, labels = load_model_and_source(args)
        result = fit(model, images, labels, device=args.device, progress=not args.quiet, **config)
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"tta-norm {command}: {err.args[0] if isinstance(err, KeyError) and err.args else err}", file=sys.stderr)
        return None
    result.meta.update({"model": args.model, "checkpoint": args.checkpoint, "source": args.source})
    try:
        return result, result.save(args.out)
    except OSError as err:
        print(f"tta-norm {command}: cannot write --out {args.out}: {err}", file=sys.stderr)
        return None
