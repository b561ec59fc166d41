"""Overhead of the bench harness over the adapted model's own forward, and the full-benchmark wall time.

Runs one bench cell (CIFAR ResNet-20, ``tbn``, 15 corruptions at severity 5, reset for every corruption,
batch 200) through the harness (stream plan, prefetching loader, wrapper, metrics), then times the same
adapted forwards on the same batches already in memory.  Overhead = harness time / forward-only time - 1.
The corruption data are loaded (or regenerated and cached) before any timing starts.

    python scripts/bench_harness.py                    # 15 x 10,000 images (the issue's figure)
    python scripts/bench_harness.py --n-examples 2000  # a quicker look
"""

from __future__ import annotations

import argparse
import time

import torch

import tta_norm
from tta_norm.bench import load_config
from tta_norm.bench.runner import cell_plan, load_source_model, resolve_device, run_cell
from tta_norm.data import load_corruption_benchmark
from tta_norm.streams import StreamLoader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-examples", type=int, default=None, help="images per corruption (default: all)")
    parser.add_argument("--preset", default="tbn")
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2, help="alternating harness/forward-only repeats")
    args = parser.parse_args()

    cfg = load_config(
        "quick",
        [f"n_examples={'null' if args.n_examples is None else args.n_examples}", f"methods=[{args.preset}]",
         f"batch_sizes=[{args.batch_size}]", "device=cpu"],
    )  # fmt: skip
    device = resolve_device(cfg.device)
    model = load_source_model(cfg, device)
    bench = load_corruption_benchmark(cfg.dataset, cfg.corruptions, cfg.severities, n_examples=cfg.n_examples)
    print(bench.describe())
    cell = cfg.cells()[0]
    plan = cell_plan(cell, bench, cfg)
    batches = list(StreamLoader(plan, bench.domains, device=device, batch_size=cell.batch_size, prefetch=0))
    print(f"{len(plan)} images in {len(batches)} batches; torch threads {torch.get_num_threads()}")

    harness, forward = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        summary = run_cell(cell, model, bench, cfg, device)
        harness.append(time.perf_counter() - start)
        tta = tta_norm.adapt(model, args.preset, device=device)
        start = time.perf_counter()
        with torch.no_grad():
            for b in batches:
                if b.reset:
                    tta.reset()
                tta(b.x)
        forward.append(time.perf_counter() - start)
    h, f = min(harness), min(forward)
    print(f"mean corruption error {100 * summary['mean_domain_error']:.1f} %")
    print(f"harness: {h:.1f} s ({len(plan) / h:.0f} img/s); forward only: {f:.1f} s")
    print(f"harness overhead over the forward: {100 * (h / f - 1):+.1f} %")


if __name__ == "__main__":
    main()
