#!/usr/bin/env python
"""Short CPU adversarial fine-tune of the shared CIFAR ResNet-20 with BN, AuxBN and SaAuxBN; clean and PGD accuracy.

Source split: ``cifar10-jpeg/train`` (a seeded subset); test: a seeded subset of the clean test set.  Recipe of
:mod:`tta_norm.attacks.adv_train` (PGD-7, 8/255, step 2/255, random start).  Results as JSON lines.

    python scripts/adv_train_cifar.py --train 2048 --test 500 --epochs 1 --out runs/adv_train.jsonl
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", default="bn,aux,saaux")
    parser.add_argument("--train", type=int, default=2048, help="training images (seeded subset)")
    parser.add_argument("--test", type=int, default=500, help="test images (seeded subset)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--pgd-steps", default="10,20")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="runs/adv_train.jsonl")
    args = parser.parse_args()

    from pathlib import Path

    from tta_norm.attacks.adv_train import AdvTrainConfig, adversarial_finetune, config_dict, evaluate_robustness
    from tta_norm.data import load_clean_test_set
    from tta_norm.data.paths import find_dataset_dir
    from tta_norm.data.readers import is_image_folder_split, read_image_folder
    from tta_norm.models import load_model

    root = find_dataset_dir(["cifar10-jpeg"], is_image_folder_split)
    if root is None:
        raise SystemExit("cifar10-jpeg (train/ and test/) not found")
    train = read_image_folder(root / "train")
    test = load_clean_test_set("cifar10")
    rng = np.random.default_rng(args.seed)
    tr = rng.permutation(len(train.labels))[: args.train]
    te = rng.permutation(len(test.labels))[: args.test]
    steps = tuple(int(s) for s in args.pgd_steps.split(","))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    base = load_model("resnet20", device=args.device)
    for kind in args.kinds.split(","):
        model = load_model("resnet20", device=args.device)
        rows = []
        if kind == "source":
            rows.append(evaluate_robustness(base, test.images[te], test.labels[te], pgd_steps=steps))
        else:
            cfg = AdvTrainConfig(kind=kind, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                                 seed=args.seed)  # fmt: skip
            start = time.perf_counter()
            model, history = adversarial_finetune(model, train.images[tr], train.labels[tr], cfg, device=args.device)
            minutes = (time.perf_counter() - start) / 60
            for branch in (None,) if kind == "bn" else (0, 1):
                res = evaluate_robustness(model, test.images[te], test.labels[te], branch=branch, pgd_steps=steps)
                rows.append({**res, "train_minutes": round(minutes, 1), "final_loss": history[-1]["loss"],
                             "config": config_dict(cfg), "train_images": args.train})  # fmt: skip
        with out.open("a") as f:
            for r in rows:
                r = {"kind": kind, **r}
                print(json.dumps(r))
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
