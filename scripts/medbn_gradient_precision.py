#!/usr/bin/env python
"""Precision of a DIA attacker's gradient through MedBN layers: the closed-form backward (``median_batch_norm``,
parameters frozen) against autograd through the textbook formula (the reference path, parameters requiring
gradients), each in float32 and float64, compared with the float64 textbook gradient.

One indiscriminate attacker step at batch 200 with 20 % malicious samples at the grey start, random benign
images, ResNet-20 (the shared checkpoint, or a random init of the same shape).

    python scripts/medbn_gradient_precision.py
"""

from __future__ import annotations

import argparse
import json

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import tta_norm
    from tta_norm.attacks import MaliciousAttack, attack_loss
    from tta_norm.attacks.malicious import GREY
    from tta_norm.models import cifar_resnet, load_model

    try:
        model = load_model("resnet20")
    except (FileNotFoundError, ValueError):
        model = cifar_resnet(20).eval()
    attack = MaliciousAttack(objective="indiscriminate", fraction=args.fraction)
    g = torch.Generator().manual_seed(args.seed)
    nb = args.batch_size - attack.count(args.batch_size)
    benign = torch.rand(nb, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (args.batch_size,), generator=g)

    def gradient(dtype: torch.dtype, closed_form: bool) -> torch.Tensor:
        tta = tta_norm.adapt(model.to(dtype), "medbn")
        tta.model.requires_grad_(not closed_form)  # an affine that needs gradients keeps the textbook path
        x_mal = torch.full((args.batch_size - nb, 3, 32, 32), GREY, dtype=dtype, requires_grad=True)
        with torch.enable_grad():
            logits = tta.differentiable_forward(torch.cat([benign.to(dtype), x_mal]))
            (grad,) = torch.autograd.grad(attack_loss(logits, y, nb, attack), [x_mal])
        return grad.double()

    reference = gradient(torch.float64, closed_form=False)
    rows = {}
    for dtype in (torch.float64, torch.float32):
        for closed_form in (False, True):
            grad = gradient(dtype, closed_form)
            name = f"{'closed_form' if closed_form else 'textbook'}_{str(dtype).removeprefix('torch.')}"
            rows[name] = {
                "relative_error": float((grad - reference).norm() / reference.norm()),
                "sign_agreement": float((grad.sign() == reference.sign()).double().mean()),
            }
    print(json.dumps({"reference": "textbook_float64", "batch_size": args.batch_size, "benign": nb, **rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
