"""Cost of the wrapper's per-call machinery (validation, lock, transaction snapshot, output check) at small batch.

For each preset, times ``tta(x)`` (the full :class:`tta_norm.api.TTAModel` call) against ``tta.model(x)`` (the
same adapting layers called directly: no transaction, no checks), in interleaved pairs; prints the median
over rounds of the paired ratios.  Process CPU time, one intra-op thread (robust to other jobs).

    python scripts/bench_wrapper_overhead.py               # ResNet-20, batch 1
    python scripts/bench_wrapper_overhead.py --batch 16 --rounds 21
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import tta_norm
from tta_norm.models import cifar_resnet


def _time(fn, x: torch.Tensor, reps: int) -> float:
    start = time.process_time()
    for _ in range(reps):
        fn(x)
    return (time.process_time() - start) / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--reps", type=int, default=50, help="forwards per timing")
    parser.add_argument("--presets", default="tbn,ema,medbn,medbn-mad,sabn")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = cifar_resnet(20).eval()
    x = torch.randn(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    print(f"ResNet-20, batch {args.batch}, {args.rounds} rounds x {args.reps} forwards, process clock")
    print("| preset | tta(x) / tta.model(x) | tta.model(x) |")
    print("|---|---|---|")
    with torch.no_grad():
        for preset in args.presets.split(","):
            tta = tta_norm.adapt(model, preset)
            for fn in (tta, tta.model):
                _time(fn, x, args.reps)  # warm-up
            ratios, inner = [], []
            for _ in range(args.rounds):
                t_inner = _time(tta.model, x, args.reps)
                t_full = _time(tta, x, args.reps)
                ratios.append(t_full / t_inner)
                inner.append(t_inner)
            print(f"| {preset} | {statistics.median(ratios):.3f}x | {statistics.median(inner) * 1e3:.2f} ms |")


if __name__ == "__main__":
    main()
