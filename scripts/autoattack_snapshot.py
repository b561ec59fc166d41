#!/usr/bin/env python
"""Lp robustness of adapted models: batch-aware PGD on the deployed (adapting) function, and AutoAttack
(``pyautoattack``, optional) on the static source model and on frozen snapshots of adapted models.

One seeded batch of a regenerated CIFAR-10-C domain; for each preset: clean accuracy of the deployed model,
accuracy of the deployed model on a batch-aware white-box PGD batch (every sample perturbed, the victim adapts on
it), accuracy of the frozen snapshot under AutoAttack (static white box), and of the deployed model on those
AutoAttack examples (transfer from the snapshot: grey box for the adapting model).  JSON lines on stdout.

    python scripts/autoattack_snapshot.py --presets source,tbn,medbn --n 100 --attacks apgd-ce
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="source,tbn,medbn")
    parser.add_argument("--corruption", default="gaussian_noise")
    parser.add_argument("--severity", type=int, default=5)
    parser.add_argument("--n", type=int, default=100, help="batch size (one batch)")
    parser.add_argument("--eps", type=float, default=8 / 255)
    parser.add_argument("--pgd-steps", type=int, default=10)
    parser.add_argument("--attacks", default="apgd-ce", help="pyautoattack attacks (custom version) or 'standard'")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    import tta_norm
    from tta_norm.attacks.lp import deployed_forward, frozen_snapshot, pgd_attack, run_autoattack, threat_model
    from tta_norm.data import load_corruption_benchmark, to_float_nchw
    from tta_norm.models import load_model

    device = torch.device(args.device)
    model = load_model("resnet20", device=device)
    bench = load_corruption_benchmark("cifar10", [args.corruption], [args.severity], progress=False)
    data = bench.domains[(args.corruption, args.severity)]
    idx = np.random.default_rng(args.seed).permutation(len(data.labels))[: args.n]
    x = to_float_nchw(torch.from_numpy(data.images[idx]).to(device))
    y = torch.from_numpy(data.labels[idx]).to(device)
    aa_kwargs = {"version": "standard"} if args.attacks == "standard" else {
        "version": "custom", "attacks": args.attacks.split(",")}  # fmt: skip

    def acc(logits: torch.Tensor) -> float:
        return float((logits.argmax(1) == y).float().mean())

    for preset in args.presets.split(","):
        start = time.perf_counter()
        tta = tta_norm.adapt(model, preset)
        with torch.no_grad():
            clean = acc(deployed_forward(tta)(x))
        g = torch.Generator().manual_seed(args.seed)
        x_pgd = pgd_attack(tta, x, y, eps=args.eps, step_size=args.eps / 4, steps=args.pgd_steps, generator=g)
        with torch.no_grad():
            victim = tta_norm.adapt(model, preset)
            pgd_acc = acc(victim(x_pgd))  # the deployed model adapts on the adversarial batch and predicts it
        snapshot = frozen_snapshot(tta, x) if preset != "source" else model
        x_aa, y_aa = run_autoattack(snapshot, x, y, eps=args.eps, batch_size=args.n, seed=args.seed, **aa_kwargs)
        with torch.no_grad():
            aa_static = float((y_aa == y).float().mean())
            transfer = acc(tta_norm.adapt(model, preset)(x_aa))
        row = {
            "preset": preset, "n": args.n, "domain": f"{args.corruption}@{args.severity}", "clean_acc": clean,
            f"pgd{args.pgd_steps}_deployed_acc": pgd_acc, "autoattack_snapshot_acc": aa_static,
            "autoattack_transfer_to_deployed_acc": transfer, "autoattack": args.attacks,
            "threat_pgd": threat_model(attack=f"batch-aware PGD-{args.pgd_steps}", norm="Linf", eps=args.eps,
                                       batch_size=args.n, attacker_fraction=1.0, box="white",
                                       state="deployed adapted forward, statistics of the adversarial batch"),
            "threat_autoattack": threat_model(attack=f"AutoAttack ({args.attacks})", norm="Linf", eps=args.eps,
                                              batch_size=args.n, attacker_fraction=1.0, box="white (snapshot)",
                                              state="frozen snapshot of the model adapted on the clean batch"),
            "seconds": round(time.perf_counter() - start, 1),
        }  # fmt: skip
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
