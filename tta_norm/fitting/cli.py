"""Command-line front ends of the post-training routines: ``tta-norm ttn-fit`` and ``tta-norm sabn-train``.

The dispatcher (:mod:`tta_norm.cli`) imports one module per subcommand and calls its ``add_arguments(parser)`` and
``run(args) -> int``; :mod:`tta_norm.fitting.cli_ttn_fit` and :mod:`tta_norm.fitting.cli_sabn_train` re-export
the pairs below.  Heavy imports (torch, data) happen inside the ``run`` functions.

Examples::

    tta-norm ttn-fit --model resnet20 --n-images 4000 --out runs/ttn/resnet20-ttn.pt
    tta-norm sabn-train --model resnet20 --n-images 4000 --domains clean,color,blur,noise --out runs/sabn/r20.pt

then ``tta_norm.adapt(model, "ttn", init_state="runs/ttn/resnet20-ttn.pt")``, or for SaBN
``tta_norm.fitting.sabn.SaBNRouter.from_file(model, "runs/sabn/r20.pt", mode="stats")``.
"""

from __future__ import annotations

import argparse
import sys


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="resnet20", help="model name as for load_model (default resnet20)")
    parser.add_argument("--checkpoint", default=None,
                        help="source checkpoint path (default: the model's shared/released weights)")  # fmt: skip
    parser.add_argument("--data-dir", default=None, help="data directory (default: the built-in search list)")
    parser.add_argument("--source", default="cifar10-jpeg", help="source ImageFolder dataset (uses its train/)")
    parser.add_argument("--n-images", type=int, default=4000,
                        help="random source images to train on (seeded permutation; default 4000)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the subset, batches and augmentations")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--out", required=True, help="output file (torch.save of {state_dict, meta, ...})")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


# --------------------------------------------------------------------------------------------------- ttn-fit


def ttn_fit_add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``tta-norm ttn-fit`` (defaults: :class:`tta_norm.fitting.ttn.TTNConfig`)."""
    _common(parser)
    parser.add_argument("--epochs", type=int, default=None, help="epochs over the images (default 2)")
    parser.add_argument("--lr", type=float, default=None, help="Adam learning rate for a (default 0.02)")
    parser.add_argument("--lam", type=float, default=None, help="weight of MSE(a, prior) (default 1.0)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per step (default 64)")
    parser.add_argument("--fit-batch-sizes", default=None,
                        help="comma-separated test batch sizes simulated in the fit (default 1,4,16,64)")  # fmt: skip
    parser.add_argument("--prior-batches", type=int, default=None, help="batches for the prior (default 32)")
    parser.add_argument("--distance", choices=["cosine", "l2"], default=None, help="prior distance (default cosine)")
    parser.add_argument("--normalize", choices=["model", "layer"], default=None,
                        help="min-max normalisation of the prior scores (default model)")  # fmt: skip
    parser.add_argument("--prior-stats", choices=["source", "batch"], default=None,
                        help="statistics the prior's gradients are taken with (default source)")  # fmt: skip
    parser.add_argument("--init", choices=["prior", "preset"], default=None, help="initial a (default prior)")
    parser.add_argument("--ops", default=None, help="shift ops, comma-separated subset of color,blur,noise")


def ttn_fit_run(args: argparse.Namespace) -> int:
    """Fit TTN's channel-wise weights and save the adapted state (see :func:`tta_norm.fitting.ttn.fit_ttn`)."""
    import torch

    from tta_norm.fitting._data import load_source_split
    from tta_norm.fitting.augment import parse_ops
    from tta_norm.fitting.ttn import fit_ttn
    from tta_norm.models import load_model

    overrides = {
        "epochs": args.epochs,
        "lr": args.lr,
        "lam": args.lam,
        "batch_size": args.batch_size,
        "prior_batches": args.prior_batches,
        "distance": args.distance,
        "normalize": args.normalize,
        "prior_stats": args.prior_stats,
        "init": args.init,
        "seed": args.seed,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    try:
        if args.fit_batch_sizes:
            overrides["fit_batch_sizes"] = tuple(int(b) for b in args.fit_batch_sizes.split(","))
        if args.ops:
            overrides["ops"] = parse_ops(args.ops)
        model = load_model(args.model, args.checkpoint, device=args.device)
        images, labels = load_source_split(
            "train", args.n_images, seed=args.seed, data_dir=args.data_dir, source=args.source,
            progress=not args.quiet,
        )  # fmt: skip
        result = fit_ttn(model, images, labels, device=args.device, progress=not args.quiet, **overrides)
    except (FileNotFoundError, ValueError) as err:
        print(f"tta-norm ttn-fit: {err}", file=sys.stderr)
        return 2
    result.meta.update({"model": args.model, "checkpoint": args.checkpoint, "source": args.source})
    path = result.save(args.out)
    a = torch.cat([v.flatten() for v in result.alpha.values()])
    print(f"saved TTN state to {path} ({len(labels)} images, {result.meta['wall_time_s']} s); "
          f"a: mean {a.mean():.3f}, min {a.min():.3f}, max {a.max():.3f}")  # fmt: skip
    print(f'load it with tta_norm.adapt(model, "ttn", init_state="{path}")')
    return 0


# ------------------------------------------------------------------------------------------------ sabn-train


def sabn_train_add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``tta-norm sabn-train`` (defaults: :class:`tta_norm.fitting.sabn.SaBNConfig`)."""
    _common(parser)
    parser.add_argument("--domains", default=None,
                        help="comma-separated: clean and shift ops (default clean,color,blur,noise)")  # fmt: skip
    parser.add_argument("--preset", default=None, help="statistics preset during training and test (default sabn)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs over the images (default 2)")
    parser.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 1e-3)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per step (default 64)")
    parser.add_argument("--train", choices=["heads", "affine", "all"], default=None,
                        help="what is trained: heads only, heads + shared affine (default), or everything")  # fmt: skip


def sabn_train_run(args: argparse.Namespace) -> int:
    """Train SaBN heads on source domains and save the state with its statistics bank."""
    from tta_norm.fitting._data import load_source_split
    from tta_norm.fitting.sabn import parse_domains, train_sabn
    from tta_norm.models import load_model

    overrides = {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "train": args.train,
                 "seed": args.seed, "preset": args.preset}  # fmt: skip
    overrides = {k: v for k, v in overrides.items() if v is not None}
    try:
        if args.domains:
            overrides["domains"] = parse_domains(args.domains)
        model = load_model(args.model, args.checkpoint, device=args.device)
        images, labels = load_source_split(
            "train", args.n_images, seed=args.seed, data_dir=args.data_dir, source=args.source,
            progress=not args.quiet,
        )  # fmt: skip
        result = train_sabn(model, images, labels, device=args.device, progress=not args.quiet, **overrides)
    except (FileNotFoundError, ValueError) as err:
        print(f"tta-norm sabn-train: {err}", file=sys.stderr)
        return 2
    result.meta.update({"model": args.model, "checkpoint": args.checkpoint, "source": args.source})
    path = result.save(args.out)
    print(f"saved SaBN state ({len(result.config.domains)} heads: {', '.join(result.config.domains)}) to {path}")
    return 0
