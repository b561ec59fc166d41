"""``tta-norm sabn-train``: train SaBN per-domain affine heads on source domains and save them with the
statistics bank.

    tta-norm sabn-train --model resnet20 --n-images 4000 --domains clean,color,blur,noise --out runs/sabn/r20.pt

then ``tta_norm.fitting.sabn.SaBNRouter.from_file(model, "runs/sabn/r20.pt", mode="stats")``.  Defaults come
from :class:`tta_norm.fitting.sabn.SaBNConfig`.
"""

from __future__ import annotations

import argparse

from tta_norm.cli._source import add_source_arguments, fit_on_source

OPTIONS = ("epochs", "lr", "batch_size", "train", "seed", "preset")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from tta_norm.fitting.sabn import SaBNConfig

    d = SaBNConfig()
    add_source_arguments(parser)
    parser.add_argument("--domains", default=None,
                        help=f"comma-separated: clean and shift ops (default {','.join(d.domains)})")  # fmt: skip
    parser.add_argument("--preset", default=None,
                        help=f"statistics preset during training and test (default {d.preset})")  # fmt: skip
    parser.add_argument("--epochs", type=int, default=None, help=f"epochs over the images (default {d.epochs})")
    parser.add_argument("--lr", type=float, default=None, help=f"Adam learning rate (default {d.lr})")
    parser.add_argument("--batch-size", type=int, default=None, help=f"images per step (default {d.batch_size})")
    parser.add_argument("--train", choices=["heads", "affine", "all"], default=None,
                        help=f"what is trained: heads, heads + shared affine or all (default {d.train})")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Train SaBN heads on source domains and save the state with its statistics bank."""
    from tta_norm.fitting.sabn import SaBNConfig, parse_domains, train_sabn

    done = fit_on_source(args, "sabn-train", train_sabn, OPTIONS, {"domains": parse_domains},
                         lambda config: SaBNConfig(**config))  # fmt: skip
    if done is None:
        return 2
    result, path = done
    print(f"saved SaBN state ({len(result.config.domains)} heads: {', '.join(result.config.domains)}) to {path}")
    return 0


def parse(argv: list[str]) -> argparse.Namespace:
    """``sabn-train`` arguments from a command line (for ``tta-norm train --sabn-domains``)."""
    parser = argparse.ArgumentParser(prog="tta-norm sabn-train")
    add_arguments(parser)
    return parser.parse_args(argv)
