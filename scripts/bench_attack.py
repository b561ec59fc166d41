#!/usr/bin/env python
"""Speed of the malicious-sample attack: one N-step DIA attack on a batch vs N plain forward+backward passes.

Both go through the same adapted model (``tta.model`` of the preset, adaptive statistics from the batch, state
kept), the baseline back-propagating a summed-logit loss to the input.  Target: attack <= 1.3x.

    python scripts/bench_attack.py                       # ResNet-20, tbn, batch 200, 100 steps, 10 % malicious
    python scripts/bench_attack.py --preset medbn --method tent --steps 20
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--preset", default="tbn")
    parser.add_argument("--method", default=None)
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import tta_norm
    from tta_norm.attacks import MaliciousAttack, craft_malicious
    from tta_norm.models import load_model
    from tta_norm.norm import keep_state

    device = torch.device(args.device)
    try:
        model = load_model(args.model, device=device)
        weights = "shared checkpoint"
    except (FileNotFoundError, ValueError):
        from tta_norm.models import cifar_resnet

        model = cifar_resnet(20).to(device).eval()
        weights = "random init (checkpoint not found)"
    tta = tta_norm.adapt(model, args.preset, args.method)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.rand(args.batch_size, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch_size,), generator=g).to(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def plain() -> None:
        with keep_state(tta.model), torch.enable_grad():
            xi = x.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(tta.model(xi).sum(), [xi])

    plain()  # warm-up
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        plain()
    sync()
    t_plain = time.perf_counter() - start

    attack = MaliciousAttack(fraction=args.fraction, steps=args.steps)
    sync()
    start = time.perf_counter()
    craft_malicious(tta, x, y, attack)
    sync()
    t_attack = time.perf_counter() - start
    result = {
        "model": f"{args.model} ({weights})", "preset": args.preset, "method": args.method, "device": str(device),
        "threads": torch.get_num_threads(), "batch_size": args.batch_size, "steps": args.steps,
        "malicious": attack.count(args.batch_size), "plain_fwd_bwd_s": round(t_plain, 2),
        "attack_s": round(t_attack, 2), "ratio": round(t_attack / t_plain, 3),
    }  # fmt: skip
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
