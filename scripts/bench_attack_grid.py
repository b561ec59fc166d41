#!/usr/bin/env python
"""Projected wall time of a whole attack grid on this machine, from measured per-step costs.

For each method entry of the config the script times a few steps of the real attacker (:func:`craft_malicious`,
the config's protocol and batch size, the shared model or a random-init ResNet-20 of the same shape) and the
plain forward+backward of the same adapted model, then multiplies by what the grid runs: per cell and attacked
batch ``steps + 3`` passes for indiscriminate attacks (the full budget: clean reference, crafting, attacked
prediction) and for targeted ones the measured mean steps of a finished run (``--run DIR``: its records'
``mean_steps``) or the full budget (an upper bound).  It also prints the part that no normalisation layer can
remove: the plain convolution work of the same passes (the source model's forward+backward).  With
``--compiled-floor`` it also compiles that plain network (``torch.compile``, eval mode, so the compiler may fold
the normalisation into the convolutions) and scales the floor by the median ratio of compiled to eager
forward+backward over paired rounds: the convolution work alone, compiled.

    python scripts/bench_attack_grid.py attack_medbn                  # the headline grid, upper bound
    python scripts/bench_attack_grid.py attack_medbn --run runs/attack_medbn --timing-steps 5
    python scripts/bench_attack_grid.py attack_medbn --compiled-floor
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch


def _seconds_per_step(fn, steps: int) -> float:
    fn(1)  # warm-up
    start = time.perf_counter()
    fn(steps)
    return (time.perf_counter() - start) / steps


def _compiled_ratio(model: torch.nn.Module, x: torch.Tensor, rounds: int) -> float:
    """Median over ``rounds`` of (compiled / eager) seconds of one input-gradient forward+backward of ``model``."""
    import copy
    import statistics

    eager = copy.deepcopy(model).eval().requires_grad_(False)
    compiled = torch.compile(copy.deepcopy(model).eval().requires_grad_(False))

    def step(net: torch.nn.Module) -> None:
        with torch.enable_grad():
            xi = x.clone().requires_grad_(True)
            torch.autograd.grad(net(xi).sum(), [xi])

    step(compiled)  # compile
    step(eager)
    ratios = []
    for _ in range(rounds):
        start = time.perf_counter()
        step(eager)
        mid = time.perf_counter()
        step(compiled)
        ratios.append((time.perf_counter() - mid) / (mid - start))
    return statistics.median(ratios)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default="attack_medbn")
    parser.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--run", default=None, help="a finished run of the grid: use its mean steps per attack")
    parser.add_argument("--timing-steps", type=int, default=5, help="attacker steps timed per method entry")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--compiled-floor", action="store_true",
                        help="also scale the floor by torch.compile's speed-up of the plain network")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=15, help="paired rounds for --compiled-floor")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import tta_norm
    from tta_norm.attacks import MaliciousAttack, craft_malicious
    from tta_norm.attacks.bench import load_attack_config
    from tta_norm.bench.store import ResultStore
    from tta_norm.device import resolve_device
    from tta_norm.models import cifar_resnet, load_model
    from tta_norm.norm import keep_state

    cfg = load_attack_config(args.config, args.overrides)
    device = resolve_device(cfg.device)
    try:
        model = load_model(cfg.model, device=device)
    except (FileNotFoundError, ValueError):
        model = cifar_resnet(20).to(device).eval()
    n_domains = len(cfg.corruptions) * len(cfg.severities)
    g = torch.Generator().manual_seed(0)
    mean_steps: dict[tuple[str, str, float], float] = {}
    if args.run:
        for rec in ResultStore(Path(args.run)).read().records.values():
            m, c = rec.get("metrics") or {}, rec["cell"]
            if rec["status"] == "ok" and m.get("mean_steps") is not None:
                mean_steps[(c["method"]["name"], c["objective"], c["fraction"])] = m["mean_steps"]

    per_step: dict[str, float] = {}
    plain_step: dict[str, float] = {}
    total = conv_total = 0.0
    rows = defaultdict(float)
    conv_by_batch: dict[int, float] = defaultdict(float)
    for cell in cfg.cells():
        entry, bs = cell.entry, cell.batch_size
        key = f"{entry.label} b{bs}"
        if key not in per_step:
            x = torch.rand(bs, 3, 32, 32, generator=g).to(device)
            y = torch.randint(0, 10, (bs,), generator=g).to(device)
            tta = tta_norm.adapt(model, entry.preset, entry.method, device=device, **dict(entry.kwargs))

            def attack(steps: int, tta=tta, x=x, y=y, fraction=cell.fraction) -> None:
                a = MaliciousAttack.from_protocol(cfg.protocol, objective="indiscriminate", fraction=fraction,
                                                  steps=steps, step_size=cfg.step_size, init=cfg.init)  # fmt: skip
                craft_malicious(tta, x, y, a)

            source = tta_norm.adapt(model, "source")

            def plain(steps: int, x=x, source=source) -> None:
                for _ in range(steps):
                    with keep_state(source.model), torch.enable_grad():
                        xi = x.clone().requires_grad_(True)
                        torch.autograd.grad(source.model(xi).sum(), [xi])

            with torch.no_grad():
                per_step[key] = _seconds_per_step(attack, args.timing_steps)
                plain_step[key] = _seconds_per_step(plain, args.timing_steps)
            print(f"{key}: {per_step[key]:.3f} s per attacker step, plain conv fwd+bwd {plain_step[key]:.3f} s")
        budget = cfg.steps
        if cell.objective == "targeted":
            budget = mean_steps.get((entry.label, cell.objective, cell.fraction), cfg.steps)
        passes = n_domains * cfg.batches_for(cell.objective) * (budget + 3)
        seconds = passes * per_step[key]
        total += seconds
        conv_total += passes * plain_step[key]
        conv_by_batch[bs] += passes * plain_step[key]
        rows[(entry.label, cell.objective)] += seconds
    compiled: dict[str, float] = {}
    if args.compiled_floor:
        ratios = {bs: _compiled_ratio(model, torch.rand(bs, 3, 32, 32, generator=g).to(device), args.rounds)
                  for bs in conv_by_batch}  # fmt: skip
        floor = sum(conv_by_batch[bs] * r for bs, r in ratios.items())
        compiled = {"compiled_to_eager_ratio": {str(bs): round(r, 3) for bs, r in ratios.items()},
                    "compiled_floor_minutes": round(floor / 60, 1)}  # fmt: skip
    print(json.dumps({"config": cfg.name, "cells": len(cfg.cells()), "threads": torch.get_num_threads(),
                      "targeted_steps": "measured" if mean_steps else f"full budget ({cfg.steps})",
                      "projected_minutes": round(total / 60, 1),
                      "convolution_floor_minutes": round(conv_total / 60, 1), **compiled,
                      "minutes_by_row": {f"{m} {o}": round(s / 60, 1) for (m, o), s in rows.items()}}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
