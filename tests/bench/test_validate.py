"""Validation before work: every user mistake is one line on stderr naming its key path, exit status 2."""

from __future__ import annotations

import pytest

from tta_norm.bench.validate import ConfigError, accepted_method_kwargs, check_int, check_number
from tta_norm.cli import main

TENT_TYPO = "methods=[{preset: tbn, method: tent, kwargs: {lrr: 0.1}}]"

CASES = [
    (["bench", "quick", "-s", TENT_TYPO],
     "methods[0].kwargs.lrr (tbn+tent(lrr=0.1)): not a parameter of method 'tent' (did you mean 'lr'?)"),
    (["bench", "quick", "-s", "model=resnet21"], "model:"),
    (["bench", "quick", "-s", "model=resnet18"], "model: torchvision model resnet18 has no weights"),
    (["bench", "quick", "-s", "model=timm:efficientnet_b0"], "are not in the local cache"),
    (["bench", "quick", "-s", "dataset=imagenet_r"], "data:"),
    (["bench", "quick", "--device", "tpu"], "device: unknown device 'tpu'"),
    (["bench", "quick", "-s", "checkpoint=/nonexistent/resnet20.th"], "checkpoint: no such file"),
    (["bench", "quick", "-s", "dataset=cifar11"], "dataset: must be one of cifar10, cifar100, imagenet"),
    (["bench", "quick", "-s", "seeds=[1.5]"], "seeds[0]: expected an integer, got 1.5 (float)"),
    (["bench", "quick", "-s", "deltas=[-1]"], "deltas[0]: must be > 0, got -1"),
    (["bench", "quick", "-s", "batch_sizes=[true]"], "batch_sizes[0]: expected an integer, got True (bool)"),
    (["bench", "quick", "-s", "n_examples=true"], "n_examples: expected an integer"),
    (["bench", "quick", "-s", "plots=1"], "plots: expected true or false"),
    (["bench", "quick", "-s", "resources={num_cpus: -1}"], "resources.num_cpus: must be >= 0"),
    (["bench", "quick", "-s", "trackers=[wandb]"], "trackers[0]: must be one of tensorboard"),
    (["bench", "quick", "-s", "corruptions=[fogg]"], "corruptions[0]: unknown corruption 'fogg' (did you mean 'fog'?)"),
    (["bench", "quick", "-s", "data_dir=/nonexistent-dir"], "data_dir: no such directory"),
    (["bench", "quick", "-s", "batch_sizes=[1,"], "override 'batch_sizes=[1,': not a YAML value"),
    (["bench", "quick", "--shard", "3/2"], "--shard: expected K/N"),
    (["attack", "attack_quick", "-s", "seeds=[false]"], "seeds[0]: expected an integer, got False (bool)"),
    (["attack", "attack_quick", "-s", "model=resnet21"], "model:"),
    (["attack", "attack_quick", "-s", "steps=2.5"], "steps: expected an integer"),
    (["bench", "quick", "-s", "methods=[{preset: tbn, method: tent, kwargs: {lr: abc}}]"],
     "methods[0].kwargs.lr (tbn+tent(lr=abc)): lr must be a number or one of"),
    (["bench", "quick", "-s", "methods=[{preset: tbn, method: sar, kwargs: {steps: 0}}]"], "steps must be >= 1"),
    (["bench", "quick", "-s", "methods=[{preset: ema, kwargs: {reset_every: 0}}]"], "reset_every must be a positive"),
    (["attack", "attack_quick", "-s", "methods=[{preset: tbn, method: tent, kwargs: {optimizer: rmsprop}}]"],
     "unknown optimizer 'rmsprop'"),
    (["bench", "quick", "-s", "methods=[{preset: sabn, kwargs: {num_domains: 2.0}}]"],
     "kwargs.num_domains (sabn(num_domains=2.0)): expected int, got 2.0"),
]


@pytest.mark.parametrize("argv,message", CASES, ids=[" ".join(c[0][2:]) for c in CASES])
def test_dry_run_catches_user_mistakes_in_one_line(argv, message, capsys):
    assert main([*argv, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_malformed_yaml_names_file_line_and_column(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\nmethods: [tbn, medbn\nseeds: [0]\n")
    assert main(["bench", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"{path}:3:" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_dry_run_lists_cells_of_a_valid_config(capsys):
    assert main(["bench", "quick", "--dry-run", "--shard", "2/2"]) == 0
    out = capsys.readouterr().out
    assert "2 cells (shard 2/2 of 5)" in out and "config ok" in out


def test_a_real_run_validates_before_its_first_cell(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["bench", "quick", "-o", str(out), "-s", "model=resnet21"]) == 2
    assert "model:" in capsys.readouterr().err
    assert not (out / "results.jsonl").exists()


def test_checks_reject_bool_and_check_ranges():
    assert check_int("x", 3, minimum=1) == 3
    for bad in (True, 1.0, "1"):
        with pytest.raises(ConfigError, match="x: expected an integer"):
            check_int("x", bad)
    with pytest.raises(ConfigError, match="must be > 0"):
        check_number("d", 0, positive=True)
    with pytest.raises(ConfigError, match="expected a number"):
        check_number("d", False)


def test_method_kwargs_follow_the_constructor_chain():
    eata, open_ended = accepted_method_kwargs("eata")
    assert {"d_margin", "fisher_alpha", "lr", "steps"} <= eata and not open_ended


def test_entries_with_data_arguments_are_checked_with_the_real_model():
    import torch

    from tta_norm.bench.config import parse_method

    images = torch.rand(4, 3, 32, 32)  # Fisher images of a Python config: not pushed through the probe network
    entry = parse_method({"preset": "tbn", "method": "eata", "kwargs": {"fisher_images": images, "lr": 1e-4}})
    assert entry.method == "eata"


def test_a_key_given_twice_is_refused_with_its_line(tmp_path, capsys):
    path = tmp_path / "dup.yaml"
    path.write_text("name: dup\nseeds: [0]\nmethods: [{preset: tbn, method: tent, kwargs: {lr: 0.1, lr: 0.2}}]\n")
    assert main(["bench", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"{path}:3:" in err and "key 'lr' is given twice" in err and len(err.strip().splitlines()) == 1
    path.write_text("name: dup\nseeds: [0]\nseeds: [1]\n")
    assert main(["bench", str(path), "--dry-run"]) == 2
    assert "key 'seeds' is given twice" in capsys.readouterr().err
    assert main(["bench", "quick", "--dry-run", "-s", "methods=[{preset: tbn, preset: medbn}]"]) == 2
    assert "key 'preset' is given twice" in capsys.readouterr().err
    path.write_text("base: &b {preset: tbn, method: tent}\nmethods: [{<<: *b, method: eata}]\n")  # merge keys
    from tta_norm.bench.config import read_config_data

    assert read_config_data(str(path), [], {})[0]["methods"] == [{"preset": "tbn", "method": "eata"}]
    path.write_text("common: &c {optimizer: sgd, lr: 0.01}\nmethods: [{preset: tbn, kwargs: &kw {<<: *c, lr: 0.001}}]"
                    "\nother: {<<: *kw}\n")  # an anchor that merges, merged again: no key is given twice
    assert read_config_data(str(path), [], {})[0]["other"] == {"optimizer": "sgd", "lr": 0.001}


@pytest.mark.parametrize("name", ["exp #2", "a: b", "[x]", "null", "01"])
def test_output_and_data_dir_options_are_taken_verbatim(tmp_path, name, capsys):
    out = tmp_path / name
    assert main(["bench", "quick", "--dry-run", "-o", str(out)]) == 0
    assert f"output {out}\n" in capsys.readouterr().out


def test_a_gradual_grid_takes_entries_with_mapping_options(capsys):
    entry = "methods=[{preset: tbn, method: tent, kwargs: {optimizer: sgd, optim: {momentum: 0.5}}}]"
    assert main(["bench", "quick", "--dry-run", "-s", "settings=[gradual]", "-s", "severities=[3,5]", "-s", entry]) == 0
    assert "1 cells" in capsys.readouterr().out
