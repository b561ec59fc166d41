"""The attack grid: config validation, batches, runner on a tiny model and fake benchmark, resume, report, CLI."""

from __future__ import annotations

import argparse
import json
import re
from types import SimpleNamespace

import numpy as np
import pytest

from tta_norm.attacks import bench as ab
from tta_norm.bench.config import ConfigError
from tta_norm.cli import attack as cli
from tta_norm.data.readers import ArrayDataset

from .nets import pool_bn_net


def test_parse_number_and_validation():
    assert ab.parse_number("8/255", "x") == pytest.approx(8 / 255)
    assert ab.parse_number(1, "x") == 1.0
    with pytest.raises(ConfigError):
        ab.parse_number("eight", "x")
    cfg = ab.AttackConfig.from_mapping({"budgets": [1, "8/255"], "fractions": 0.1, "methods": ["tbn", "medbn+tent"]})
    assert cfg.budgets == [1.0, pytest.approx(8 / 255)] and cfg.fractions == [0.1]
    assert len(cfg.cells()) == 2 * 2 * 2  # methods x objectives x budgets
    for bad in ({"objectives": ["sneaky"]}, {"modes": ["forever"]}, {"budgets": [0]}, {"fractions": [1.0]},
                {"fractoins": [0.1]}, {"methods": ["nope"]}, {"batch_sizes": [1]}, {"steps": -1}):  # fmt: skip
        with pytest.raises(ConfigError):
            ab.AttackConfig.from_mapping(bad)


@pytest.mark.parametrize(
    ("bad", "match"),
    [({"stealth_weight": -1}, "stealth_weight"), ({"stealth_weight": float("nan")}, "stealth_weight"),
     ({"step_size": float("inf")}, "step_size"), ({"fractions": [0.001], "batch_sizes": [100]}, "rounds to no"),
     ({"methods": [{"preset": "tbn", "kwargs": {"window": 4}}]}, "window")],
)  # fmt: skip
def test_settings_that_failed_every_cell_are_config_errors(bad, match):
    """A dry run said 'config ok', then every cell failed after loading the model (or a fraction rounding to no
    malicious sample ran as a no-attack cell under the attack's name)."""
    with pytest.raises(ConfigError, match=match):
        ab.AttackConfig.from_mapping({"methods": ["tbn"], **bad})


def test_shipped_configs_load():
    shipped = ab.shipped_attack_configs()
    assert {"attack_quick", "attack_medbn"} <= set(shipped)
    for name in shipped:
        cfg = ab.load_attack_config(name)
        assert cfg.cells()
    cfg = ab.load_attack_config("medbn", ["fractions=[0.05]"])
    assert cfg.fractions == [0.05] and cfg.batch_sizes == [200]


def test_batch_indices_seeded_and_disjoint():
    a = ab.batch_indices(50, 10, 3, seed=1)
    b = ab.batch_indices(50, 10, 3, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert len(np.unique(np.concatenate(a))) == 30
    with pytest.raises(ValueError):
        ab.batch_indices(20, 10, 3, seed=0)


def _fake_bench(n: int = 24, seed: int = 0) -> SimpleNamespace:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 4, 4, 3), dtype=np.uint8)
    labels = rng.integers(0, 4, size=n)
    data = ArrayDataset(images, labels, source="fake")
    return SimpleNamespace(domains={("gaussian_noise", 5): data}, describe=lambda: "fake: 1 domain")


def _tiny_cfg(tmp_path, **extra):
    data = {"methods": ["source", "tbn"], "fractions": [0.25], "batch_sizes": [8], "n_batches": 2, "steps": 3,
            "step_size": 0.05, "output": str(tmp_path / "run"), "device": "cpu", **extra}  # fmt: skip
    return ab.AttackConfig.from_mapping(data)


@pytest.fixture
def patched(monkeypatch):
    import tta_norm.bench.runner as runner
    import tta_norm.data.benchmark as benchmark

    monkeypatch.setattr(runner, "load_source_model", lambda cfg, device: pool_bn_net())
    monkeypatch.setattr(benchmark, "load_corruption_benchmark", lambda *a, **k: _fake_bench())
    monkeypatch.setattr(ab, "check_model_outputs", lambda *a, **k: None)  # a 4-class toy net on "cifar10"


def test_grid_runs_resumes_and_reports(tmp_path, patched):
    cfg = _tiny_cfg(tmp_path, modes=["instant", "cumulative"])
    out = ab.run_attack_grid(cfg, progress=False).out
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == len(cfg.cells()) == 2 * 2 * 2
    assert all(r["status"] == "ok" for r in records)
    for r in records:
        m = r["metrics"]
        assert m["batches"] == 2 and m["num_malicious"] == 2
        if r["cell"]["method"]["preset"] == "source":
            assert m["benign_error_attacked"] == m["benign_error_clean"] and m["changed"] == 0
            if r["cell"]["objective"] == "targeted":
                assert m["attack_success"] == m["target_clean_hit"]
        if r["cell"]["mode"] == "instant":
            assert m["no_attack_error"] == m["benign_error_clean"]
    csv_text = (out / "results.csv").read_text()
    assert csv_text.splitlines()[0].startswith("key,status,method") and len(csv_text.splitlines()) == 9
    report = (out / "report.md").read_text()
    assert "targeted attack success rate" in report and "| tbn |" in report
    assert (out / "plots").is_dir() and list((out / "plots").glob("*.png"))
    # resume: nothing re-runs (a stored record keeps its timing)
    before = (out / "results.jsonl").read_text()
    ab.run_attack_grid(cfg, resume=True, progress=False)
    assert (out / "results.jsonl").read_text() == before


def test_batches_per_objective(tmp_path, patched):
    cfg = _tiny_cfg(tmp_path, methods=["tbn"], n_batches={"targeted": 3, "indiscriminate": 1})
    out = ab.run_attack_grid(cfg, progress=False).out
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    batches = {r["cell"]["objective"]: r["metrics"]["batches"] for r in records}
    assert batches == {"targeted": 3, "indiscriminate": 1}
    assert {r["cell"]["objective"]: r["metrics"]["attacks"] for r in records} == {"targeted": 3, "indiscriminate": 0}
    assert "3 (targeted) / 1 (indiscriminate) batches per domain" in (out / "report.md").read_text()


@pytest.mark.parametrize(
    ("n_batches", "message"),
    [
        ({"targeted": 2}, "no count for objective(s) ['indiscriminate']"),
        ({"targeted": 2, "indiscriminate": True}, "n_batches.indiscriminate: expected an integer"),
        ({"targeted": 2, "indiscriminate": 1, "sneaky": 1}, "n_batches: must be one of"),
        (0, "n_batches: must be >= 1"),
    ],
)
def test_bad_batch_counts_are_refused(tmp_path, n_batches, message):
    with pytest.raises(ab.ConfigError, match=re.escape(message)):
        _tiny_cfg(tmp_path, n_batches=n_batches)


def test_batch_size_table(tmp_path, patched):
    cfg = _tiny_cfg(tmp_path, batch_sizes=[4, 8], objectives=["indiscriminate"], methods=["tbn"], n_batches=1)
    out = ab.run_attack_grid(cfg, progress=False).out
    report = (out / "report.md").read_text()
    assert "vs batch size" in report and "| tbn | " in report and "b4 | b8" in report


def test_cli_dry_run_and_bad_config(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    assert cli.run(parser.parse_args(["attack_quick", "--dry-run"])) == 0
    assert "cells" in capsys.readouterr().out
    assert cli.run(parser.parse_args(["attack_quick", "--dry-run", "-s", "objectives=[sneaky]"])) == 2
    assert cli.run(parser.parse_args(["no_such_config", "--dry-run"])) == 2
    assert cli.run(parser.parse_args(["--list-configs"])) == 0
    assert "attack_medbn" in capsys.readouterr().out


def test_report_gives_denominators_wilson_intervals_and_steps(tmp_path, patched):
    from tta_norm.metrics.functional import wilson_interval

    cfg = _tiny_cfg(tmp_path, methods=["tbn"], seeds=[0, 1], init="random")
    outcome = ab.run_attack_grid(cfg, progress=False)
    records = outcome.records
    targeted = [r for r in records if r["cell"]["objective"] == "targeted"]
    counts = ab.pooled_counts(targeted)
    assert counts["attacks"] == 2 * 2  # 2 batches of one domain x 2 random starts, pooled
    assert counts["samples"] == 2 * 2 * (8 - 2)
    for r in targeted:
        m = r["metrics"]
        assert m["attacks"] == 2 and m["successes"] == round(m["attack_success"] * 2)
    report = (outcome.out / "report.md").read_text()
    lo, hi = wilson_interval(counts["successes"], counts["attacks"])
    assert f"[{100 * lo:.1f}-{100 * hi:.1f}] n=4" in report
    assert "steps" in report and "95 % Wilson interval" in report
    ind = ab.pooled_counts([r for r in records if r["cell"]["objective"] == "indiscriminate"])
    assert ab.rate_text(ind["errors_attacked"], ind["samples"]) + " (4 attacks)" in report
    head = (outcome.out / "results.csv").read_text().splitlines()[0].split(",")
    assert {"attacks", "attack_success_lo", "attack_success_hi", "mean_steps_to_success", "benign_samples"} <= set(head)


def test_seeds_that_repeat_a_deterministic_attack_count_once(tmp_path, patched):
    """With a grey start the seeds changed nothing, yet the report pooled them as separate attacks (n=6 and an
    interval of [61-100] for 2 attacks)."""
    with pytest.raises(ConfigError, match="seeds.*repeat the same attacks.*init: random"):
        _tiny_cfg(tmp_path, methods=["tbn"], seeds=[0, 1, 2])
    records = ab.run_attack_grid(_tiny_cfg(tmp_path, methods=["tbn"]), progress=False).records
    replicated = [{**r, "cell": {**r["cell"], "seed": seed}} for r in records for seed in (2, 0, 1)]  # (merged runs)
    for objective in ("targeted", "indiscriminate"):
        mine = [r for r in records if r["cell"]["objective"] == objective]
        assert ab.pooled_counts([r for r in replicated if r["cell"]["objective"] == objective]) == ab.pooled_counts(
            mine
        )
    random_start = [{**r, "identity": {**r["identity"], "params": {**r["identity"]["params"], "init": "random"}}}
                    for r in replicated if r["cell"]["objective"] == "targeted"]  # fmt: skip
    assert ab.pooled_counts(random_start)["attacks"] == 3 * 2


def test_rate_text_and_counts_from_batches():
    rec = {"cell": {"batch_size": 10}, "metrics": {"per_batch": [
        {"num_malicious": 2, "benign_error_attacked": 0.5, "no_attack_error": 0.25, "target_success": True,
         "target_clean_hit": False, "steps": 7},
        {"num_malicious": 2, "benign_error_attacked": 0.125, "no_attack_error": 0.25, "target_success": False,
         "target_clean_hit": False, "steps": 20},
    ]}}  # fmt: skip
    c = ab.attack_counts(rec)
    assert (c["attacks"], c["successes"], c["success_steps"], c["samples"], c["errors_attacked"]) == (2, 1, [7], 16, 5)
    assert ab.rate_text(1, 2) == "50.0 [9.5-90.5] n=2"
    assert ab.rate_text(0, 0) == "-"


def _no_attack_record(fraction: float, errors: list[int], seed: int = 0, bs: int = 10) -> dict:
    m = round(fraction * bs)
    rows = [{"domain": "fog@5", "batch": i, "num_malicious": m, "no_attack_error": e / (bs - m)}
            for i, e in enumerate(errors)]  # fmt: skip
    return {"cell": {"batch_size": bs, "fraction": fraction, "seed": seed}, "metrics": {"per_batch": rows}}


def test_no_attack_error_counts_each_image_once():
    # two batches of 10; without attack the first 9 (f=0.1) or 8 (f=0.2) benign samples are predicted alike
    records = [_no_attack_record(0.1, [3, 1]), _no_attack_record(0.2, [2, 1]), _no_attack_record(0.1, [3, 1], seed=1)]
    assert ab.no_attack_counts(records) == (4, 18)  # the largest benign set of each batch, once over seeds
    assert ab.no_attack_counts(records[1:2]) == (3, 16)
    two_sizes = [_no_attack_record(0.1, [3]), _no_attack_record(0.1, [5], bs=20)]
    assert ab.no_attack_counts(two_sizes) == (8, 27)  # different batch sizes are different batches


def test_report_no_attack_column_counts_distinct_images(tmp_path, patched):
    cfg = _tiny_cfg(tmp_path, methods=["tbn"], fractions=[0.125, 0.25], seeds=[0, 1], init="random",
                    objectives=["targeted"])  # fmt: skip
    outcome = ab.run_attack_grid(cfg, progress=False)
    errors, samples = ab.no_attack_counts(outcome.records)
    assert samples == 2 * (8 - 1)  # 2 batches of the one domain, on the benign set of the smaller fraction
    assert f"| tbn | {ab.rate_text(errors, samples)} |" in (outcome.out / "report.md").read_text()


def test_entries_with_fitted_ttn_and_fisher_run_as_in_the_bench(tmp_path, patched, monkeypatch):
    import torch

    from tta_norm.fitting import _data
    from tta_norm.methods import entries

    def rng():  # the same "files" at every read
        return np.random.default_rng(0)

    monkeypatch.setenv("TTA_NORM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(_data, "load_source_split", lambda *a, **k: (
        rng().integers(0, 256, (16, 4, 4, 3), dtype=np.uint8), rng().integers(0, 4, 16)))  # fmt: skip
    fisher_images = torch.from_numpy(rng().random((8, 3, 4, 4), dtype=np.float32))
    monkeypatch.setattr(entries, "clean_source_images", lambda dataset, n, **k: fisher_images[:n].clone())
    entries._ttn_states.clear()
    fit = {"n_images": 16, "prior_batches": 2, "prior_batch_size": 8, "epochs": 1, "batch_size": 8}
    methods = [{"preset": "ttn", "kwargs": {"ttn_fit": fit}}, {"preset": "tbn", "method": "eata",
               "kwargs": {"fisher_samples": 8}}]  # fmt: skip
    records = ab.run_attack_grid(_tiny_cfg(tmp_path, methods=methods, objectives=["targeted"]), progress=False).records
    assert [r["status"] for r in records] == ["ok", "ok"], [r.get("error") for r in records]
    assert {r["cell"]["method"]["name"].split("(")[0] for r in records} == {"ttn", "tbn+eata"}
    assert list((tmp_path / "cache" / "ttn").glob("ttn-*.pt"))  # fitted once, cached for the next cell


def test_every_config_key_is_in_the_cell_key_or_declared_result_neutral(tmp_path):
    import dataclasses

    axes = {"methods", "objectives", "budgets", "fractions", "batch_sizes", "modes", "seeds"}
    content = {"model", "checkpoint", "data_dir"}  # keyed by the weights' and the images' content
    neutral = {"name", "device", "output", "plots", "resources", "trackers"}
    fields = {f.name for f in dataclasses.fields(ab.AttackConfig)}
    assert fields == axes | set(ab.ATTACK_PARAMS) | content | neutral
    state = {"model": pool_bn_net(), "bench": _fake_bench()}

    def key(**change):
        job = ab.AttackJob(_tiny_cfg(tmp_path, **change))
        return job.cells()[0].key(job.kind, job.identity(state))

    base = key()
    changes = [{"protocol": "unrolled"}, {"steps": 4}, {"step_size": 0.1}, {"init": "random"}, {"data_seed": 1},
               {"n_batches": 1}, {"stealth_weight": 2.0}, {"corruptions": ["fog"]}, {"severities": [3]},
               {"source": "regenerate"}, {"dataset": "cifar100"}]  # fmt: skip
    assert {next(iter(c)) for c in changes} == set(ab.ATTACK_PARAMS)
    for change in changes:
        assert key(**change) != base, change
    for change in ({"output": str(tmp_path / "elsewhere")}, {"plots": False}, {"device": "auto"}, {"name": "other"}):
        assert key(**change) == base, change


def test_report_says_when_records_come_from_several_code_revisions(tmp_path, patched):
    records = ab.run_attack_grid(_tiny_cfg(tmp_path, methods=["tbn"]), progress=False).records
    assert "Mixed code" not in (tmp_path / "run" / "report.md").read_text()
    records[0] = {**records[0], "env": {**records[0]["env"], "git": "0123abc"}}
    report = ab.write_attack_outputs(tmp_path / "run", records, plots=False).read_text()
    assert "**Mixed code:** these 2 records come from 2 code revisions (0123abc, " in report


def test_all_corruptions_is_a_config_value():
    from tta_norm.data.benchmark import CORRUPTIONS

    cfg = ab.AttackConfig.from_mapping({"corruptions": "all"})
    assert cfg.corruptions == list(CORRUPTIONS) and len(cfg.corruptions) == 15


def test_report_and_plots_are_written_at_zero_and_full_success(tmp_path):
    def record(successes: int, n: int, fraction: float) -> dict:
        rows = [{"domain": f"d{i}", "batch": 0, "num_malicious": 40, "benign_error_attacked": 0.5,
                 "no_attack_error": 0.4, "target_success": i < successes, "target_clean_hit": False, "steps": 5}
                for i in range(n)]  # fmt: skip
        cell = {"method": {"name": "tbn", "preset": "tbn", "method": None}, "objective": "targeted", "eps": 1.0,
                "fraction": fraction, "batch_size": 200, "mode": "instant", "seed": 0}  # fmt: skip
        return {"key": f"k{fraction}", "status": "ok", "grid": "g", "cell": cell, "metrics": {"per_batch": rows},
                "data": "synthetic"}

    ab.write_attack_outputs(tmp_path, [record(30, 30, 0.2), record(0, 3, 0.1)], plots=True)
    report = (tmp_path / "report.md").read_text()
    assert "100.0 [88.6-100.0] n=30" in report and "0.0 [0.0-56.1] n=3" in report
    assert list((tmp_path / "plots").glob("*.png"))


def test_report_header_counts_the_malicious_samples_the_attack_uses(tmp_path, patched):
    from tta_norm.attacks.malicious import MaliciousAttack

    cfg = _tiny_cfg(tmp_path, methods=["tbn"], fractions=[0.125], batch_sizes=[4, 20], n_batches=1,
                    objectives=["indiscriminate"], steps=1)  # fmt: skip
    outcome = ab.run_attack_grid(cfg, progress=False)
    report = (outcome.out / "report.md").read_text()
    for r in outcome.records:
        f, bs = r["cell"]["fraction"], r["cell"]["batch_size"]
        m = r["metrics"]["num_malicious"]
        assert m == MaliciousAttack(fraction=f).count(bs)
    # 0.125 of 4 is 0.5 and of 20 is 2.5: half up gives 1 and 3 (round() gave 0 and 2)
    assert "12% (m=1)" in report and "12% (m=3)" in report


@pytest.mark.parametrize("method", ["tent", "sar"])
def test_cumulative_no_attack_reference_is_predicted_like_the_attacked_batch(tmp_path, patched, method):
    entry = {"preset": "tbn", "method": method, "kwargs": {"lr": 5.0}}  # a large step: predictions move
    cfg = _tiny_cfg(tmp_path, methods=[entry], fractions=[0.0], modes=["cumulative"], n_batches=3,
                    objectives=["indiscriminate"], batch_sizes=[8], protocol="dia")  # fmt: skip
    cfg.validate()
    job = ab.AttackJob(cfg)
    state = job.prepare("cpu")
    cell = cfg.cells()[0]
    out = ab.run_attack_cell(cell, state["model"], state["bench"], cfg, "cpu", None)
    rows = out["per_batch"]
    assert all(r["changed"] == 0 for r in rows)
    assert [r["no_attack_error"] for r in rows] == [r["benign_error_attacked"] for r in rows]
