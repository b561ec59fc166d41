"""Small-batch training study: BN variants vs GN / GN+PN at training batch sizes 2, 8 and 128.

A CIFAR ResNet-20 is trained from scratch (or fine-tuned from the released checkpoint, ``--init release``)
on a seeded random subset of the mirror's ``train/`` split with each normalisation variant and training batch
size, then evaluated on a random subset of the mirror's
``test/`` split (clean accuracy) and on the corruption benchmark (CIFAR-10-C regenerated at severity 5 for a
random subset of test images, :func:`tta_norm.fitting.benchdata.subset_corruption_benchmark`):

* ``source`` corruption error: the trained model as it is (eval mode) for every variant;
* ``tbn`` corruption error (test-batch statistics, batch 200, reset per corruption, through ``tta_norm.adapt``)
  for the variants that still have BatchNorm layers (``bn``, ``bn-decay``, ``ghost``).

Variants (Summers & Dinneen, ICLR 2020; Labatie et al., NeurIPS 2021; layers from ``tta_norm.layers``, decay
groups from ``tta_norm.training.param_groups``):

========== =====================================================================================================
bn         BatchNorm, no weight decay on gamma/beta (common practice)
bn-decay   BatchNorm with the same weight decay on gamma/beta as on the weights
ghost      Ghost BN, ghost batch ``min(16, max(2, B // 4))`` (= BN when that equals B), momentum scaled per chunk
bgn        batch-group norm (statistics over the batch and groups of 4 channels), running stats for inference
gn         GroupNorm with groups of 4 channels (G = C / 4)
gnpn       GroupNorm (groups of 4 channels) + Proxy Norm after every BN+ReLU pair (fx conversion)
========== =====================================================================================================

Recipe (our choices, identical for all variants): SGD momentum 0.9, nesterov, weight decay 5e-4 on conv/linear
weights (and gamma/beta for ``bn-decay``), peak lr ``0.1 * B / 128`` (linear scaling), linear warm-up over the
first 5% of the steps then cosine to 0, random crop + flip, float32.  The budget is the number of training
images seen (``--train-images`` x ``--epochs``), the same for every batch size, so small batches take many more
(slower) steps.  Budgets: ``--budget smoke`` (~2 min in all), ``small`` (5000 images x 2 epochs, ~30-45 min
on one CPU core), ``finetune`` (``--init release``: the released ResNet-20 converted to each variant, then
20,000 images x 1 epoch at peak lr 0.02 x B/128; ~50 min on one core), ``full`` (the whole train split for
30 epochs: GPU territory).

    python scripts/small_batch_study.py --budget smoke --out /tmp/sbs-smoke
    python scripts/small_batch_study.py --budget small --out runs/small_batch_study
    python scripts/small_batch_study.py --budget finetune --out runs/small_batch_finetune
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

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
VARIANTS = ("bn", "bn-decay", "ghost", "bgn", "gn", "gnpn")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget", choices=sorted(BUDGETS), default="smoke")
    p.add_argument("--train-images", type=int, default=None, help="override the budget's training subset")
    p.add_argument("--epochs", type=int, default=None, help="override the budget's epochs")
    p.add_argument("--test-images", type=int, default=None)
    p.add_argument("--n-per-corruption", type=int, default=None)
    p.add_argument("--corruptions", nargs="+", default=None)
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[2, 8, 128])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
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


# ------------------------------------------------------------------------------------------------ the models


def groups_of_four(channels: int) -> int:
    return max(1, channels // 4)


def ghost_size(batch_size: int) -> int:
    return min(16, max(2, batch_size // 4))


def build_model(variant: str, batch_size: int, depth: int, init: str = "scratch") -> nn.Module:
    """A CIFAR ResNet with the variant's normalisation layers: fresh (seeded by the caller) or the released
    checkpoint converted (the converters copy gamma/beta; GN gets them copied here)."""
    from tta_norm.layers import convert_to_batch_group_norm, convert_to_ghost_bn, convert_to_gn_pn
    from tta_norm.models import cifar_resnet, load_model

    model = cifar_resnet(depth) if init == "scratch" else load_model(f"resnet{depth}")  # released checkpoint
    if variant in ("bn", "bn-decay"):
        return model
    if variant == "ghost":
        return convert_to_ghost_bn(model, ghost_size(batch_size))
    if variant == "bgn":
        return convert_to_batch_group_norm(model, groups_of_four)
    if variant == "gn":
        for name, bn in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]:
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            gn = nn.GroupNorm(groups_of_four(bn.num_features), bn.num_features)
            with torch.no_grad():
                gn.weight.copy_(bn.weight)
                gn.bias.copy_(bn.bias)
            setattr(parent, name.rpartition(".")[2], gn)
        return model
    if variant == "gnpn":
        return convert_to_gn_pn(model, groups_of_four)
    raise ValueError(f"unknown variant {variant!r}")


def train(model: nn.Module, variant: str, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
          args: argparse.Namespace, device: torch.device, progress: bool) -> dict:  # fmt: skip
    """SGD (Nesterov 0.9, peak lr scaled linearly with the batch size, 5 % warm-up then cosine) with CIFAR
    augmentation; full batches only (a batch of 1 has no batch statistics)."""
    from tta_norm.data.tensors import to_float_nchw
    from tta_norm.training import augment_batch, fit, lr_at, param_groups

    groups = param_groups(model, args.weight_decay, norm_decay=variant == "bn-decay", bias_decay=False)
    peak = args.base_lr * batch_size / 128
    opt = torch.optim.SGD(groups, lr=peak, momentum=0.9, nesterov=True)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()

    def loss_fn(idx: torch.Tensor) -> torch.Tensor:
        x = to_float_nchw(augment_batch(images[idx], gen)).to(device)
        return F.cross_entropy(model(x), labels[idx].to(device))

    model.train()
    run = fit(opt, loss_fn, n=len(labels), batch_size=batch_size, epochs=args.epochs, generator=gen,
              drop_last=True, lr=lambda step, total: lr_at(step, total, max(1, int(0.05 * total)), peak),
              progress=progress, desc=f"{variant} B={batch_size}")  # fmt: skip
    model.eval()
    train_loss = sum(r["train_loss"] for r in run.history) / max(1, len(run.history))
    return {"steps": run.steps, "train_loss": train_loss, "train_seconds": time.perf_counter() - t0,
            "peak_lr": peak}  # fmt: skip


@torch.no_grad()
def error(model: nn.Module, images: np.ndarray, labels: np.ndarray, device: torch.device, bs: int = 200) -> float:
    from tta_norm.data.tensors import to_float_nchw

    wrong = 0
    for i in range(0, len(labels), bs):
        x = to_float_nchw(torch.from_numpy(np.array(images[i : i + bs]))).to(device)
        wrong += int((model(x).argmax(1).cpu().numpy() != labels[i : i + bs]).sum())
    return wrong / len(labels)


def corruption_errors(model: nn.Module, bench, device: torch.device, has_bn: bool) -> dict:
    import tta_norm

    out = {"source": float(np.mean([error(model, d.images, d.labels, device) for d in bench.domains.values()]))}
    if has_bn:
        errs = []
        for d in bench.domains.values():  # reset per corruption: a fresh wrapper for each
            errs.append(error(tta_norm.adapt(model, "tbn"), d.images, d.labels, device))
        out["tbn"] = float(np.mean(errs))
    return out


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
    from tta_norm.fitting.benchdata import subset_corruption_benchmark

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
            model = build_model(variant, bs or 128, args.depth, args.init).to(device)
            rec = {"variant": variant, "batch_size": bs, "config": config}
            if bs:
                rec.update(train(model, variant, images, labels, bs, args, device, progress))
            else:
                rec.update({"steps": 0, "train_loss": None, "train_seconds": 0.0, "peak_lr": 0.0})
                model.eval()
            rec["clean_error"] = error(model, te_x, te_y, device)
            has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
            rec["corruption"] = corruption_errors(model, bench, device, has_bn)
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
