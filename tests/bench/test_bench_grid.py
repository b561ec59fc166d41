"""The bench grid on the engine: shards merged equal a serial run, keys follow model and data content."""

from __future__ import annotations

import pytest
import torch

from tta_norm.bench.engine import RunOptions, run_grid
from tta_norm.bench.merge import comparable, merge_dirs
from tta_norm.bench.runner import BenchJob
from tta_norm.bench.store import ResultStore

from .tinybench import bench_config, fake_benchmark, tiny_model


def _job(out, model=None, bench=None):
    return BenchJob(bench_config(str(out)), model=model or tiny_model(), bench=bench or fake_benchmark())


def test_shards_merged_equal_a_serial_run_record_for_record(tmp_path):
    serial = run_grid(_job(tmp_path / "serial"), RunOptions(progress=False))
    assert serial.cells == 6 and serial.failed == 0
    for k in (1, 2):
        part = run_grid(_job(tmp_path / f"shard{k}"), RunOptions(shard=(k, 2), progress=False))
        assert part.cells == 3
    n, conflicts, report = merge_dirs([tmp_path / f"shard{k}" for k in (1, 2)], tmp_path / "merged")
    assert (n, conflicts) == (6, []) and report is not None and report.is_file()
    merged = ResultStore(tmp_path / "merged").read().ordered()
    assert [comparable(r) for r in merged] == [comparable(r) for r in serial.records]
    assert [r["metrics"]["per_domain"] for r in merged] == [r["metrics"]["per_domain"] for r in serial.records]
    # the merged CSV and report are the serial ones (timing columns aside)
    assert (tmp_path / "merged" / "results.csv").read_text().count("\n") == 7


def test_shards_overwriting_a_shared_directory_keep_each_others_records(tmp_path):
    """Every shard of a job array launched with --overwrite into one directory cleared the whole store: the last
    shard's records were all that was left (exit 0, no warning)."""
    serial = run_grid(_job(tmp_path / "serial"), RunOptions(progress=False))
    shared = tmp_path / "shared"
    ResultStore(shared).append({"key": "stale", "status": "ok", "cell": {}})  # a record of another grid
    for _ in range(2):  # launched, then launched again (its cells rerun)
        for k in (1, 2):
            assert run_grid(_job(shared), RunOptions(shard=(k, 2), overwrite=True, progress=False)).cells == 3
    kept = ResultStore(shared).read().ordered()
    assert sorted(comparable(r) for r in kept) == sorted(comparable(r) for r in serial.records)
    assert len((shared / "results.jsonl").read_text().splitlines()) == 6  # no stale record, no duplicate


def test_a_record_without_the_fields_the_tables_read_is_skipped_not_a_crash(tmp_path):
    """An ok record without metrics.error or cell.method was reused as a result, and the report or a merge then
    failed with a KeyError traceback (a merge after writing its output)."""
    from tta_norm.bench.store import malformed

    run = run_grid(_job(tmp_path / "run"), RunOptions(progress=False))
    good = run.records[0]
    broken = [
        {**good, "key": "no-error", "metrics": {k: v for k, v in good["metrics"].items() if k != "error"}},
        {**good, "key": "no-method", "cell": {k: v for k, v in good["cell"].items() if k != "method"}},
        {"key": "zz", "kind": "bench", "status": "ok", "cell": {}, "metrics": {}},
        {**good, "key": "no-kind", "kind": None},
    ]
    assert [malformed(r) is not None for r in broken] == [True] * 4 and malformed(good) is None
    for rec in broken:
        ResultStore(tmp_path / "run").append(rec)
    n, conflicts, report = merge_dirs([tmp_path / "run"], tmp_path / "merged")
    assert (n, conflicts) == (len(run.records), []) and report is not None and report.is_file()
    again = run_grid(_job(tmp_path / "run"), RunOptions(resume=True, progress=False))
    assert (again.reused, again.ran) == (len(run.records), 0)


def test_keys_change_with_weights_and_data_content(tmp_path):
    base = _job(tmp_path / "a")
    state = base.prepare("cpu")
    cell = base.cells()[0]
    key = cell.key("bench", base.identity(state))
    other_weights = _job(tmp_path / "b", model=tiny_model(seed=1))
    other_data = _job(tmp_path / "c", bench=fake_benchmark(seed=1))
    same = _job(tmp_path / "d")
    assert cell.key("bench", other_weights.identity(other_weights.prepare("cpu"))) != key
    assert cell.key("bench", other_data.identity(other_data.prepare("cpu"))) != key
    assert cell.key("bench", same.identity(same.prepare("cpu"))) == key
    ident = base.identity(state)
    assert set(ident) == {"model", "data", "params", "version"}
    assert ident["params"]["corruptions"] == ["fog", "gaussian_noise"] and "n_examples" in ident["params"]
    assert len(ident["data"]["domains"]) == 2 and ident["model"]["weights_sha256"]


def test_every_config_key_is_in_the_cell_key_or_declared_result_neutral(tmp_path, monkeypatch):
    import dataclasses

    import tta_norm.bench.runner as runner

    monkeypatch.setattr(runner, "check_model_outputs", lambda *a, **k: None)  # one model under every dataset

    from tta_norm.bench.config import BenchConfig
    from tta_norm.bench.runner import BENCH_PARAMS

    axes = {"methods", "settings", "orders", "deltas", "batch_sizes", "seeds"}
    # keyed by the weights' and the images' content (the domains are named corruption@severity)
    content = {"model", "checkpoint", "weights", "random_init", "data_dir", "severities"}
    neutral = {"name", "device", "output", "plots", "resources", "trackers"}
    assert {f.name for f in dataclasses.fields(BenchConfig)} == axes | set(BENCH_PARAMS) | content | neutral
    model, bench = tiny_model(), fake_benchmark()

    def key(output=str(tmp_path), **change):
        job = BenchJob(bench_config(output, **change), model=model, bench=bench)
        return job.cells()[0].key(job.kind, job.identity(job.prepare("cpu")))

    base = key()
    changes = [{"dataset": "cifar100"}, {"source": "regenerate"}, {"corruptions": ["fog"]}, {"n_examples": 12},
               {"clean_interleaved": True}, {"data_seed": 1}, {"on_bad_batch": "raise"}]  # fmt: skip
    assert {next(iter(c)) for c in changes} | {"imagenet_ids"} == set(BENCH_PARAMS)
    for change in changes:
        assert key(**change) != base, change
    assert key(dataset="imagenet", imagenet_ids="ids.txt") != key(dataset="imagenet")
    for change in ({"output": str(tmp_path / "elsewhere")}, {"plots": True}, {"device": "auto"}, {"name": "other"}):
        assert key(**change) == base, change


def test_files_and_source_data_an_entry_reads_are_in_its_cells_keys(tmp_path):
    import pytest
    import torch

    import tta_norm
    from tests.data.test_data import _write_png_tree
    from tta_norm.bench.validate import ConfigError

    model, bench = tiny_model(), fake_benchmark()
    state_file = tmp_path / "ttn_state.pt"
    with pytest.warns(UserWarning, match="without init_state"):
        fitted = tta_norm.adapt(model, "ttn").model.state_dict()
    torch.save(fitted, state_file)
    for name, seed in (("a", 0), ("b", 1)):  # two source data directories with different training images
        _write_png_tree(tmp_path / name / "cifar10-jpeg" / "train", ["cat", "dog"], 4, size=(8, 8), seed=seed)
        _write_png_tree(tmp_path / name / "cifar10-jpeg" / "test", ["cat", "dog"], 2, size=(8, 8))
    methods = ["tbn", {"preset": "ttn", "kwargs": {"init_state": str(state_file)}},
               {"preset": "tbn", "method": "eata", "kwargs": {"fisher_samples": 4}}]  # fmt: skip

    def keys(data_dir):
        job = BenchJob(bench_config(str(tmp_path / "out"), methods=methods, data_dir=str(tmp_path / data_dir)),
                       model=model, bench=bench)  # fmt: skip
        identity = job.identity(job.prepare("cpu"))
        return {c.payload.entry.preset + (c.payload.entry.method or ""): job.cell_key(c, identity)
                for c in job.cells() if c.payload.seed == 0}  # fmt: skip

    base = keys("a")
    assert set(base) == {"tbn", "ttn", "tbneata"}
    assert keys("a") == base  # fingerprints are stable
    other_source = keys("b")  # other Fisher images: only the EATA entry's cells change
    assert other_source["tbneata"] != base["tbneata"] and other_source["ttn"] == base["ttn"]
    assert other_source["tbn"] == base["tbn"]  # an entry without inputs keeps its key (stored runs stay valid)
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in fitted.items()}, state_file)
    changed = keys("a")  # the same path, other contents: only the ttn entry's cells change
    assert changed["ttn"] != base["ttn"] and changed["tbneata"] == base["tbneata"]
    state_file.unlink()  # a config may name a file a previous step writes: a missing one stops the run at its start
    with pytest.raises(ConfigError, match="init_state file not found"):
        keys("a")


def test_shards_of_a_grid_with_entry_inputs_merge_into_one_report(tmp_path):
    import torch

    import tta_norm

    state_file = tmp_path / "ttn_state.pt"
    torch.save(tta_norm.adapt(tiny_model(), "source").model.state_dict(), state_file)
    methods = ["tbn", {"preset": "source", "kwargs": {"init_state": str(state_file)}, "name": "fitted"}]
    for k in (1, 2):
        job = BenchJob(bench_config(str(tmp_path / f"s{k}"), methods=methods, seeds=[0]), model=tiny_model(),
                       bench=fake_benchmark())  # fmt: skip
        run_grid(job, RunOptions(shard=(k, 2), progress=False))
    n, conflicts, report = merge_dirs([tmp_path / "s1", tmp_path / "s2"], tmp_path / "merged")
    assert (n, conflicts) == (2, []) and (tmp_path / "merged" / "results.csv").is_file()
    assert not (tmp_path / "merged" / "grids").exists()  # one grid: its entries' own inputs do not split it

    # the same entry run on other contents of its init_state file: kept apart, never averaged as seeds
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in torch.load(state_file).items()}, state_file)
    job = BenchJob(bench_config(str(tmp_path / "s3"), methods=methods, seeds=[0]), model=tiny_model(),
                   bench=fake_benchmark())  # fmt: skip
    run_grid(job, RunOptions(shard=(2, 2), progress=False))
    merge_dirs([tmp_path / "s1", tmp_path / "s2", tmp_path / "s3"], tmp_path / "merged2")
    report = (tmp_path / "merged2" / "report.md").read_text()
    assert "3 records of 3 grids" in report and report.count("entry inputs") == 2


def test_a_bench_grid_steps_each_batch_size_with_its_paper_lr(tmp_path, monkeypatch) -> None:
    import tta_norm
    from tta_norm.bench import runner
    from tta_norm.methods.base import paper_sgd_lr

    seen = []
    real = tta_norm.adapt

    def spy(model, preset, method=None, **kwargs):
        tta = real(model, preset, method, **kwargs)
        if preset == "tbn":  # not the config check's probe (preset source)
            seen.append((tta.method.optimizer.param_groups[0]["lr"], kwargs["lr"]))
        return tta

    methods = [{"preset": "tbn", "method": "tent", "kwargs": {"optimizer": "sgd", "lr": "paper"}}]
    cfg = bench_config(str(tmp_path / "out"), methods=methods, batch_sizes=[4, 12], seeds=[0])
    monkeypatch.setattr(runner.tta_norm, "adapt", spy)
    outcome = run_grid(runner.BenchJob(cfg, model=tiny_model(), bench=fake_benchmark()), RunOptions(progress=False))
    assert outcome.failed == 0
    assert {lr for lr, _ in seen} == {paper_sgd_lr(4), paper_sgd_lr(12)} and len(seen) == outcome.cells
    assert all(lr == given for lr, given in seen)


def test_merged_runs_never_average_different_entries_that_share_a_row_name(tmp_path, caplog):
    runs = {}
    for preset in ("tbn", "medbn"):
        cfg = bench_config(str(tmp_path / preset), methods=[{"preset": preset, "name": "mine"}], seeds=[0])
        runs[preset] = run_grid(BenchJob(cfg, model=tiny_model(), bench=fake_benchmark()), RunOptions(progress=False))
    n, conflicts, report = merge_dirs([runs["tbn"].out, runs["medbn"].out], tmp_path / "merged")
    assert (n, conflicts) == (2, [])
    text = report.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| mine")]
    assert rows and all("(tbn #" in line or "(medbn #" in line for line in rows)
    assert any("(tbn #" in line for line in rows) and any("(medbn #" in line for line in rows)
    assert "cover different method entries" in caplog.text
    stored = ResultStore(tmp_path / "merged").read().ordered()
    assert {r["cell"]["method"]["name"] for r in stored} == {"mine"}  # the store keeps the records as they were


def test_merging_a_subset_of_the_shards_says_the_grid_is_incomplete(tmp_path, caplog):
    for k in (1, 2):
        assert run_grid(_job(tmp_path / f"shard{k}"), RunOptions(shard=(k, 2), progress=False)).cells == 3
    _, _, report = merge_dirs([tmp_path / "shard1"], tmp_path / "half")
    assert "**Incomplete:** 3 of the grid's 6 cells" in report.read_text()
    assert "have no record" in caplog.text
    _, _, report = merge_dirs([tmp_path / "shard1", tmp_path / "shard2"], tmp_path / "whole")
    assert "Incomplete" not in report.read_text()


def test_latency_rows_and_failed_cells_name_every_coordinate(tmp_path):
    from tta_norm.bench.report import write_report

    outcome = run_grid(_job(tmp_path / "run"), RunOptions(progress=False))
    text = (outcome.out / "report.md").read_text()
    head = "| method | setting | order | severity | batch | seed |"
    assert head in text
    rows = text.split("### latency per batch")[1].split("\n\n")[1].splitlines()[2:]
    coords = [tuple(row.split("|")[1:7]) for row in rows]
    assert len(coords) == outcome.cells == len(set(coords))  # two seeds of one method are two distinct rows
    failed = dict(outcome.records[0], status="failed", error="boom")
    write_report(tmp_path / "f", [failed], plots=False)
    assert f"seed {failed['cell']['seed']}: boom" in (tmp_path / "f" / "report.md").read_text()


def test_an_init_state_file_is_read_once_so_every_cell_uses_the_fingerprinted_state(tmp_path, monkeypatch):
    import torch

    import tta_norm
    from tta_norm.bench import runner

    path = tmp_path / "state.pt"

    def save_state(seed):
        tta = tta_norm.adapt(tiny_model(), "ema")  # (a state of the bench's model: other affine values per seed)
        for _, layer in tta.norm_layers():
            layer.weight.data.fill_(1.0 + seed)
        torch.save(tta.model.state_dict(), path)

    def job(out):
        cfg = bench_config(str(out), methods=[{"preset": "ema", "kwargs": {"init_state": str(path)}}])
        return BenchJob(cfg, model=tiny_model(), bench=fake_benchmark())

    save_state(1)
    reference = run_grid(job(tmp_path / "ref"), RunOptions(progress=False))
    real_run_cell = runner.run_cell

    def swap_file_after_the_first_cell(*args, **kwargs):
        result = real_run_cell(*args, **kwargs)
        save_state(2)  # another state under the same path, mid-run
        return result

    monkeypatch.setattr(runner, "run_cell", swap_file_after_the_first_cell)
    save_state(1)
    swapped = run_grid(job(tmp_path / "swapped"), RunOptions(progress=False))
    assert swapped.cells == reference.cells == 2 and swapped.failed == 0
    assert [comparable(r) for r in swapped.records] == [comparable(r) for r in reference.records]


def test_a_model_for_another_class_count_fails_every_cell_loudly(tmp_path, monkeypatch):
    import tta_norm.bench.runner as runner

    monkeypatch.setattr(runner, "check_model_outputs", lambda *a, **k: None)  # the cells' own check, behind it
    model = tiny_model()
    model[-1] = torch.nn.Linear(4, 2)  # two outputs; the benchmark's labels go up to 2
    outcome = run_grid(BenchJob(bench_config(str(tmp_path / "run"), methods=["source"], seeds=[0]), model=model,
                                bench=fake_benchmark()), RunOptions(progress=False))  # fmt: skip
    assert outcome.failed == outcome.cells == 1 and outcome.exit_status == 1
    assert "do not fit the model's 2 outputs" in outcome.records[0]["error"]


def test_a_merge_counts_missing_cells_of_its_inputs_only_and_passes_them_on(tmp_path):
    for k in (1, 2):
        run_grid(_job(tmp_path / f"shard{k}"), RunOptions(shard=(k, 2), progress=False))
    other = bench_config(str(tmp_path / "old"), methods=["medbn"], seeds=[0, 1, 2])
    run_grid(BenchJob(other, model=tiny_model(), bench=fake_benchmark()), RunOptions(progress=False))
    # --overwrite into a directory that held another grid: that grid's plan is not counted
    _, _, report = merge_dirs([tmp_path / "shard1", tmp_path / "shard2"], tmp_path / "old", overwrite=True)
    assert "Incomplete" not in report.read_text()
    # a merged directory keeps the plan: merging it on still counts the missing shard
    merge_dirs([tmp_path / "shard1"], tmp_path / "stage")
    _, _, report = merge_dirs([tmp_path / "stage"], tmp_path / "final")
    assert "**Incomplete:** 3 of the grid's 6 cells" in report.read_text()


def test_fisher_images_changed_during_a_run_fail_the_later_cells_loudly(tmp_path, monkeypatch):
    import torch

    from tta_norm.methods import entries

    calls = []

    def images(dataset, n, **kwargs):  # the grid's fingerprint and cell 1 read A; cell 2 reads B
        calls.append(n)
        return torch.full((n, 3, 8, 8), 0.25 if len(calls) <= 2 else 0.75)

    monkeypatch.setattr(entries, "clean_source_images", images)
    methods = [{"preset": "tbn", "method": "eata", "kwargs": {"fisher_samples": 4}}]
    outcome = run_grid(BenchJob(bench_config(str(tmp_path / "run"), methods=methods), model=tiny_model(),
                                bench=fake_benchmark()), RunOptions(progress=False))  # fmt: skip
    assert [r["status"] for r in outcome.records] == ["ok", "failed"]
    assert "Fisher images changed on disk since the run started" in outcome.records[1]["error"]


def test_a_model_of_another_dataset_is_refused_before_any_cell_runs(tmp_path):
    from tta_norm.bench.validate import ConfigError, check_model_outputs
    from tta_norm.data.natural import restrict_outputs

    bench = fake_benchmark()
    for width, dataset in ((10, "cifar100"), (100, "cifar10"), (3, "cifar10")):
        job = BenchJob(bench_config(str(tmp_path / f"w{width}"), dataset=dataset), model=tiny_model(num_classes=width),
                       bench=bench)  # fmt: skip
        with pytest.raises(ConfigError, match=f"model: gives {width} logits per image, dataset {dataset} needs"):
            run_grid(job, RunOptions(progress=False))
        assert not (tmp_path / f"w{width}" / "results.jsonl").exists()
    model = tiny_model(num_classes=100).train()
    check_model_outputs(model, bench, "cifar100", "cpu")
    assert model.training and model[1].training  # modes restored; running statistics untouched by the probe
    assert torch.equal(model[1].num_batches_tracked, torch.tensor(0))
    # ImageNet-R's 200-logit subset needs a 1,000-class network inside it, not a 21k-class one
    with pytest.raises(ConfigError, match="gives 21843 logits per image, dataset imagenet_r needs 1000"):
        check_model_outputs(restrict_outputs(tiny_model(num_classes=21843), "imagenet_r"), bench, "imagenet_r", "cpu")
    check_model_outputs(restrict_outputs(tiny_model(num_classes=1000), "imagenet_r"), bench, "imagenet_r", "cpu")


def test_the_dry_run_checks_what_the_method_entries_read(tmp_path):
    from tta_norm.bench.validate import ConfigError

    def validate(methods, data_dir=None):
        BenchJob(bench_config(str(tmp_path / "out"), methods=methods, data_dir=data_dir), model=tiny_model(),
                 bench=fake_benchmark()).validate()  # fmt: skip

    with pytest.raises(ConfigError, match=r"methods: ttn\(init_state=nope/x.pt\): init_state file not found"):
        validate([{"preset": "ttn", "kwargs": {"init_state": "nope/x.pt"}}])
    (tmp_path / "junk.pt").write_bytes(b"not a state")
    with pytest.raises(ConfigError, match="not a tensor state file"):
        validate([{"preset": "ttn", "kwargs": {"init_state": str(tmp_path / "junk.pt")}}])
    (tmp_path / "empty").mkdir()
    for entry in ({"preset": "tbn", "method": "eata", "kwargs": {"fisher_samples": 4}},
                  {"preset": "ttn", "kwargs": {"ttn_fit": {"n_images": 8}}}):  # fmt: skip
        with pytest.raises(ConfigError, match="source ImageFolder 'cifar10-jpeg'.*not found"):
            validate([entry], data_dir=str(tmp_path / "empty"))
    state = tmp_path / "state.pt"
    torch.save(tiny_model().state_dict(), state)
    validate(["tbn", {"preset": "source", "kwargs": {"init_state": str(state)}}])


def test_cell_labels_are_distinct_within_a_grid(tmp_path):
    cfg = bench_config(str(tmp_path), methods=["tbn"], orders=["iid", "dirichlet"], deltas=[0.01, 0.1],
                       severities=[3, 5], settings=["reset_each_shift", "gradual"])  # fmt: skip
    labels = [c.label for c in BenchJob(cfg, model=tiny_model(), bench=fake_benchmark()).cells()]
    assert len(labels) == len(set(labels)) == (3 * 2 + 3) * 2  # (orders x severities + gradual) x seeds
    assert "tbn reset_each_shift sev3 dirichlet(delta=0.01) b12 s0" in labels
