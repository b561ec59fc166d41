"""Overhead of the Ray executor over the serial (local) executor on the ``quick`` grid, same total threads.

Serial: every cell one after the other in this process with ``--threads`` torch threads.  Ray: a local
cluster of ``--threads`` CPUs, one task per cell with ``num_cpus: 1`` (one torch thread each), the driver
appending records as tasks finish (the engine's ``run_on_ray``).  Outside the timed region: loading the model
and data, fingerprinting them, ``ray.init``, starting one worker per CPU, building/loading the compiled
kernels in this process and in every worker, and one untimed pass of each executor over the grid.
Inside: everything the engine does per grid (for Ray also putting the model and data in the object store).
The two runs alternate (serial first on even repeats) and the overhead is the median over repeats of
ray time / serial time - 1, which cancels most of the drift of a shared machine.
Records are written to throw-away directories.

    python scripts/bench_ray.py                        # quick: 5 cells, 15 corruptions x 1000 images
    python scripts/bench_ray.py -s n_examples=200      # a quicker look
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _warm_worker(_: int) -> int:
    import os

    import torch

    from tta_norm import kernels

    kernels.available()
    torch.nn.functional.conv2d(torch.zeros(1, 3, 8, 8), torch.zeros(4, 3, 3, 3))
    return os.getpid()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default="quick")
    parser.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--threads", type=int, default=2, help="total threads: serial torch threads = Ray CPUs")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import ray

    from tta_norm import kernels
    from tta_norm.bench import load_config
    from tta_norm.bench.executors import CellRun, run_locally
    from tta_norm.bench.ray_executor import run_on_ray
    from tta_norm.bench.runner import BenchJob
    from tta_norm.bench.store import ResultStore
    from tta_norm.device import resolve_device

    cfg = load_config(args.config, [*args.overrides, "device=cpu", "resources={num_cpus: 1}"])
    job = BenchJob(cfg)
    device = resolve_device(cfg.device)
    state = job.prepare(device)
    identity = job.identity(state)
    cells = job.cells()
    kernels.available()
    print(f"{len(cells)} cells; {state['bench'].describe()}")
    os.environ.setdefault("RAY_worker_niceness", "0")  # as the engine's local cluster: workers at normal priority
    ray.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=False)
    warm = ray.remote(_warm_worker).options(num_cpus=1)
    pids = ray.get([warm.remote(i) for i in range(args.threads)])
    print(f"ray: {ray.cluster_resources().get('CPU', 0):g} CPUs, warm workers {sorted(set(pids))}")

    def timed(executor: str) -> float:
        out = Path(tempfile.mkdtemp(prefix=f"bench-ray-{executor}-"))
        store = ResultStore(out)
        run = CellRun(job, cells, state, device, identity, lambda rec, cell: store.append(rec))
        torch.set_num_threads(args.threads)
        start = time.perf_counter()
        if executor == "ray":
            run_on_ray(run, progress=False)
        else:
            run_locally(run, progress=False)
        seconds = time.perf_counter() - start
        failed = [r for r in store.read().records.values() if r["status"] != "ok"]
        if failed:
            raise SystemExit(f"{executor}: {len(failed)} cells failed: {failed[0].get('error')}")
        return seconds

    # untimed: one pass of each executor pays the one-time imports (e.g. torch.optim for TENT) and
    # allocations in every process
    timed("local"), timed("ray")
    ratios = []
    for rep in range(args.repeats):
        order = ("local", "ray") if rep % 2 == 0 else ("ray", "local")
        t = {name: timed(name) for name in order}
        ratios.append(t["ray"] / t["local"])
        print(f"repeat {rep}: serial {t['local']:.1f} s, ray {t['ray']:.1f} s, ratio {ratios[-1]:.3f}")
    ray.shutdown()
    print(f"Ray executor overhead over serial (median of {args.repeats} paired repeats, {args.threads} threads "
          f"total): {100 * (statistics.median(ratios) - 1):+.1f} %")  # fmt: skip


if __name__ == "__main__":
    main()
