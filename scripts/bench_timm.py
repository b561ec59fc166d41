"""Speed of presets (and TENT) on timm ImageNet models, as ratios to the model's plain ``eval()`` forward.

timm builds most convolutional networks with ``BatchNormAct2d``, which the converter replaces by
``AdaptiveNormAct`` (adaptive norm, then the layer's own dropout and activation).  This script measures what that
costs: per model, every variant is timed in interleaved rounds, each timing paired with a timing of the plain
forward taken right before it, and the figure is the median over rounds of these paired ratios.  Norm-only
presets run under ``torch.no_grad()`` like a deployed model; TENT needs autograd for its step.  Models are
randomly initialised (``pretrained=False``): speed does not depend on the weights.

The default clock is the process CPU time with one intra-op thread (it measures the work and stays honest when
other jobs share the machine); ``--clock wall --threads 2`` gives wall-clock figures on an idle machine.

    python scripts/bench_timm.py                    # efficientnet_b0, mobilenetv3_large_100, resnet50 at batch 16
    python scripts/bench_timm.py --quick --models efficientnet_b0 --presets tbn source
    python scripts/bench_timm.py --json out.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch
from _paired_timing import CLOCKS, paired_medians, time_call  # a sibling module: scripts/ is on sys.path

import tta_norm
from tta_norm import kernels

TARGETS = {"tbn": 1.15}
DEFAULT_MODELS = ["efficientnet_b0", "mobilenetv3_large_100", "resnet50"]
DEFAULT_PRESETS = ["source", "tbn", "alpha", "ema", "medbn", "iabn"]

CLOCK: Callable[[], float] = CLOCKS["process"]
CHANNELS_LAST = False


def build(name: str) -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False).eval()


def variants(model: torch.nn.Module, presets: list[str], tent: bool) -> dict[str, Callable[[torch.Tensor], object]]:
    out: dict[str, Callable[[torch.Tensor], object]] = {"plain": model}
    for preset in presets:
        out[preset] = tta_norm.adapt(model, preset)
    if tent:
        out["tent"] = tta_norm.adapt(model, "tbn", method="tent")
    return out


def bench_model(
    name: str, batch: int, size: int, presets: list[str], tent: bool, rounds: int
) -> tuple[dict[str, float], dict[str, float]]:
    """``(median seconds per batch, median paired ratio to the plain forward)`` of every variant."""
    model = build(name)
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    if CHANNELS_LAST:
        model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    fns = variants(model, presets, tent)
    for key, fn in fns.items():  # warm-up (the compiled kernel loads on first use)
        time_call(fn, x, 1, key == "tent", CLOCK)
    return paired_medians(fns, x, inner=1, rounds=rounds, clock=CLOCK)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, help="timm model names")
    parser.add_argument("--presets", nargs="+", default=DEFAULT_PRESETS, help="presets to time ('all': every one)")
    parser.add_argument("--no-tent", action="store_true", help="skip TENT (tbn + one entropy step per batch)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224, help="image side in pixels")
    parser.add_argument("--quick", action="store_true", help="3 rounds instead of 9")
    parser.add_argument("--clock", choices=("process", "wall"), default="process")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    parser.add_argument("--json", help="also write the medians (seconds per batch and paired ratios) here")
    parser.add_argument("--channels-last", action="store_true", help="model and input in channels_last memory format")
    args = parser.parse_args()
    presets = tta_norm.presets() if args.presets == ["all"] else args.presets
    global CLOCK, CHANNELS_LAST
    CLOCK = CLOCKS[args.clock]
    CHANNELS_LAST = args.channels_last
    torch.set_num_threads(args.threads)
    rounds = 3 if args.quick else 9
    print(f"clock: {args.clock}, threads: {args.threads}, torch {torch.__version__}, kernel: {kernels.status()}, "
          f"batch {args.batch} x {args.size} px, {rounds} rounds"
          + (", channels_last" if CHANNELS_LAST else ""))  # fmt: skip
    results, paired = {}, {}
    for name in args.models:
        med, ratio = bench_model(name, args.batch, args.size, list(presets), not args.no_tent, rounds)
        results[name], paired[name] = med, ratio
        print(f"{name}: plain {med['plain'] * 1e3:.0f} ms/batch", flush=True)
    keys = list(next(iter(paired.values())))
    print()
    print("| preset | " + " | ".join(results) + " | target |")
    print("|" + "---|" * (len(results) + 2))
    for key in keys:
        cells = " | ".join(f"{paired[m][key]:.2f}x" for m in results)
        print(f"| {key} | {cells} | {f'<= {TARGETS[key]:.2f}x' if key in TARGETS else ''} |")
    plain = " | ".join(f"{r['plain'] * 1e3:.0f} ms" for r in results.values())
    print(f"| (plain eval forward) | {plain} | |")
    if args.json:
        with open(args.json, "w") as fh:
            record = {"seconds": results, "paired_ratio": paired, "batch": args.batch, "size": args.size,
                      "channels_last": CHANNELS_LAST}  # fmt: skip
            json.dump(record, fh, indent=1)


if __name__ == "__main__":
    main()
