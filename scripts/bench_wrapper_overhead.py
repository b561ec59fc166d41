"""Cost of the wrapper's per-call machinery (validation, lock, transaction snapshot, output check) at small batch.

For each preset, times ``tta(x)`` (the full :class:`tta_norm.api.TTAModel` call) against ``tta.model(x)`` (the
same adapting layers called directly: no transaction, no checks), in interleaved pairs; prints the median
over rounds of the paired ratios.  Process CPU time, one intra-op thread (robust to other jobs).

The "staging" column isolates the transaction: ``tta(x)`` with its snapshot (:class:`tta_norm.transaction.Snapshot`)
against the same call with the snapshot replaced by one that records nothing, timed as A-B-A triples; the
"snapshot" column is the direct cost of taking one snapshot.

    python scripts/bench_wrapper_overhead.py               # ResNet-20, batch 1
    python scripts/bench_wrapper_overhead.py --batch 16 --rounds 21
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import tta_norm
import tta_norm.api
from tta_norm.models import cifar_resnet
from tta_norm.transaction import Snapshot


class _NoSnapshot:
    """A transaction that records nothing (for the A/B timing only)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def restore(self) -> None:
        pass


def _staging_ratio(tta: tta_norm.TTAModel, x: torch.Tensor, reps: int) -> float:
    """``tta(x)`` with its transaction over ``tta(x)`` without, from an A-B-A triple."""
    try:
        first = _time(tta, x, reps)
        tta_norm.api.Snapshot = _NoSnapshot
        bare = _time(tta, x, reps)
        tta_norm.api.Snapshot = Snapshot
        second = _time(tta, x, reps)
    finally:
        tta_norm.api.Snapshot = Snapshot
    return (first + second) / 2 / bare


def _snapshot_cost(tta: tta_norm.TTAModel, reps: int = 1000) -> float:
    attrs = ("_window_buffer", "_window_samples", "num_adapted", "num_resets")
    start = time.process_time()
    for _ in range(reps):
        Snapshot(tta, tta._mutable_buffers, tta.method, owner_attributes=attrs)
    return (time.process_time() - start) / reps


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
    parser.add_argument("--presets", default="tbn,alpha,prior,ema,ttn,medbn,medbn-mad,sabn")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = cifar_resnet(20).eval()
    x = torch.randn(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    print(f"ResNet-20, batch {args.batch}, {args.rounds} rounds x {args.reps} forwards, process clock")
    print("| preset | tta(x) / tta.model(x) | staging | snapshot | tta.model(x) |")
    print("|---|---|---|---|---|")
    with torch.no_grad():
        for preset in args.presets.split(","):
            tta = tta_norm.adapt(model, preset)
            for fn in (tta, tta.model):
                _time(fn, x, args.reps)  # warm-up
            ratios, staging, inner = [], [], []
            for _ in range(args.rounds):
                t_inner = _time(tta.model, x, args.reps)
                t_full = _time(tta, x, args.reps)
                ratios.append(t_full / t_inner)
                inner.append(t_inner)
                staging.append(_staging_ratio(tta, x, args.reps))
            print(
                f"| {preset} | {statistics.median(ratios):.3f}x | {statistics.median(staging):.3f}x "
                f"| {_snapshot_cost(tta) * 1e6:.1f} us | {statistics.median(inner) * 1e3:.2f} ms |"
            )


if __name__ == "__main__":
    main()
