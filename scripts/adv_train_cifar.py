#!/usr/bin/env python
"""Short CPU adversarial fine-tune of the shared CIFAR ResNet-20 with BN, AuxBN and SaAuxBN; clean and PGD accuracy.

Source split: ``cifar10-jpeg/train`` (a seeded subset); test: a seeded subset of the clean test set.  Recipe of
:mod:`tta_norm.attacks.adv_train` (PGD-7, 8/255, step 2/255, random start).  Results as JSON lines.

    python scripts/adv_train_cifar.py --train 2048 --test 500 --epochs 1 --out runs/adv_train.jsonl
    python scripts/adv_train_cifar.py --train 8000 --epochs 2 --lr 0.05 --test 1000 \
        --autoattack 200 --save-dir runs/adv_models      # + AutoAttack (pyautoattack) on the adversarial domain

``--autoattack N`` runs AutoAttack (``--aa-attacks``, default APGD-CE + APGD-T; ``standard`` for the full suite)
on the first N test images through the adversarial domain (BN: the one shared layer) of each trained model,
in ``eval()`` mode with the domain fixed: a static model, so AutoAttack's sub-batching changes nothing.
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
    parser.add_argument("--craft-mode", choices=("train", "eval"), default="train",
                        help="model mode while crafting the training PGD examples (train: the official recipe)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="runs/adv_train.jsonl")
    parser.add_argument("--save-dir", default=None, help="save each trained model's state_dict here")
    parser.add_argument("--reuse", action="store_true",
                        help="evaluate the models already in --save-dir (same configuration) instead of retraining")
    parser.add_argument("--autoattack", type=int, default=0, help="AutoAttack on this many test images (0 = off)")
    parser.add_argument("--aa-attacks", default="apgd-ce,apgd-t", help="pyautoattack attacks, or 'standard'")
    args = parser.parse_args()

    from pathlib import Path

    from tta_norm.attacks.adv_train import AdvTrainConfig, adversarial_finetune, config_dict, evaluate_robustness
    from tta_norm.data import load_clean_test_set
    from tta_norm.data.paths import find_dataset_dir
    from tta_norm.data.readers import is_image_folder_split, read_image_folder
    from tta_norm.layers import convert_to_aux_bn
    from tta_norm.models import load_model

    if args.autoattack > 0:
        try:
            import pyautoattack  # noqa: F401  (fail before hours of training, not after)
        except ImportError as err:
            msg = "--autoattack needs the optional package pyautoattack: pip install -e .[autoattack]"
            raise SystemExit(msg) from err
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
                                 seed=args.seed, craft_mode=args.craft_mode)  # fmt: skip
            saved = Path(args.save_dir) / f"resnet20-{kind}.pt" if args.save_dir else None
            if saved is not None and saved.is_file() and args.reuse:
                ckpt = torch.load(saved, weights_only=True)
                if ckpt["config"] != config_dict(cfg):
                    raise SystemExit(f"{saved} was trained with another configuration; remove it or drop --reuse")
                if kind != "bn":
                    convert_to_aux_bn(model, kind)
                model.load_state_dict(ckpt["state_dict"])
                model.eval()
                minutes, history = ckpt["train_minutes"], ckpt["history"]
            else:
                start = time.perf_counter()
                model, history = adversarial_finetune(model, train.images[tr], train.labels[tr], cfg,
                                                      device=args.device)  # fmt: skip
                minutes = (time.perf_counter() - start) / 60
                if saved is not None:
                    saved.parent.mkdir(parents=True, exist_ok=True)
                    torch.save({"kind": kind, "config": config_dict(cfg), "state_dict": model.state_dict(),
                                "train_minutes": minutes, "history": history}, saved)  # fmt: skip
            for domain in (None,) if kind == "bn" else (0, 1):
                res = evaluate_robustness(model, test.images[te], test.labels[te], domain=domain, pgd_steps=steps)
                if args.autoattack > 0 and domain in (None, 1):
                    res.update(_autoattack(model, domain, test.images[te], test.labels[te], args))
                rows.append({**res, "train_minutes": round(minutes, 1), "final_loss": history[-1]["loss"],
                             "config": config_dict(cfg), "train_images": args.train})  # fmt: skip
        with out.open("a") as f:
            for r in rows:
                r = {"kind": kind, **r}
                print(json.dumps(r))
                f.write(json.dumps(r) + "\n")
    return 0


def _autoattack(model, domain, images, labels, args) -> dict:
    """AutoAttack accuracy of ``model`` with every AuxBN layer fixed to ``domain``, on the first N images."""
    from tta_norm.attacks.lp import run_autoattack
    from tta_norm.data import to_float_nchw
    from tta_norm.layers.aux_batch_norm import domain_layers, set_domain

    n = args.autoattack
    x = to_float_nchw(torch.from_numpy(np.asarray(images[:n]))).to(args.device)
    y = torch.from_numpy(np.asarray(labels[:n])).long().to(args.device)
    if domain is not None and domain_layers(model):
        set_domain(model, domain)
    model.eval()
    kwargs = {"version": "standard"} if args.aa_attacks == "standard" else {
        "version": "custom", "attacks": args.aa_attacks.split(",")}  # fmt: skip
    start = time.perf_counter()
    _, y_adv = run_autoattack(model, x, y, eps=8 / 255, batch_size=n, seed=args.seed, **kwargs)
    return {"autoattack": args.aa_attacks, "autoattack_n": n, "autoattack_acc": float((y_adv == y).float().mean()),
            "autoattack_minutes": round((time.perf_counter() - start) / 60, 1)}  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
