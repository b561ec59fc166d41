"""Small-batch training study: BN variants vs GN / GN+PN at training batch sizes 2, 8 and 128.

A CIFAR ResNet-20 is trained from scratch (or fine-tuned from the released checkpoint, ``--init release``)
on a seeded random subset of the mirror's ``train/`` split with each normalisation variant and training batch
size, then evaluated on a random subset of the mirror's
``test/`` split (clean accuracy) and on the corruption benchmark (CIFAR-10-C regenerated at severity 5 for a
random subset of test images, :func:`tta_norm.fitting.benchdata.subset_corruption_benchmark`):

* ``source`` corruption error: the trained model as it is (eval mode) for every variant;
* ``tbn`` corruption error (test-batch statistics, batch 200, reset per corruption, through ``tta_norm.adapt``)
  for the variants that still have BatchNorm layers (``bn``, ``bn-decay``, ``ghost``).

Variants ``bn``, ``bn-decay``, ``ghost``, ``bgn``, ``gn``, ``gnpn`` and their training recipe (SGD nesterov,
weight decay 5e-4, peak lr ``base_lr * B / 128`` with warm-up and cosine decay, crop + flip) are
:mod:`tta_norm.training.small_batch`, the two errors :mod:`tta_norm.fitting.benchdata`; this script chooses the
budget, runs the cells (resuming from ``results.jsonl``) and writes ``report.md``.  The budget is the number of
training images seen (``--train-images`` x ``--epochs``), the same for every batch size, so small batches take
many more (slower) steps.  Budgets: ``--budget smoke`` (~2 min in all), ``small`` (5000 images x 2 epochs,
~30-45 min on one CPU core), ``finetune`` (``--init release``: the released ResNet-20 converted to each variant,
then 20,000 images x 1 epoch at peak lr 0.02 x B/128; ~50 min on one core), ``full`` (the whole train split for
30 epochs: GPU territory).

    python scripts/small_batch_study.py --budget smoke --out /tmp/sbs-smoke
    python scripts/small_batch_study.py --budget small --out runs/small_batch_study
    python scripts/small_batch_study.py --budget finetune --out runs/small_batch_finetune
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from tta_norm.training import small_batch

BUDGETS = {
    "smoke": {"train_images": 512, "epochs": 1, "test_images": 200, "n_per_corruption": 20,
              "corruptions": ["gaussian_noise", "fog"]},  # fmt: skip
    "small": {"train_images": 5000, "epochs": 2, "test_images": 2000, "n_per_corruption": 100, "corruptions": None},
    "full": {"train_images": None, "epochs": 30, "test_images": None, "n_per_corruption": None, "corruptions": None},
    # from the released ResNet-20 (trained with BN at batch 128 on original CIFAR-10), each variant converted
    "finetune": {"train_images": 20000, "epochs": 1, "test_images": 2000, "n_per_corruption": 100,
                 "corruptions": None, "init": "release", "base_lr": 0.02},  # fmt: skip
}
BUDGET_DEFAULTS = {"init": "scratch", "base_lr": 0.1}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget", choices=sorted(BUDGETS), default="smoke")
    p.add_argument("--train-images", type=int, default=None, help="override the budget's training subset")
    p.add_argument("--epochs", type=int, default=None, help="override the budget's epochs")
    p.add_argument("--test-images", type=int, default=None)
    p.add_argument("--n-per-corruption", type=int, default=None)
    p.add_argument("--corruptions", nargs="+", default=None)
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[2, 8, 128])
    p.add_argument("--variants", nargs="+", default=list(small_batch.VARIANTS), choices=small_batch.VARIANTS)
    p.add_argument("--base-lr", type=float, default=None,
                   help="peak lr at batch 128, scaled linearly with B (default 0.1; 0.02 for --budget finetune)")
    p.add_argument("--init", choices=("scratch", "release"), default=None,
                   help="random init, or the released checkpoint converted to each variant (affine and, for "
                        "BN-based variants, running statistics copied); default: the budget's")  # fmt: skip
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="runs/small_batch_study")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    for key, value in {**BUDGET_DEFAULTS, **BUDGETS[args.budget]}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def write_report(out: Path, results: list[dict], args: argparse.Namespace) -> None:
    lines = ["# Small-batch training study", "",
             f"Budget `{args.budget}`: {args.train_images or 'all'} train images x {args.epochs} epochs per run "
             f"(ResNet-{args.depth}, {'from scratch' if args.init == 'scratch' else 'from the released checkpoint'}"
             f", peak lr {args.base_lr} x B/128), clean error on {args.test_images or 'all'} random test images, "
             f"corruption error = mean over {len(args.corruptions or []) or 15} corruptions (severity 5, "
             f"{args.n_per_corruption} random test images each).  Errors in %.", "",
             "| variant | B | clean err | C err (source) | C err (tbn) | steps | train min |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        tbn = f"{100 * r['corruption']['tbn']:.1f}" if "tbn" in r["corruption"] else "-"
        lines.append(f"| {r['variant']} | {r['batch_size'] or 'init'} | {100 * r['clean_error']:.1f} | "
                     f"{100 * r['corruption']['source']:.1f} | {tbn} | {r['steps']} | {r['train_seconds'] / 60:.1f} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.quiet
    from tta_norm.device import resolve_device

    device = resolve_device(args.device)

    from tta_norm.fitting._data import load_source_split
    from tta_norm.fitting.benchdata import classification_error, corruption_errors, subset_corruption_benchmark

    tr_x, tr_y = load_source_split("train", args.train_images, seed=args.seed, progress=progress)
    te_x, te_y = load_source_split("test", args.test_images, seed=args.seed + 1, progress=progress)
    images, labels = torch.from_numpy(tr_x), torch.from_numpy(tr_y)
    n_c = args.n_per_corruption or 10000
    bench = subset_corruption_benchmark(n_c, args.corruptions, (5,), subset_seed=args.seed + 2, progress=progress)
    store = out / "results.jsonl"
    done = {}
    if store.is_file():
        for line in store.read_text().splitlines():
            r = json.loads(line)
            done[(r["variant"], r["batch_size"])] = r
    results = []
    config = [args.train_images, args.epochs, args.base_lr, args.init]
    # batch size 0 = the converted model before any training step (the starting point of --init release)
    for bs in [0, *args.batch_sizes]:
        for variant in args.variants:
            key = (variant, bs)
            if key in done and done[key].get("config") == config:
                results.append(done[key])
                continue
            torch.manual_seed(args.seed)
            model = small_batch.build_variant(variant, bs or 128, args.depth, args.init).to(device)
            rec = {"variant": variant, "batch_size": bs, "config": config}
            if bs:
                rec.update(small_batch.train_variant(
                    model, variant, images, labels, bs, epochs=args.epochs, base_lr=args.base_lr,
                    weight_decay=args.weight_decay, seed=args.seed, device=device, progress=progress))  # fmt: skip
            else:
                rec.update({"steps": 0, "train_loss": None, "train_seconds": 0.0, "peak_lr": 0.0})
                model.eval()
            rec["clean_error"] = classification_error(model, te_x, te_y, device)
            rec["corruption"] = corruption_errors(model, bench, device)
            results.append(rec)
            done[key] = rec
            store.write_text("".join(json.dumps(r) + "\n" for r in done.values()))
            print(f"{variant:9s} B={bs:4d}: clean err {100 * rec['clean_error']:.1f}%, corruption err "
                  f"{100 * rec['corruption']['source']:.1f}% ({rec['train_seconds'] / 60:.1f} min)", flush=True)
            write_report(out, results, args)
    write_report(out, results, args)
    print((out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
