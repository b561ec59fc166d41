"""Overhead of the bench harness over the adapted model's own forward, and the full-benchmark wall time.

One bench cell (CIFAR ResNet-20, ``tbn``, 15 corruptions at severity 5, reset for every corruption, batch 200)
is timed corruption by corruption: for each corruption, the harness (stream plan, prefetching loader, wrapper,
metrics) runs the cell's segment, and the same adapted forwards run on the same batches already in memory,
back to back, in alternating order (harness first on even repeats).  Pairing every ~10 s segment with its
forward-only twin cancels the shared VM's speed drift (+-15 % over minutes), which made whole-run min/min
comparisons swing between +2 % and +22 % for the same code.  Overhead = sum of harness times / sum of
forward-only times - 1 (median over repeats); the full cell's time = the sum of the harness times.  The
corruption data are loaded (or regenerated and cached) before any timing starts.

    python scripts/bench_harness.py                    # 15 x 10,000 images (the issue's figure)
    python scripts/bench_harness.py --n-examples 2000  # a quicker look
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

import tta_norm
from tta_norm.bench import load_config
from tta_norm.bench.runner import cell_plan, load_source_model, run_cell
from tta_norm.data import load_corruption_benchmark
from tta_norm.device import resolve_device
from tta_norm.streams import StreamLoader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-examples", type=int, default=None, help="images per corruption (default: all)")
    parser.add_argument("--preset", default="tbn")
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2, help="repeats of the paired per-corruption timings")
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
    print(f"torch threads {torch.get_num_threads()}")

    def harness(part):
        return run_cell(part.cells()[0], model, bench, part, device)

    def forward_only(batches):
        tta = tta_norm.adapt(model, args.preset, device=device)
        with torch.no_grad():
            for b in batches:
                tta(b.x)

    totals_h, totals_f, errors, images = [], [], [], 0
    for r in range(args.repeats):
        sum_h = sum_f = 0.0
        for corruption in cfg.corruptions:
            part = dataclasses.replace(cfg, corruptions=[corruption])
            plan = cell_plan(part.cells()[0], bench, part)
            batches = list(StreamLoader(plan, bench.domains, device=device, batch_size=args.batch_size, prefetch=0))
            times = {}
            for which in ("harness", "forward") if r % 2 == 0 else ("forward", "harness"):
                start = time.perf_counter()
                if which == "harness":
                    summary = harness(part)
                else:
                    forward_only(batches)
                times[which] = time.perf_counter() - start
            sum_h += times["harness"]
            sum_f += times["forward"]
            if r == 0:
                errors.append(summary["mean_domain_error"])
                images += len(plan)
            del batches
        totals_h.append(sum_h)
        totals_f.append(sum_f)
        print(f"repeat {r + 1}: harness {sum_h:.1f} s, forward only {sum_f:.1f} s, "
              f"overhead {100 * (sum_h / sum_f - 1):+.1f} %", flush=True)  # fmt: skip
    ratio = statistics.median(h / f for h, f in zip(totals_h, totals_f, strict=True))
    h = statistics.median(totals_h)
    print(f"mean corruption error {100 * sum(errors) / len(errors):.1f} %")
    print(f"full cell ({images} images): {h:.1f} s ({images / h:.0f} img/s), median over repeats")
    print(f"harness overhead over the forward: {100 * (ratio - 1):+.1f} % (median over repeats)")


if __name__ == "__main__":
    main()
