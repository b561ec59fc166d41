"""``tta-norm ttn-fit``: fit TTN's channel-wise mixing weights on source data and save the adapted state.

    tta-norm ttn-fit --model resnet20 --n-images 4000 --out runs/ttn/resnet20-ttn.pt

then ``tta_norm.adapt(model, "ttn", init_state="runs/ttn/resnet20-ttn.pt")``.  Defaults come from
:class:`tta_norm.fitting.ttn.TTNConfig`.
"""

from __future__ import annotations

import argparse

from tta_norm.cli._source import add_source_arguments, fit_on_source

OPTIONS = ("epochs", "lr", "lam", "batch_size", "prior_batches", "distance", "normalize", "prior_stats", "init",
           "seed")  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from tta_norm.fitting.ttn import DEFAULT_FIT_BATCH_SIZES, TTNConfig

    d = TTNConfig()
    add_source_arguments(parser)
    parser.add_argument("--epochs", type=int, default=None, help=f"epochs over the images (default {d.epochs})")
    parser.add_argument("--lr", type=float, default=None, help=f"Adam learning rate for a (default {d.lr})")
    parser.add_argument("--lam", type=float, default=None, help=f"weight of MSE(a, prior) (default {d.lam})")
    parser.add_argument("--batch-size", type=int, default=None, help=f"images per step (default {d.batch_size})")
    parser.add_argument("--fit-batch-sizes", default=None,
                        help="comma-separated test batch sizes simulated in the fit, each a divisor of "
                             f"--batch-size (default: those of {','.join(map(str, DEFAULT_FIT_BATCH_SIZES))} "
                             "that divide it)")  # fmt: skip
    parser.add_argument("--prior-batches", type=int, default=None,
                        help=f"batches for the prior (default {d.prior_batches})")  # fmt: skip
    parser.add_argument("--distance", choices=["cosine", "l2"], default=None,
                        help=f"prior distance (default {d.distance})")  # fmt: skip
    parser.add_argument("--normalize", choices=["model", "layer"], default=None,
                        help=f"min-max normalisation of the prior scores (default {d.normalize})")  # fmt: skip
    parser.add_argument("--prior-stats", choices=["source", "batch"], default=None,
                        help=f"statistics the prior's gradients are taken with (default {d.prior_stats})")  # fmt: skip
    parser.add_argument("--init", choices=["prior", "preset"], default=None, help=f"initial a (default {d.init})")
    parser.add_argument("--ops", default=None, help=f"shift ops, comma-separated subset of {','.join(d.ops)}")


def run(args: argparse.Namespace) -> int:
    """Fit TTN's channel-wise weights and save the adapted state (see :func:`tta_norm.fitting.ttn.fit_ttn`)."""
    import torch

    from tta_norm.fitting.augment import parse_ops
    from tta_norm.fitting.ttn import TTNConfig, fit_ttn

    def batch_sizes(text: str) -> tuple[int, ...]:
        try:
            return tuple(int(b) for b in text.split(",") if b.strip())
        except ValueError:
            raise ValueError(f"--fit-batch-sizes takes comma-separated integers, got {text!r}") from None

    def check(config: dict) -> None:
        TTNConfig(**config).check_images(args.n_images)

    done = fit_on_source(args, "ttn-fit", fit_ttn, OPTIONS, {"fit_batch_sizes": batch_sizes, "ops": parse_ops},
                         check)  # fmt: skip
    if done is None:
        return 2
    result, path = done
    a = torch.cat([v.flatten() for v in result.alpha.values()])
    print(f"saved TTN state to {path} ({result.meta['n_images']} images, {result.meta['wall_time_s']} s); "
          f"a: mean {a.mean():.3f}, min {a.min():.3f}, max {a.max():.3f}")  # fmt: skip
    print(f'load it with tta_norm.adapt(model, "ttn", init_state="{path}")')
    return 0
