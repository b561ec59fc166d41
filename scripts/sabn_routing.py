"""SaBN routing measured on continual and mixed streams: routing accuracy against the true domain, error vs tbn/ema.

1. Train SaBN heads (``tta_norm.fitting.sabn.train_sabn``; shared + K = 4 heads for clean, colour jitter,
   Gaussian blur, Gaussian noise; source statistics) on ``--train-images`` random images of the mirror's
   ``train/`` split (skipped if ``<out>/sabn-<model>.pt`` exists).
2. Known domains: ``--n-test`` random clean test images turned into the 4 training-time domains (one fixed
   magnitude per domain), streamed ``continual`` (domain blocks) and ``mixed`` (all pooled): routing by
   oracle / nearest statistics / lowest entropy / open set, against source, tbn, ema and the shared affine only.
   The open-set threshold is calibrated per batch size on 1000 held-out train images (95% quantile of the
   distances of known-domain batches to their own entry).  Routing accuracy = fraction of samples whose routed
   head is their true domain.
3. Unknown domains: the 15 CIFAR-10-C corruptions (severity 5) on ``--n-per-corruption`` random test images,
   ``continual``: open-set routing (new heads), nearest known head, entropy; purity = per corruption, the share
   of its batches routed to its most frequent head.

Writes ``<out>/sabn_routing.json`` and ``<out>/sabn_routing.md``.

    python scripts/sabn_routing.py --out runs/sabn_routing                      # ~15 min on 2 busy CPU cores
    python scripts/sabn_routing.py --train-images 256 --train-epochs 1 --n-test 64 --n-per-corruption 20 \\
        --corruptions fog gaussian_noise --out /tmp/sabn-smoke                   # smoke test
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import tta_norm
from tta_norm.data import CORRUPTIONS, load_clean_test_set
from tta_norm.fitting._data import load_source_split, seeded_subset
from tta_norm.fitting.benchdata import subset_corruption_benchmark
from tta_norm.fitting.sabn import SaBNRouter, calibrate_threshold, synthetic_domains, train_sabn
from tta_norm.models import load_model
from tta_norm.streams import StreamLoader, StreamSpec, build_stream, domain_schedule


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--out", default="runs/sabn_routing")
    p.add_argument("--train-images", type=int, default=4000)
    p.add_argument("--train-epochs", type=int, default=2)
    p.add_argument("--n-test", type=int, default=500, help="clean test images per synthetic domain")
    p.add_argument("--n-per-corruption", type=int, default=400)
    p.add_argument("--corruptions", nargs="+", default=list(CORRUPTIONS))
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[16, 64])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


Predictor = tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], Callable[[], None], object]


def make_predictors(
    model, payload, names: list[str], which: list[str], max_new: int, threshold: float | None = None
) -> dict[str, Predictor]:
    """name -> (predict(x, true_domain_ids), reset(), router or None)."""
    out: dict[str, Predictor] = {}
    for preset in ("source", "tbn", "ema"):
        if preset in which:
            tta = tta_norm.adapt(model, preset)
            out[preset] = (lambda x, d, t=tta: t(x), tta.reset, None)
    k = len(names)
    if "sabn-shared" in which:
        tta = tta_norm.adapt(model, "sabn", num_domains=k, init_state=payload["state_dict"])
        out["sabn-shared"] = (lambda x, d, t=tta: t(x), tta.reset, None)
    if "sabn-oracle" in which:
        tta = tta_norm.adapt(model, "sabn", num_domains=k, init_state=payload["state_dict"])
        out["sabn-oracle"] = (lambda x, d, t=tta: t(x, domain=d.to(x.device)), tta.reset, None)
    for mode in ("stats", "entropy", "open_set"):
        name = f"sabn-{mode}"
        if name in which:
            extra = {"max_new_domains": max_new, "threshold": threshold} if mode == "open_set" else {}
            router = SaBNRouter.from_state(model, payload, mode, **extra)
            out[name] = (lambda x, d, r=router: r(x), router.reset, router)
    return out


@torch.no_grad()
def run_stream(
    plan, data, predictors: dict[str, Predictor], batch_size: int, progress: bool, domains_are_heads: bool = True
) -> dict[str, dict]:
    from tqdm.auto import tqdm

    results = {}
    for name, (predict, reset, router) in predictors.items():
        reset()
        wrong, n, agree = 0, 0, 0
        batch_domains: list[np.ndarray] = []
        loader = StreamLoader(plan, data, batch_size=batch_size, prefetch=0)
        for batch in tqdm(loader, desc=name, disable=not progress, leave=False):
            if batch.reset and batch.step > 0:
                reset()
            logits = predict(batch.x, batch.domain)
            wrong += int((logits.argmax(1) != batch.y).sum())
            n += len(batch.y)
            dom = batch.domain.numpy()
            batch_domains.append(dom)
            if router is not None:
                agree += int((dom == router.routes[-1]).sum())
        rec = {"error": wrong / n, "samples": n}
        if router is not None:
            if domains_are_heads:
                rec["routing_accuracy"] = agree / n
            rec["heads_used"] = len(set(router.routes))
            rec["heads_spawned"] = router.active - router.num_known
            table: dict[str, Counter] = {}
            for dom, head in zip(batch_domains, router.routes, strict=True):
                key = plan.domains[Counter(dom.tolist()).most_common(1)[0][0]][0]
                table.setdefault(key, Counter())[int(head)] += 1
            rec["routes"] = {d: dict(c) for d, c in table.items()}
            rec["purity"] = sum(max(c.values()) for c in table.values()) / max(1, sum(sum(c.values()) for c in
                                                                                    table.values()))  # fmt: skip
        results[name] = rec
    return results


def table(results: dict[str, dict], title: str) -> str:
    lines = [f"### {title}", "", "| method | error % | routing acc. % | purity % | heads used | spawned |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in results.items():
        ra = f"{100 * r['routing_accuracy']:.1f}" if "routing_accuracy" in r else "-"
        pu = f"{100 * r['purity']:.1f}" if "purity" in r else "-"
        lines.append(f"| {name} | {100 * r['error']:.1f} | {ra} | {pu} | {r.get('heads_used', '-')} | "
                     f"{r.get('heads_spawned', '-')} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.quiet
    model = load_model(args.model, args.checkpoint)
    path = out / f"sabn-{args.model}.pt"
    if not path.is_file():
        t0 = time.perf_counter()
        images, labels = load_source_split("train", args.train_images, seed=args.seed, progress=progress)
        res = train_sabn(model, images, labels, epochs=args.train_epochs, seed=args.seed, progress=progress)
        res.save(path)
        print(f"trained SaBN heads in {time.perf_counter() - t0:.0f} s -> {path}; history {res.history}")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    names = list(payload["meta"]["domains"])
    report: dict[str, dict] = {"domains": names, "train_history": payload["meta"].get("history")}
    held_x, _ = load_source_split("train", 1000, seed=args.seed, offset=args.train_images, progress=False)
    probe = SaBNRouter.from_state(model, payload, "stats")
    thresholds = {bs: calibrate_threshold(probe.tta.model, probe.bank, held_x, batch_size=bs, seed=args.seed)
                  for bs in args.batch_sizes}  # fmt: skip
    report["open_set_thresholds"] = thresholds
    md = ["# SaBN routing", "", f"Heads: {names} (trained on {payload['meta'].get('n_images')} train images).",
          f"Open-set thresholds per batch size: { {b: round(t, 3) for b, t in thresholds.items()} }.", ""]

    # known domains
    clean = load_clean_test_set("cifar10")
    idx = np.sort(seeded_subset(len(clean), args.n_test, args.seed + 1))
    sub = clean.subset(idx)
    data = synthetic_domains(sub.images, sub.labels, names, seed=args.seed + 1)
    known = ["source", "tbn", "ema", "sabn-shared", "sabn-oracle", "sabn-stats", "sabn-entropy", "sabn-open_set"]
    for setting in ("continual", "mixed"):
        for bs in args.batch_sizes:
            plan = build_stream({k: v.labels for k, v in data.items()}, domain_schedule(names, [1], setting),
                                StreamSpec(setting=setting, batch_size=bs), seed=args.seed)  # fmt: skip
            preds = make_predictors(model, payload, names, known, max_new=4, threshold=thresholds[bs])
            res = run_stream(plan, data, preds, bs, progress)
            report[f"known/{setting}/b{bs}"] = res
            md += [table(res, f"Known domains ({', '.join(names)}), {setting}, batch {bs}, "
                              f"{args.n_test} images per domain"), ""]  # fmt: skip
            print(md[-2])

    # unknown domains: CIFAR-10-C
    bench = subset_corruption_benchmark(args.n_per_corruption, args.corruptions, (5,), subset_seed=args.seed,
                                        progress=progress)  # fmt: skip
    unknown = ["source", "tbn", "ema", "sabn-shared", "sabn-stats", "sabn-entropy", "sabn-open_set"]
    bs = max(args.batch_sizes)
    plan = build_stream(bench.labels(), domain_schedule(args.corruptions, [5], "continual"),
                        StreamSpec(setting="continual", batch_size=bs), seed=args.seed)  # fmt: skip
    preds = make_predictors(model, payload, names, unknown, max_new=len(args.corruptions), threshold=thresholds[bs])
    res = run_stream(plan, bench.domains, preds, bs, progress, domains_are_heads=False)
    report[f"cifar10c/continual/b{bs}"] = res
    md += [table(res, f"CIFAR-10-C severity 5 ({len(args.corruptions)} corruptions, {args.n_per_corruption} random "
                      f"test images each), continual, batch {bs} (no routing accuracy: the corruptions are not heads)"),
           "", "Routes per corruption (head: batches) for open-set routing:", ""]  # fmt: skip
    for dom, c in res.get("sabn-open_set", {}).get("routes", {}).items():
        md.append(f"- {dom}: {c}")
    print("\n".join(md[-(len(res) + 8):]))
    (out / "sabn_routing.json").write_text(json.dumps(report, indent=1))
    (out / "sabn_routing.md").write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
