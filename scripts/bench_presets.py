"""Speed of every preset (and TENT) as a ratio to the plain ``eval()`` forward of the same model.

Per configuration (model x batch size) the variants are timed in interleaved rounds; each timing of a variant
is paired with a timing of the plain forward taken right before it, and the figure is the median over rounds
of these paired ratios (the machine's speed drifts by 10-25 % over minutes; adjacent pairs cancel most of it).
Norm-only presets run under ``torch.no_grad()`` like a deployed model; TENT needs autograd for its step.

The default clock is the process CPU time with one intra-op thread: it measures the work each variant does and
stays honest when other jobs share the machine.  ``--clock wall --threads 2`` gives wall-clock figures (use
it on an otherwise idle machine).

    python scripts/bench_presets.py                 # the README table (CIFAR ResNet-20 b1/16/200, resnet18 b16)
    python scripts/bench_presets.py --quick         # fewer rounds
    python scripts/bench_presets.py --clock wall --threads 2 --json out.json
    python scripts/bench_presets.py --no-kernels    # without the compiled CPU kernel (tta_norm.kernels)
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable

import torch
import torchvision
from _paired_timing import CLOCKS, paired_medians, time_call  # a sibling module: scripts/ is on sys.path

import tta_norm
from tta_norm import kernels
from tta_norm.models import cifar_resnet

TARGETS = {
    "tbn": 1.10, "alpha": 1.10, "prior": 1.10, "ema": 1.10, "ttn": 1.10, "sabn": 1.10,
    "medbn": 1.5, "iabn": 1.3, "iew": 1.3, "tent": 3.5,
}  # fmt: skip

CONFIGS = [
    ("resnet20", 1, (3, 32, 32)),
    ("resnet20", 16, (3, 32, 32)),
    ("resnet20", 200, (3, 32, 32)),
    ("resnet18", 16, (3, 224, 224)),
]


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = cifar_resnet(20) if name == "resnet20" else torchvision.models.resnet18(num_classes=1000)
    return model.eval()


def variants(model: torch.nn.Module) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    out: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"plain": model}
    for preset in tta_norm.presets():
        out[preset] = tta_norm.adapt(model, preset)
    out["tent"] = tta_norm.adapt(model, "tbn", method="tent")
    return out


CLOCK: Callable[[], float] = CLOCKS["process"]


def bench_config(
    name: str, batch: int, shape: tuple[int, ...], rounds: int, budget: float
) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds per batch of every variant, and the median over rounds of its *paired* ratio: each timing
    of a variant is divided by a timing of the plain forward taken right before it (the machine's speed drifts
    by 10-25 % over minutes; adjacent pairs cancel most of that)."""
    model = build(name)
    x = torch.rand(batch, *shape, generator=torch.Generator().manual_seed(0))
    fns = variants(model)
    # warm-up and choose the inner repeat count so one timing of the plain forward takes ~budget seconds
    for key, fn in fns.items():
        time_call(fn, x, 2, key == "tent", CLOCK)
    t_plain = time_call(fns["plain"], x, 3, False, CLOCK)
    inner = max(1, int(budget / max(t_plain, 1e-6)))
    return paired_medians(fns, x, inner=inner, rounds=rounds, clock=CLOCK)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 rounds instead of 9")
    parser.add_argument("--json", help="also write the raw medians (seconds per batch) here")
    parser.add_argument("--clock", choices=("process", "wall"), default="process")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    parser.add_argument("--no-kernels", action="store_true",
                        help="ATen path only (TTA_NORM_KERNELS=0): figures without the compiled kernel")  # fmt: skip
    args = parser.parse_args()
    if args.no_kernels:
        os.environ[kernels.ENV_KERNELS] = "0"  # read on the kernel's first use, which comes below
    rounds = 3 if args.quick else 9
    global CLOCK
    CLOCK = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    print(f"clock: {args.clock}, threads: {args.threads}, torch {torch.__version__}, kernel: {kernels.status()}")
    results, paired = {}, {}
    for name, batch, shape in CONFIGS:
        med, ratio = bench_config(name, batch, shape, rounds, budget=0.1 if batch == 1 else 0.2)
        results[f"{name}@b{batch}"] = med
        paired[f"{name}@b{batch}"] = ratio
        print(f"{name} batch {batch}: plain {med['plain'] * 1e3:.2f} ms/batch", flush=True)
    names = [k for k in next(iter(results.values())) if k != "plain"]
    header = "| preset | " + " | ".join(results) + " | target |"
    print()
    print(header)
    print("|" + "---|" * (len(results) + 2))
    for key in names:
        ratios = [f"{res[key]:.2f}x" for res in paired.values()]
        print(f"| {key} | " + " | ".join(ratios) + f" | {f'<= {TARGETS[key]:.2f}x' if key in TARGETS else ''} |")
    plain = " | ".join(f"{res['plain'] * 1e3:.2f} ms" for res in results.values())
    print(f"| (plain eval forward) | {plain} | |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"seconds": results, "paired_ratio": paired}, fh, indent=1)


if __name__ == "__main__":
    main()
