"""The grid engine: keys, an append-only store that keeps every cell, resume, failures, torn lines, shards."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
from pathlib import Path

import pytest

from tta_norm.bench.engine import RunOptions, run_grid
from tta_norm.bench.grid import parse_shard, shard_cells
from tta_norm.bench.merge import merge_dirs
from tta_norm.bench.store import ResultStore
from tta_norm.bench.validate import ConfigError

from .toyjob import ToyConfig, ToyJob


def lines(out: Path) -> list[str]:
    return (out / "results.jsonl").read_text().splitlines()


def values(outcome) -> dict[int, int]:
    return {r["cell"]["value"]: r["metrics"]["value"] for r in outcome.records if r["status"] == "ok"}


def test_existing_results_refuse_without_resume_or_overwrite(tmp_path):
    cfg = ToyConfig(output=str(tmp_path / "run"))
    first = run_grid(ToyJob(cfg), RunOptions(progress=False))
    assert (first.cells, first.reused, first.ran, first.failed) == (4, 0, 4, 0)
    before = (tmp_path / "run" / "results.jsonl").read_text()
    with pytest.raises(ConfigError, match="--resume.*--overwrite"):
        run_grid(ToyJob(cfg), RunOptions(progress=False))
    assert (tmp_path / "run" / "results.jsonl").read_text() == before  # untouched
    with pytest.raises(ConfigError, match="exclude each other"):
        run_grid(ToyJob(cfg), RunOptions(resume=True, overwrite=True, progress=False))
    again = run_grid(ToyJob(cfg), RunOptions(resume=True, progress=False))
    assert (again.reused, again.ran) == (4, 0) and (tmp_path / "run" / "results.jsonl").read_text() == before
    stale = tmp_path / "run" / "plots" / "a_method_no_longer_run.png"  # a figure of the replaced results
    stale.parent.mkdir(exist_ok=True)
    stale.write_bytes(b"png")
    fresh = run_grid(ToyJob(cfg), RunOptions(overwrite=True, progress=False))
    assert (fresh.reused, fresh.ran) == (0, 4) and len(lines(tmp_path / "run")) == 4
    assert not stale.exists()


def test_resume_reuses_only_full_key_matches_and_says_why(tmp_path, caplog):
    out = str(tmp_path / "run")
    run_grid(ToyJob(ToyConfig(output=out, scale=1)), RunOptions(progress=False))
    caplog.set_level(logging.INFO, logger="tta_norm.bench")
    other = run_grid(ToyJob(ToyConfig(output=out, scale=2, values=[1, 2, 3, 4, 5])), RunOptions(resume=True,
                     progress=False))  # fmt: skip
    assert (other.reused, other.ran) == (0, 5)
    assert "4 params differ" in caplog.text and "1 not stored" in caplog.text
    # the report and CSV hold this grid's records only; the other grid's stay in the append-only store
    assert values(other) == {v: 2 * v for v in [1, 2, 3, 4, 5]}
    assert len(lines(tmp_path / "run")) == 9
    report = (tmp_path / "run" / "report.md").read_text().splitlines()
    assert len(report) == 5 and all(json.loads(x)[2] == 2 * json.loads(x)[0] for x in report)
    # the first grid is still reusable
    back = run_grid(ToyJob(ToyConfig(output=out, scale=1)), RunOptions(resume=True, progress=False))
    assert (back.reused, back.ran) == (4, 0) and values(back) == {v: v for v in [1, 2, 3, 4]}


def test_failed_cells_are_recorded_the_grid_goes_on_and_resume_retries_them(tmp_path):
    out = str(tmp_path / "run")
    first = run_grid(ToyJob(ToyConfig(output=out, fail=[2])), RunOptions(progress=False))
    assert (first.ran, first.failed, first.exit_status) == (4, 1, 1)
    failed = [r for r in first.records if r["status"] == "failed"]
    assert len(failed) == 1 and "fails on purpose" in failed[0]["error"] and "RuntimeError" in failed[0]["traceback"]
    assert values(first) == {1: 1, 3: 3, 4: 4}
    retry = run_grid(ToyJob(ToyConfig(output=out)), RunOptions(resume=True, progress=False))
    assert (retry.reused, retry.ran, retry.failed, retry.exit_status) == (3, 1, 0, 0)
    assert values(retry) == {1: 1, 2: 2, 3: 3, 4: 4} and len(retry.records) == 4


def test_torn_last_line_is_reported_and_its_cell_runs_again(tmp_path, caplog):
    out = tmp_path / "run"
    run_grid(ToyJob(ToyConfig(output=str(out))), RunOptions(progress=False))
    text = (out / "results.jsonl").read_text()
    cut = text.rstrip("\n").rfind("\n") + 40
    (out / "results.jsonl").write_text(text[:cut])  # the last record cut off mid-write
    caplog.set_level(logging.INFO, logger="tta_norm.bench")
    resumed = run_grid(ToyJob(ToyConfig(output=str(out))), RunOptions(resume=True, progress=False))
    assert "the last line is torn" in caplog.text
    assert (resumed.reused, resumed.ran) == (3, 1) and values(resumed) == {1: 1, 2: 2, 3: 3, 4: 4}
    contents = ResultStore(out).read()
    assert contents.bad_lines == [4] and len(contents.records) == 4  # the torn line did not swallow the new one


def _append_many(directory: str, tag: int, n: int) -> None:
    store = ResultStore(directory)
    for i in range(n):
        store.append({"key": f"{tag}-{i}", "kind": "toy", "status": "ok", "cell": {}, "metrics": {},
                      "payload": "x" * 2000})


def test_two_processes_appending_to_one_store_keep_every_record(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(str(tmp_path), tag, 150)) for tag in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    contents = ResultStore(tmp_path).read()
    assert contents.bad_lines == [] and len(contents.records) == 300


def _run_toy(out: str, shard: str | None, values: list[int]) -> None:
    run_grid(ToyJob(ToyConfig(output=out, values=values, sleep=0.05)),
             RunOptions(resume=True, shard=parse_shard(shard), progress=False))  # fmt: skip


def test_two_grid_processes_on_one_directory_keep_all_cells(tmp_path):
    out = str(tmp_path / "run")
    ctx = mp.get_context("spawn")
    vals = list(range(1, 13))
    procs = [ctx.Process(target=_run_toy, args=(out, s, vals)) for s in ("1/2", "2/2")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    contents = ResultStore(out).read()
    assert contents.bad_lines == [] and len(contents.records) == 12
    assert sorted(r["metrics"]["value"] for r in contents.records.values()) == vals


def test_shards_are_a_deterministic_partition():
    cells = ToyJob(ToyConfig(output="x", values=list(range(10)))).cells()
    parts = [shard_cells(cells, (k, 3)) for k in (1, 2, 3)]
    assert sorted(c.index for p in parts for c in p) == list(range(10))
    assert [c.index for c in parts[1]] == [1, 4, 7]
    for bad in ("0/2", "3/2", "1", "a/b", "1/0"):
        with pytest.raises(ConfigError, match="--shard"):
            parse_shard(bad)


def test_ok_records_of_one_key_that_differ_within_one_store_are_a_conflict(tmp_path, caplog):
    """Two ok records of one key with other numbers in one store: the last was used by the report and by a
    merge, without a word (across two stores the same pair was a conflict, exit status 1)."""
    run_grid(ToyJob(ToyConfig(output=str(tmp_path / "s"), values=[1, 2])), RunOptions(progress=False))
    store = ResultStore(tmp_path / "s")
    first = store.read().ordered()[0]
    store.append(dict(first))  # a repeat (two runs of one cell): no conflict
    assert store.read().conflicts == []
    store.append({**first, "metrics": {**first["metrics"], "value": 999}})
    with caplog.at_level("WARNING", logger="tta_norm.bench"):
        assert store.read().conflicts == [first["key"]]
    assert "hold ok records with different results" in caplog.text
    _, conflicts, _ = merge_dirs([tmp_path / "s"], tmp_path / "m")
    assert conflicts == [first["key"]]


def test_merge_combines_stores_and_reports_conflicts(tmp_path):
    vals = [1, 2, 3, 4, 5]
    for k in (1, 2):
        run_grid(ToyJob(ToyConfig(output=str(tmp_path / f"s{k}"), values=vals)),
                 RunOptions(shard=(k, 2), progress=False))  # fmt: skip
    n, conflicts, _ = merge_dirs([tmp_path / "s1", tmp_path / "s2"], tmp_path / "m")
    assert n == 5 and conflicts == []
    merged = ResultStore(tmp_path / "m").read().ordered()
    assert [r["metrics"]["value"] for r in merged] == vals
    with pytest.raises(ConfigError, match="already holds results"):
        merge_dirs([tmp_path / "s1"], tmp_path / "m")
    # a store whose record for the same key disagrees is a conflict; the first directory's record is kept
    bad = tmp_path / "bad"
    rec = dict(merged[0])
    rec["metrics"] = {**rec["metrics"], "value": 999}
    ResultStore(bad).append(rec)
    n, conflicts, _ = merge_dirs([tmp_path / "m", bad], tmp_path / "m2")
    assert conflicts == [rec["key"]]
    assert ResultStore(tmp_path / "m2").read().records[rec["key"]]["metrics"]["value"] == 1
    # records of another grid kind are refused before anything is written
    other = tmp_path / "other"
    ResultStore(other).append({**rec, "key": "other-kind", "kind": "other"})
    with pytest.raises(ConfigError, match="several grid kinds"):
        merge_dirs([tmp_path / "m", other], tmp_path / "m3")
    assert not ResultStore(tmp_path / "m3").exists()
    with pytest.raises(ConfigError, match="several grid kinds"):  # --overwrite: refused before clearing
        merge_dirs([tmp_path / "m2", other], tmp_path / "m", overwrite=True)
    assert len(ResultStore(tmp_path / "m").read().records) == 5


def test_merging_into_one_of_the_inputs_with_overwrite_is_all_or_nothing(tmp_path, monkeypatch):
    from tta_norm.bench import store as store_mod

    for k in (1, 2):
        run_grid(ToyJob(ToyConfig(output=str(tmp_path / f"s{k}"))), RunOptions(shard=(k, 2), progress=False))
    before = (tmp_path / "s1" / "results.jsonl").read_bytes()
    real_write = store_mod.atomic_write

    def full_disk(path, text):
        if path.name == "results.jsonl":
            raise OSError(28, "No space left on device")
        real_write(path, text)

    monkeypatch.setattr(store_mod, "atomic_write", full_disk)
    with pytest.raises(OSError, match="No space"):
        merge_dirs([tmp_path / "s1", tmp_path / "s2"], tmp_path / "s1", overwrite=True)
    assert (tmp_path / "s1" / "results.jsonl").read_bytes() == before  # nothing lost
    monkeypatch.setattr(store_mod, "atomic_write", real_write)
    n, conflicts, _ = merge_dirs([tmp_path / "s1", tmp_path / "s2"], tmp_path / "s1", overwrite=True)
    assert (n, conflicts) == (4, []) and len(lines(tmp_path / "s1")) == 4


def test_provenance_and_log_file(tmp_path):
    out = tmp_path / "run"
    run_grid(ToyJob(ToyConfig(output=str(out))), RunOptions(progress=False))
    prov = json.loads((out / "provenance.json").read_text())["runs"]
    assert len(prov) == 1
    run = prov[0]
    assert run["status"] == "finished" and run["ran"] == 4 and run["config"]["scale"] == 1
    assert run["started"] and run["ended"] and run["env"]["torch"] and run["device"].startswith("cpu")
    assert "git" in run
    assert "toy toy: 4 cells" in (out / "log.txt").read_text()


def test_tensorboard_tracker_writes_scalars_per_cell(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    run_grid(ToyJob(ToyConfig(output=str(out), trackers=["tensorboard"])), RunOptions(progress=False))
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["value/v1", "value/v2", "value/v3", "value/v4"]
    assert acc.Scalars("value/v3")[0].value == 3.0


def test_progress_bar_only_on_a_terminal(tmp_path, capsys):
    run_grid(ToyJob(ToyConfig(output=str(tmp_path / "run"))), RunOptions())  # stderr is not a terminal here
    assert "\r" not in capsys.readouterr().err


class _WarmCheckJob(ToyJob):
    def warm_up(self, state, device):
        state["warm"] = True

    def run_cell(self, cell, state, device, progress):
        assert state.get("warm"), "warm_up must run before the cell"
        return super().run_cell(cell, state, device, progress)


def test_warm_up_runs_before_the_timed_cell(tmp_path):
    outcome = run_grid(_WarmCheckJob(ToyConfig(output=str(tmp_path / "run"))), RunOptions(progress=False))
    assert outcome.failed == 0


def test_command_exit_status_counts_failures_and_user_errors(tmp_path, capsys):
    import argparse

    from tta_norm.cli.grid import GridCommand, add_grid_arguments, run_grid_command

    parser = argparse.ArgumentParser()
    add_grid_arguments(parser, "toy", "a toy grid")
    command = GridCommand("toy", dict, lambda name, overrides: ToyConfig(output=str(tmp_path / "r"), fail=[2]), ToyJob)
    assert run_grid_command(parser.parse_args([]), command) == 1
    assert "4 cells: 0 reused, 4 run, 1 failed" in capsys.readouterr().out
    assert run_grid_command(parser.parse_args([]), command) == 2  # results exist: --resume or --overwrite
    assert "--resume" in capsys.readouterr().err
    assert run_grid_command(parser.parse_args(["--resume"]), command) == 1  # the failing cell is retried, fails again
    assert "3 reused, 1 run, 1 failed" in capsys.readouterr().out


class _MissingModelJob(ToyJob):
    def prepare(self, device):
        raise ConfigError("model: no checkpoint for toy")


def test_a_user_error_leaves_the_directory_untouched_even_with_overwrite(tmp_path):
    out = tmp_path / "run"
    run_grid(ToyJob(ToyConfig(output=str(out))), RunOptions(progress=False))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(ConfigError, match="no checkpoint"):
        run_grid(_MissingModelJob(ToyConfig(output=str(out))), RunOptions(overwrite=True, progress=False))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    with pytest.raises(ConfigError, match="no checkpoint"):
        run_grid(_MissingModelJob(ToyConfig(output=str(tmp_path / "new"))), RunOptions(progress=False))
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(("missing", "extra", "options", "message"), [
    ("torch.utils.tensorboard", {"trackers": ["tensorboard"]}, {}, "tensorboard needs the tensorboard package"),
    ("ray", {}, {"executor": "ray"}, "--executor ray needs the ray package"),
])  # fmt: skip
def test_a_missing_optional_package_is_found_before_overwrite_clears_anything(
    tmp_path, monkeypatch, missing, extra, options, message
):
    import sys

    out = tmp_path / "run"
    run_grid(ToyJob(ToyConfig(output=str(out))), RunOptions(progress=False))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    monkeypatch.setitem(sys.modules, missing, None)  # importing it now raises ImportError
    with pytest.raises(ConfigError, match=message):
        run_grid(ToyJob(ToyConfig(output=str(out), **extra)), RunOptions(overwrite=True, progress=False, **options))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_merge_counts_a_cell_two_overlapping_grids_miss_once(tmp_path, caplog):
    """Run B's grid is run A's plus one cell; each stored one shard: the two cells both miss are 2 missing
    of 4 planned (they were counted once per grid: 4 of 6)."""
    run_grid(ToyJob(ToyConfig(output=str(tmp_path / "a"), values=[1, 2, 3])), RunOptions(shard=(1, 3), progress=False))
    run_grid(ToyJob(ToyConfig(output=str(tmp_path / "b"), values=[1, 2, 3, 4])),
             RunOptions(shard=(4, 4), progress=False))  # fmt: skip
    with caplog.at_level("WARNING"):
        merge_dirs([tmp_path / "a", tmp_path / "b"], tmp_path / "m")
    assert "merge: 2 cell(s) of the merged runs' grids have no record" in caplog.text


def test_merging_different_grids_keeps_their_reports_apart(tmp_path):
    from tta_norm.bench.merge import write_outputs
    from tta_norm.bench.store import ResultStore

    from .tinybench import bench_config, fake_benchmark, tiny_model

    def bench_run(out, seed):
        from tta_norm.bench.runner import BenchJob

        cfg = bench_config(str(out), methods=["source"], seeds=[0])
        return run_grid(BenchJob(cfg, model=tiny_model(seed), bench=fake_benchmark()), RunOptions(progress=False))

    a, b = bench_run(tmp_path / "a", 0), bench_run(tmp_path / "b", 1)
    n, conflicts, report = merge_dirs([a.out, b.out], tmp_path / "m")
    assert n == 2 and conflicts == []
    text = report.read_text()
    assert "2 records of 2 grids" in text
    subs = sorted((tmp_path / "m" / "grids").iterdir())
    assert len(subs) == 2 and all((s / "report.md").is_file() and (s / "results.csv").is_file() for s in subs)
    assert write_outputs(tmp_path / "m", ResultStore(a.out).read().ordered()).name == "report.md"
    # --overwrite with one grid's records: the other grids' reports are not left beside the new one
    merge_dirs([a.out], tmp_path / "m", overwrite=True)
    assert not (tmp_path / "m" / "grids").exists() and "2 grids" not in (tmp_path / "m" / "report.md").read_text()


def test_progress_is_logged_when_stderr_is_a_file(caplog):
    from tta_norm.bench.executors import LogProgress, progress_bar

    assert isinstance(progress_bar(4, None, "bench"), LogProgress)  # stderr is not a terminal here
    now = [0.0]
    bar = LogProgress(10, "attack", interval=60.0, clock=lambda: now[0])
    bar.set_postfix_str("medbn targeted")
    with caplog.at_level("INFO", logger="tta_norm.bench"), bar:
        now[0] = 30.0
        bar.update(2)  # within the interval: quiet
        now[0] = 120.0
        bar.update(2)  # 4 of 10 after 2 minutes: 3 minutes left
        now[0] = 150.0
        bar.update(1)  # quiet again
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["attack: 4/10 work units (40 %), 2.0 min elapsed, about 3 min left; at medbn targeted"]


def test_records_carry_their_code_revision_and_a_mixed_resume_is_loud(tmp_path, caplog, monkeypatch):
    import tta_norm.bench.grid as grid

    out = tmp_path / "run"
    monkeypatch.setattr(grid, "git_revision", lambda: "aaaa")
    first = run_grid(ToyJob(ToyConfig(output=str(out), values=[1, 2])), RunOptions(progress=False))
    assert [r["env"]["git"] for r in first.records] == ["aaaa", "aaaa"]
    caplog.set_level(logging.INFO, logger="tta_norm.bench")
    again = run_grid(ToyJob(ToyConfig(output=str(out), values=[1, 2, 3])), RunOptions(resume=True, progress=False))
    assert again.ran == 1 and "code revisions" not in caplog.text
    monkeypatch.setattr(grid, "git_revision", lambda: "bbbb")
    mixed = run_grid(ToyJob(ToyConfig(output=str(out), values=[1, 2, 3, 4])), RunOptions(resume=True, progress=False))
    assert [r["env"]["git"] for r in mixed.records] == ["aaaa", "aaaa", "aaaa", "bbbb"]
    assert "the 4 records come from 2 code revisions (aaaa, bbbb)" in caplog.text
    assert grid.code_revisions([{"env": {}}, {"env": {"git": "cccc"}}]) == ["unrecorded", "cccc"]


def test_records_lost_during_a_run_and_missing_cells_are_loud(tmp_path, caplog, monkeypatch):
    out = tmp_path / "run"
    job = ToyJob(ToyConfig(output=str(out)))
    real = ToyJob.run_cell

    def cleared_by_another_process(self, cell, state, device, progress):
        if cell.payload == 3:
            ResultStore(out).clear()  # as a concurrent --overwrite of the same directory does
        return real(self, cell, state, device, progress)

    monkeypatch.setattr(ToyJob, "run_cell", cleared_by_another_process)
    caplog.set_level(logging.INFO, logger="tta_norm.bench")
    outcome = run_grid(job, RunOptions(progress=False))
    assert outcome.exit_status == 1 and outcome.failed == 2  # cells 1 and 2 ran, then were deleted
    assert "2 of this run's cells have no record" in caplog.text
    assert (out / "report.md").read_text().splitlines()[-1] == "missing 2"
    monkeypatch.undo()
    part = run_grid(ToyJob(ToyConfig(output=str(tmp_path / "shard"))), RunOptions(shard=(1, 2), progress=False))
    assert part.exit_status == 0  # the other shard's cells are missing from the report, not lost
    assert (tmp_path / "shard" / "report.md").read_text().splitlines()[-1] == "missing 2"


def test_parseable_but_malformed_records_are_skipped_loudly_and_rerun(tmp_path, caplog):
    out = tmp_path / "run"
    run_grid(ToyJob(ToyConfig(output=str(out))), RunOptions(progress=False))
    good = [json.loads(x) for x in lines(out)]
    damaged = [
        {**good[0], "metrics": None},
        {k: v for k, v in good[1].items() if k != "cell"},
        {"key": 123, "status": "ok"},
        {**good[2], "metrics": {**good[2]["metrics"], "error": 7.5}},
        {**good[3], "metrics": {**good[3]["metrics"], "per_domain": {"fog@5": "abc"}}},
    ]
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in damaged))
    caplog.set_level(logging.WARNING, logger="tta_norm.bench")
    again = run_grid(ToyJob(ToyConfig(output=str(out))), RunOptions(resume=True, progress=False))
    assert (again.reused, again.ran, again.failed) == (0, 4, 0)
    assert all(f"line {i} is not a valid record" in caplog.text for i in range(1, 5))
    assert "the last line is not a valid record" in caplog.text and "error = 7.5 is not a fraction" in caplog.text


def test_a_cell_whose_plan_fails_fails_alone(tmp_path, monkeypatch):
    real = ToyJob.work

    def work(self, cell, state):
        if cell.payload == 2:
            raise ValueError("could not build a stream for this cell")  # as an infeasible Dirichlet order
        return real(self, cell, state)

    monkeypatch.setattr(ToyJob, "work", work)
    outcome = run_grid(ToyJob(ToyConfig(output=str(tmp_path / "run"), fail=[2])), RunOptions(progress=False))
    assert (outcome.ran, outcome.failed) == (4, 1)
    assert values(outcome) == {1: 1, 3: 3, 4: 4}


def test_two_different_uncommitted_edits_are_two_code_revisions(tmp_path):
    import subprocess

    from tta_norm.bench.grid import checkout_revision

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                       check=True, capture_output=True)  # fmt: skip

    assert checkout_revision(tmp_path) is None  # not a checkout
    git("init", "-q")
    (tmp_path / "m.py").write_text("MOMENTUM = 0.1\n")
    git("add", "m.py")
    git("commit", "-qm", "init")
    clean = checkout_revision(tmp_path)
    assert clean is not None and len(clean) == 40
    (tmp_path / "m.py").write_text("MOMENTUM = 0.2\n")
    first = checkout_revision(tmp_path)
    (tmp_path / "m.py").write_text("MOMENTUM = 0.3\n")
    second = checkout_revision(tmp_path)
    assert first.startswith(clean + "-dirty-") and second.startswith(clean + "-dirty-") and first != second
    (tmp_path / "m.py").write_text("MOMENTUM = 0.2\n")
    assert checkout_revision(tmp_path) == first


def test_merge_refuses_grid_options_and_a_file_as_output(tmp_path, capsys):
    """`bench merge ... --dry-run` merged and wrote its output (the option was ignored, as -s, --shard...);
    an output path that is a file was a traceback."""
    from tta_norm.cli import main

    run_grid(ToyJob(ToyConfig(output=str(tmp_path / "a"), values=[1, 2])), RunOptions(progress=False))
    for extra in (["--dry-run"], ["-s", "n_examples=5"], ["--shard", "1/2"], ["--executor", "ray"]):
        assert main(["bench", "merge", str(tmp_path / "a"), "-o", str(tmp_path / "m"), *extra]) == 2
        assert "does not apply to merge" in capsys.readouterr().err.replace("do(es)", "does")
    assert not (tmp_path / "m").exists()
    (tmp_path / "afile").write_text("x")
    assert main(["bench", "merge", str(tmp_path / "a"), "-o", str(tmp_path / "afile")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tta-norm bench merge:") and len(err.strip().splitlines()) == 1


def test_an_output_that_is_a_file_is_a_config_error_also_in_a_dry_run(tmp_path, capsys):
    """It was a FileExistsError traceback with exit status 1 (the "some cells failed" status) after the model
    and data were loaded, and a dry run said "config ok"."""
    from tta_norm.cli import main

    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        run_grid(ToyJob(ToyConfig(output=str(afile))), RunOptions(progress=False))
    assert main(["bench", "quick", "-o", str(afile), "--dry-run"]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    assert afile.read_text() == "x"


def test_merge_checks_its_output_first_and_says_what_is_wrong_in_one_line(tmp_path):
    """An output that is a file came through as "[Errno 17] File exists" after the inputs were read."""
    run_grid(ToyJob(ToyConfig(output=str(tmp_path / "s"), values=[1, 2])), RunOptions(progress=False))
    (tmp_path / "afile").write_text("x")
    for out, match in ((tmp_path / "afile", "is a file, not a directory"),
                       (tmp_path / "afile" / "m", "cannot write into"),
                       (tmp_path / "s" / "results.jsonl", "is a file, not a directory")):  # fmt: skip
        with pytest.raises(ConfigError, match=match):
            merge_dirs([tmp_path / "s"], out)
    with pytest.raises(ConfigError, match="^.*nowhere has no results.jsonl and no provenance.json"):
        merge_dirs([tmp_path / "nowhere"], tmp_path / "m")


def test_a_shard_without_cells_merges_as_an_empty_run(tmp_path):
    """Shard 3/3 of a 2-cell grid ran nothing and stored nothing; merging all three shards was refused."""
    for k in (1, 2, 3):
        run_grid(ToyJob(ToyConfig(output=str(tmp_path / f"s{k}"), values=[1, 2])), RunOptions(shard=(k, 3),
                 progress=False))  # fmt: skip
    n, conflicts, _ = merge_dirs([tmp_path / f"s{k}" for k in (1, 2, 3)], tmp_path / "m")
    assert (n, conflicts) == (2, [])
