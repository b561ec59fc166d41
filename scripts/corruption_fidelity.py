"""Fidelity report of the ``corruptions`` package on the CIFAR-10 test set, in one table.

For every corruption and severity: image statistics of the corrupted set (mean and std of the pixel values,
PSNR against the clean images, share of values at 0 or 255) and the top-1 error of a pretrained model
(default: the CIFAR ResNet-20 of ``../shared/models`` through ``tta_norm.models.load_model``). Drift in
any corruption shows up as a change in these numbers; compare runs with ``--json``. The generator being
re-implemented is Hendrycks & Dietterich (ICLR 2019), ``make_cifar_c.py``.

    python scripts/corruption_fidelity.py                    # 1000-image subset, 15 corruptions
    python scripts/corruption_fidelity.py --full --corruptions all --json fidelity.json
    python scripts/corruption_fidelity.py --no-model         # image statistics only
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from corruptions import ALL_CORRUPTIONS, CORRUPTIONS, corrupt  # noqa: E402
from corruptions.datasets import load_source  # noqa: E402

DEFAULT_SOURCE = ROOT.parent / "shared" / "data" / "cifar10-jpeg" / "test"


def image_stats(clean: np.ndarray, corrupted: np.ndarray) -> dict[str, float]:
    """Mean/std of pixel values, PSNR (dB, from the MSE over the whole set) and % of values at 0 or 255."""
    diff = corrupted.astype(np.float64) - clean
    mse = float(np.mean(diff * diff))
    psnr = float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
    extreme = float(np.mean((corrupted == 0) | (corrupted == 255)) * 100)
    return {
        "mean": float(corrupted.mean()),
        "std": float(corrupted.std()),
        "psnr": psnr,
        "extreme_pct": extreme,
    }


def model_error(model, images: np.ndarray, labels: np.ndarray, batch: int) -> float:
    """Top-1 error (%) of ``model`` (float NCHW [0, 1] input) on uint8 NHWC ``images``."""
    import torch

    wrong = 0
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = torch.from_numpy(images[i : i + batch]).permute(0, 3, 1, 2).float().div_(255)
            pred = model(x).argmax(1).numpy()
            wrong += int((pred != labels[i : i + batch]).sum())
    return 100.0 * wrong / len(images)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--source", type=Path, default=DEFAULT_SOURCE, help="CIFAR-10 test set (ImageFolder/batches)"
    )
    ap.add_argument("--n", type=int, default=1000, help="class-balanced subset size (default 1000)")
    ap.add_argument("--full", action="store_true", help="use the whole test set")
    ap.add_argument("--corruptions", default="common", help="'common' (15), 'all' (19) or a comma list")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--model", default="resnet20", help="name for tta_norm.models.load_model (default resnet20)"
    )
    ap.add_argument("--no-model", action="store_true", help="skip the model error")
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None, help="write all numbers to this file")
    args = ap.parse_args(argv)

    names = {"common": list(CORRUPTIONS), "all": list(ALL_CORRUPTIONS)}.get(
        args.corruptions, args.corruptions.split(",")
    )
    images, labels = load_source(args.source)
    if not args.full and args.n < len(images):
        # the test set is stored class by class: a regular stride keeps the classes balanced
        idx = np.linspace(0, len(images) - 1, args.n).round().astype(int)
        images, labels = images[idx], labels[idx]

    model = None
    if not args.no_model:
        import torch

        from tta_norm.models import load_model

        torch.set_num_threads(max(1, torch.get_num_threads()))
        model = load_model(args.model)

    print(
        f"# {len(images)} images from {args.source}; seed {args.seed}; model {args.model if model else '-'}"
    )
    header = f"{'corruption':<18} {'sev':>3} {'mean':>7} {'std':>7} {'PSNR':>7} {'%0/255':>7} {'err%':>7}"
    print(header)
    rows = []
    clean_stats = image_stats(images, images)
    clean_err = model_error(model, images, labels, args.batch) if model else float("nan")
    rows.append({"corruption": "clean", "severity": 0, **clean_stats, "error": clean_err})
    print(
        f"{'clean':<18} {'-':>3} {clean_stats['mean']:7.2f} {clean_stats['std']:7.2f} {'inf':>7} "
        f"{clean_stats['extreme_pct']:7.2f} {clean_err:7.2f}"
    )
    t0 = time.perf_counter()
    for name in names:
        for s in range(1, 6):
            out = corrupt(images, name, s, seed=args.seed, workers=args.workers)
            st = image_stats(images, out)
            err = model_error(model, out, labels, args.batch) if model else float("nan")
            rows.append({"corruption": name, "severity": s, **st, "error": err})
            print(
                f"{name:<18} {s:>3} {st['mean']:7.2f} {st['std']:7.2f} {st['psnr']:7.2f} "
                f"{st['extreme_pct']:7.2f} {err:7.2f}",
                flush=True,
            )
    if model:
        print("\n# error % by severity")
        print(f"{'corruption':<18} " + " ".join(f"{'s' + str(s):>6}" for s in range(1, 6)) + f" {'mean':>6}")
        for name in names:
            errs = [r["error"] for r in rows if r["corruption"] == name]
            print(f"{name:<18} " + " ".join(f"{e:6.1f}" for e in errs) + f" {np.mean(errs):6.1f}")
        per_sev = [np.mean([r["error"] for r in rows if r["severity"] == s]) for s in range(1, 6)]
        print(f"{'mean':<18} " + " ".join(f"{e:6.1f}" for e in per_sev) + f" {np.mean(per_sev):6.1f}")
    print(f"# {time.perf_counter() - t0:.0f} s")
    if args.json:
        meta = {"n": int(len(images)), "seed": args.seed, "model": args.model if model else None}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
