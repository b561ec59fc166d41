"""The Ray executor on a local two-CPU cluster: the same records as a serial run, and a killed worker's cell
retried and recorded once."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tta_norm.bench.engine import RunOptions, run_grid
from tta_norm.bench.merge import comparable
from tta_norm.bench.runner import BenchJob
from tta_norm.bench.store import ResultStore

from . import tinybench, toyjob

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    from ray import cloudpickle

    for module in (toyjob, tinybench):  # test helpers travel by value: workers need not import the tests
        cloudpickle.register_pickle_by_value(sys.modules[module.__name__])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_bench_grid_equals_a_serial_run(cluster, tmp_path):
    def job(out: Path) -> BenchJob:
        cfg = tinybench.bench_config(str(out), seeds=[0])
        return BenchJob(cfg, model=tinybench.tiny_model(), bench=tinybench.fake_benchmark())

    serial = run_grid(job(tmp_path / "serial"), RunOptions(progress=False))
    on_ray = run_grid(job(tmp_path / "ray"), RunOptions(executor="ray", progress=False))
    assert on_ray.failed == 0 and on_ray.ran == serial.ran == 3
    assert [comparable(r) for r in on_ray.records] == [comparable(r) for r in serial.records]


def test_a_killed_worker_cell_is_retried_and_recorded_once(cluster, tmp_path):
    marker = tmp_path / "killed"
    cfg = toyjob.ToyConfig(output=str(tmp_path / "run"), values=[1, 2, 3, 4], kill_marker=str(marker), kill_value=3,
                           sleep=0.2)  # fmt: skip
    outcome = run_grid(toyjob.ToyJob(cfg), RunOptions(executor="ray", progress=False))
    assert marker.is_file()  # the first attempt at cell 3 killed its worker process
    assert (outcome.ran, outcome.failed) == (4, 0)
    lines = (tmp_path / "run" / "results.jsonl").read_text().splitlines()
    assert len(lines) == 4
    records = ResultStore(tmp_path / "run").read().records.values()
    assert sorted(r["metrics"]["value"] for r in records) == [1, 2, 3, 4]
    retried = next(r for r in records if r["cell"]["value"] == 3)
    assert retried["metrics"]["pid"] != int(marker.read_text())  # finished by another worker


def test_ray_starts_the_costliest_cells_first(cluster, tmp_path):
    cfg = toyjob.ToyConfig(output=str(tmp_path / "run"), values=[1, 2, 3, 4], sleep=1.0, record_start=True)
    outcome = run_grid(toyjob.ToyJob(cfg), RunOptions(executor="ray", progress=False))
    started = {r["cell"]["value"]: r["metrics"]["started"] for r in outcome.records}
    finished = {r["cell"]["value"]: r["metrics"]["finished"] for r in outcome.records}
    # two CPUs: cells 4 and 3 (the costliest) go first; 2 and 1 start only once one of them is done (a cold
    # worker process may start cell 3 a little after cell 2, on the worker cell 4 freed)
    assert min(started[2], started[1]) >= min(finished[4], finished[3])


def test_a_failing_cell_on_ray_is_recorded_and_the_grid_goes_on(cluster, tmp_path):
    cfg = toyjob.ToyConfig(output=str(tmp_path / "run"), fail=[2])
    outcome = run_grid(toyjob.ToyJob(cfg), RunOptions(executor="ray", progress=False))
    assert (outcome.ran, outcome.failed, outcome.exit_status) == (4, 1, 1)
    assert [r["status"] for r in outcome.records] == ["ok", "failed", "ok", "ok"]


def test_cluster_slots_count_the_cells_that_run_at_once():
    from tta_norm.bench.ray_executor import cluster_slots

    assert cluster_slots({"CPU": 2.0}, 1, 0) == 2
    assert cluster_slots({"CPU": 8.0, "GPU": 2.0}, 1, 1) == 2  # the GPUs bound it
    assert cluster_slots({"CPU": 3.0}, 0.5, 0) == 6
    assert cluster_slots({"CPU": 1.0}, 4, 0) == 1  # too large for the cluster: still queued, one at a time
    assert cluster_slots({"CPU": 4.0}, 1, 1) == 1  # no GPU yet (an autoscaling cluster): one queued
