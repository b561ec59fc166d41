"""Measure the evaluation harness's overhead over the model's own forward time (target <= 10 %).

Baseline: the model's forward on pre-built float batches (data already in memory, nothing else).
Harness: the bench loop -- StreamLoader (gather from uint8 arrays, convert, prefetch thread) -> model ->
MetricsAccumulator.update (with per-batch timing). Both run the same batches of the same stream; each is
repeated and the fastest repetition is kept, to damp noise from other processes on a shared machine.

    python scripts/bench_harness_io.py                       # ResNet-20, mirror test set, batch 200
    python scripts/bench_harness_io.py --batch-size 16 --setting mixed --bn-mode train
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--domains", type=int, default=3, help="copies of the clean set used as stream domains")
    p.add_argument("--n", type=int, default=5000, help="samples per domain")
    p.add_argument("--setting", default="continual", choices=["continual", "mixed"])
    p.add_argument("--bn-mode", default="eval", choices=["eval", "train"],
                   help="'train' = BatchNorm with test-batch statistics (the BN-1 norm-only preset)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()

    from tta_norm.data import load_clean_test_set
    from tta_norm.metrics import BatchTimer, MetricsAccumulator
    from tta_norm.models import load_model
    from tta_norm.streams import StreamLoader, StreamSpec, build_stream

    device = torch.device(args.device)
    clean = load_clean_test_set("cifar10", args.data_dir).head(args.n)
    data = {(f"copy{i}", 5): clean for i in range(args.domains)}
    keys = list(data)
    spec = StreamSpec(setting=args.setting, batch_size=args.batch_size)
    plan = build_stream({k: d.labels for k, d in data.items()}, keys, spec, seed=0)
    model = load_model(args.model, device=device)
    if args.bn_mode == "train":
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.train()

    batches = [b.x for b in StreamLoader(plan, data, device=device, prefetch=0)]

    def baseline() -> float:
        timer = BatchTimer(device)
        with torch.no_grad():
            for x in batches:
                with timer:
                    model(x)
        return sum(timer.times)

    def harness() -> tuple[float, float]:
        acc = MetricsAccumulator.from_plan(plan)
        timer = BatchTimer(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            for batch in StreamLoader(plan, data, device=device, prefetch=2):
                with timer:
                    logits = model(batch.x)
                acc.update(logits, batch.y, batch.domain, latency=timer.last, segment=batch.segment)
        acc.summary()
        return time.perf_counter() - t0, sum(timer.times)

    baseline()  # warm-up
    base, full, inner = [], [], []
    for _ in range(args.repeats):
        base.append(baseline())
        total, fwd = harness()
        full.append(total)
        inner.append(total / fwd - 1)
    b, h = min(base), min(full)
    n = len(plan)
    print(f"{args.model} {args.setting} batch {args.batch_size} bn={args.bn_mode} on {device}: {n} samples, "
          f"{len(batches)} batches")  # fmt: skip
    print(f"model forward only : {b:7.2f} s  ({n / b:7.0f} img/s)   runs: {', '.join(f'{t:.2f}' for t in base)}")
    print(f"full harness loop  : {h:7.2f} s  ({n / h:7.0f} img/s)   runs: {', '.join(f'{t:.2f}' for t in full)}")
    print(f"overhead vs separate forward-only run : {100 * (h / b - 1):+.1f} %  (sensitive to other load)")
    print(f"overhead inside the loop (time outside the model's forward / forward time), per run: "
          f"{', '.join(f'{100 * o:+.1f} %' for o in inner)}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
