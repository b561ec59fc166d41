"""Throughput of the ``corruptions`` package: images/s per corruption and severity, and the extrapolated time
for a full CIFAR-10-C regeneration (19 corruptions x 5 severities x 10,000 images = 950,000 images).

Also times glass blur against a straightforward per-pixel loop of the original generator (Hendrycks &
Dietterich, ICLR 2019) on a few images.

    python scripts/bench_corruptions.py                 # 2000 CIFAR-10 test images, all 19 corruptions
    python scripts/bench_corruptions.py --n 1000 --workers 1 --corruptions glass_blur,zoom_blur
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from corruptions import ALL_CORRUPTIONS, corrupt  # noqa: E402
from corruptions.datasets import load_image_folder  # noqa: E402

DEFAULT_SOURCE = ROOT.parent / "shared" / "data" / "cifar10-jpeg" / "test"


def load_images(source: Path, n: int) -> tuple[np.ndarray, str]:
    if source.is_dir():
        images, _, _ = load_image_folder(source)
        if len(images) >= n:
            idx = np.random.default_rng(0).permutation(len(images))[:n]
            return images[np.sort(idx)], f"{n} images from {source}"
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), f"{n} random 32x32 images (no source found)"


def glass_loop_reference(img: np.ndarray, severity: int, rs: np.random.RandomState) -> np.ndarray:
    """The original glass blur, one image: skimage Gaussian, the per-pixel swap loop, Gaussian again."""
    from skimage.filters import gaussian

    sigma, delta, iters = [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)][severity - 1]
    x = np.uint8(gaussian(img / 255.0, sigma=sigma, channel_axis=-1) * 255)
    h_, w_ = x.shape[:2]
    for _ in range(iters):
        for h in range(h_ - delta, delta, -1):
            for w in range(w_ - delta, delta, -1):
                dx, dy = rs.randint(-delta, delta, size=(2,))
                hp, wp = h + dy, w + dx
                x[h, w], x[hp, wp] = x[hp, wp], x[h, w]
    return np.uint8(np.clip(gaussian(x / 255.0, sigma=sigma, channel_axis=-1), 0, 1) * 255)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="images per corruption and severity (default 2000)")
    ap.add_argument("--workers", type=int, default=None, help="threads (default: available CPUs)")
    ap.add_argument("--corruptions", default="all", help="comma list or 'all' (default)")
    ap.add_argument("--preset", default="cifar", choices=("cifar", "imagenet"))
    ap.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="ImageFolder of 32x32 images")
    ap.add_argument(
        "--glass-ref-images", type=int, default=20, help="images for the per-pixel loop (0: skip)"
    )
    ap.add_argument("--total-images", type=int, default=10_000, help="images per severity to extrapolate to")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers to this JSON file")
    args = ap.parse_args(argv)

    names = list(ALL_CORRUPTIONS) if args.corruptions == "all" else args.corruptions.split(",")
    x, desc = load_images(args.source, args.n)
    print(f"# {desc}; preset {args.preset}; workers {args.workers or 'auto'}")
    # one-time set-up (lookup tables, sparse operators, texture files, codec self-check), timed apart
    t0 = time.perf_counter()
    for name in names:
        for s in range(1, 6):
            corrupt(x[:8], name, s, seed=0, preset=args.preset, workers=1)
    setup = time.perf_counter() - t0

    rows = {}
    print(
        f"{'corruption':<18} "
        + " ".join(f"{'s' + str(s):>8}" for s in range(1, 6))
        + f" {'img/s':>8} {'s/50k':>7} {'cpu s/50k':>9}"
    )
    for name in names:
        times, cpu = [], 0.0
        for s in range(1, 6):
            t0, c0 = time.perf_counter(), time.process_time()
            corrupt(x, name, s, seed=1, preset=args.preset, workers=args.workers)
            times.append(time.perf_counter() - t0)
            cpu += time.process_time() - c0
        rate = [len(x) / t for t in times]
        overall = 5 * len(x) / sum(times)
        sec_full = 5 * args.total_images / overall
        cpu_full = cpu * args.total_images / len(x)
        rows[name] = {
            "per_severity": rate,
            "images_per_s": overall,
            "seconds_full": sec_full,
            "cpu_seconds_full": cpu_full,
        }
        print(
            f"{name:<18} "
            + " ".join(f"{r:8.0f}" for r in rate)
            + f" {overall:8.0f} {sec_full:7.1f} {cpu_full:9.1f}"
        )
    total = sum(r["seconds_full"] for r in rows.values())
    cpu_total = sum(r["cpu_seconds_full"] for r in rows.values())
    n_full = 5 * args.total_images * len(rows)
    print(
        f"# extrapolated: {n_full:,} images in {total:.1f} s ({n_full / total:,.0f} img/s)"
        f" + {setup:.1f} s set-up; {cpu_total:.1f} CPU-s; load average {os.getloadavg()[0]:.1f}"
    )

    if len(rows) == 19 and args.total_images == 10_000:
        # the figure for make_cifar_c.py: about 19 minutes of one core for the 950,000 images
        print(f"# vs the original generator's ~19 min (1140 s) single-core run: {1140 / total:.0f}x")
    result = {"source": desc, "preset": args.preset, "workers": args.workers, "rows": rows, "setup_s": setup}
    result["total_s"] = total
    result["cpu_total_s"] = cpu_total
    if args.glass_ref_images > 0 and "glass_blur" in rows:
        # back to back under the same conditions: the per-pixel loop, then ours on the same images
        k = args.glass_ref_images
        rs = np.random.RandomState(0)
        t0, c0 = time.perf_counter(), time.process_time()
        for s in range(1, 6):
            for img in x[:k]:
                glass_loop_reference(img, s, rs)
        loop_wall, loop_cpu = (time.perf_counter() - t0) / (5 * k), (time.process_time() - c0) / (5 * k)
        t0, c0 = time.perf_counter(), time.process_time()
        for s in range(1, 6):
            corrupt(x, "glass_blur", s, seed=2, preset=args.preset, workers=args.workers)
        ours_wall, ours_cpu = (
            (time.perf_counter() - t0) / (5 * len(x)),
            (time.process_time() - c0) / (5 * len(x)),
        )
        print(
            f"# glass blur: per-pixel loop {1 / loop_wall:.1f} img/s vs {1 / ours_wall:.0f} img/s"
            f" -> {loop_wall / ours_wall:.0f}x wall, {loop_cpu / ours_cpu:.0f}x per CPU-second"
        )
        result["glass_loop_images_per_s"] = 1 / loop_wall
        result["glass_speedup"] = loop_wall / ours_wall
        result["glass_speedup_cpu"] = loop_cpu / ours_cpu
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
