"""The ttn-fit / sabn-train command-line front ends on a tiny ImageFolder (released ResNet-20 weights)."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

import tta_norm
from tta_norm.cli import sabn_train, ttn_fit


@pytest.fixture()
def tiny_folder(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("TTA_NORM_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    root = tmp_path / "tiny-source"
    for split in ("train", "test"):
        for c in range(10):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


@pytest.fixture()
def resnet20():
    from tta_norm.models import load_model

    try:
        return load_model("resnet20")
    except (FileNotFoundError, RuntimeError) as err:  # pragma: no cover - depends on the machine
        pytest.skip(f"resnet20 weights unavailable: {err}")


def parse(add, argv):
    p = argparse.ArgumentParser()
    add(p)
    return p.parse_args(argv)


def test_ttn_fit_cli_saves_a_loadable_state(tiny_folder, resnet20, tmp_path, capsys):
    out = tmp_path / "ttn.pt"
    args = parse(ttn_fit.add_arguments, [
        "--data-dir", str(tiny_folder), "--source", "tiny-source", "--n-images", "12", "--prior-batches", "2",
        "--epochs", "1", "--batch-size", "6", "--fit-batch-sizes", "3,6", "--device", "cpu", "--out", str(out),
        "--quiet",
    ])  # fmt: skip
    assert ttn_fit.run(args) == 0
    printed = capsys.readouterr().out
    assert f"saved TTN state to {out} (12 images," in printed and "init_state" in printed
    tta = tta_norm.adapt(resnet20, "ttn", init_state=out)
    payload = torch.load(out, weights_only=True)
    for name, layer in tta.norm_layers():
        assert torch.equal(layer.mix_weight, payload["ttn"]["alpha"][name])
    assert payload["meta"]["n_images"] == 12
    assert {k: payload["meta"][k] for k in ("model", "checkpoint", "source")} == {
        "model": "resnet20", "checkpoint": None, "source": "tiny-source"}  # fmt: skip


def test_ttn_fit_cli_reports_missing_data(tmp_path, capsys):
    args = parse(ttn_fit.add_arguments, ["--data-dir", str(tmp_path), "--source", "nope", "--out", "x.pt"])
    assert ttn_fit.run(args) == 2
    assert "not found" in capsys.readouterr().err


def test_sabn_train_cli_saves_state_and_bank(tiny_folder, resnet20, tmp_path):
    from tta_norm.fitting.sabn import SaBNRouter

    out = tmp_path / "sabn.pt"
    args = parse(sabn_train.add_arguments, [
        "--data-dir", str(tiny_folder), "--source", "tiny-source", "--n-images", "12", "--domains", "clean,noise",
        "--epochs", "1", "--batch-size", "6", "--device", "cpu", "--out", str(out), "--quiet",
    ])  # fmt: skip
    assert sabn_train.run(args) == 0
    assert torch.load(out, weights_only=True)["meta"]["source"] == "tiny-source"
    router = SaBNRouter.from_file(resnet20, out, "stats")
    assert router.bank.names == ["clean", "noise"] and router.capacity == 2
    x = torch.rand(4, 3, 32, 32)
    router(x)
    assert router.routes[0] in (0, 1)


def test_sabn_train_cli_rejects_bad_domains(capsys):
    args = parse(sabn_train.add_arguments, ["--domains", "clean,jpeg", "--out", "x.pt"])
    assert sabn_train.run(args) == 2
    assert "bad SaBN domains" in capsys.readouterr().err


def test_train_command_trains_sabn_heads(tiny_folder, resnet20, tmp_path):
    from tta_norm.cli import train as train_cli
    from tta_norm.fitting.sabn import SaBNRouter

    out = tmp_path / "sabn-via-train.pt"
    args = parse(train_cli.add_arguments, [
        "--data-dir", str(tiny_folder), "--source", "tiny-source", "--max-train-samples", "12",
        "--sabn-domains", "clean,blur", "--epochs", "1", "--batch-size", "6", "--device", "cpu", "--out", str(out),
        "--quiet",
    ])  # fmt: skip
    assert train_cli.run(args) == 0
    assert SaBNRouter.from_file(resnet20, out, "stats").bank.names == ["clean", "blur"]
    no_out = parse(train_cli.add_arguments, ["--sabn-domains", "clean,blur"])
    assert train_cli.run(no_out) == 2


def test_fitting_commands_never_replace_an_output_unasked(tiny_folder, tmp_path, capsys):
    """ttn-fit, sabn-train and train --sabn-domains wrote over an existing --out (the result of an earlier
    fit); train --sabn-domains also accepted and ignored the training recipe's options."""
    from tta_norm.cli import train as train_cli

    kept = tmp_path / "earlier.pt"
    kept.write_bytes(b"an earlier result")
    common = ["--data-dir", str(tiny_folder), "--source", "tiny-source", "--device", "cpu", "--quiet"]
    for add, run, argv in (
        (ttn_fit.add_arguments, ttn_fit.run, [*common, "--n-images", "12", "--out", str(kept)]),
        (sabn_train.add_arguments, sabn_train.run, [*common, "--n-images", "12", "--domains", "clean", "--out",
                                                     str(kept)]),
        (ttn_fit.add_arguments, ttn_fit.run, [*common, "--out", str(tmp_path)]),
        (train_cli.add_arguments, train_cli.run, [*common, "--sabn-domains", "clean", "--out", str(kept)]),
        (train_cli.add_arguments, train_cli.run, [*common, "--sabn-domains", "clean", "--out", str(tmp_path / "n.pt"),
                                                  "--weight-decay", "5", "--no-amp"]),
    ):  # fmt: skip
        assert run(parse(add, argv)) == 2
        err = capsys.readouterr().err
        assert ("exists; --force" in err or "is a directory" in err or "do(es) not apply" in err), err
        assert len(err.strip().splitlines()) == 1
    assert kept.read_bytes() == b"an earlier result" and not (tmp_path / "n.pt").exists()


def test_fitting_commands_check_that_out_can_be_written_before_loading(tmp_path, capsys, monkeypatch):
    """An --out under a file was found only when the finished fit was saved, as a traceback."""
    from tta_norm.cli import _source

    def no_load(args):
        raise AssertionError("the model and data were loaded before --out was checked")

    monkeypatch.setattr(_source, "load_model_and_source", no_load)
    afile = tmp_path / "afile"
    afile.write_text("a file, not a directory")
    out = afile / "fit.pt"
    for command, module, extra in (("ttn-fit", ttn_fit, []), ("sabn-train", sabn_train, ["--domains", "clean"])):
        assert module.run(parse(module.add_arguments, ["--device", "cpu", "--out", str(out), *extra])) == 2
        err = capsys.readouterr().err
        assert err == f"tta-norm {command}: cannot write --out {out}: {afile} is not a writable directory\n"


def test_fitting_commands_report_a_failed_save_in_one_line(tmp_path, capsys, monkeypatch):
    from tta_norm.cli import _source

    class Unsaved:
        meta: dict = {}

        def save(self, path):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(_source, "load_model_and_source", lambda args: (None, None, None))
    args = parse(ttn_fit.add_arguments, ["--device", "cpu", "--out", str(tmp_path / "fit.pt")])
    assert _source.fit_on_source(args, "ttn-fit", lambda *a, **k: Unsaved(), ()) is None
    err = capsys.readouterr().err
    assert err.startswith(f"tta-norm ttn-fit: cannot write --out {tmp_path / 'fit.pt'}: ") and "No space" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("module", "extra", "message"),
    [
        (ttn_fit, ["--fit-batch-sizes", ""], "fit_batch_sizes must be positive, got ()"),
        (ttn_fit, ["--ops", ""], "unknown or no shift op(s) ()"),
        (sabn_train, ["--domains", ""], "bad SaBN domains ()"),
        (ttn_fit, ["--fit-batch-sizes", "4,x"], "--fit-batch-sizes takes comma-separated integers, got '4,x'"),
        (ttn_fit, ["--batch-size", "8", "--fit-batch-sizes", "64"], "fit_batch_sizes has 64 > batch_size 8"),
        (ttn_fit, ["--lr", "nan"], "lr must be a finite number"),
        (sabn_train, ["--domains", "clean", "--lr", "inf"], "lr must be a finite number"),
    ],
)
def test_fitting_commands_refuse_empty_and_bad_values_before_loading(module, extra, message, tmp_path, capsys,
                                                                     monkeypatch):  # fmt: skip
    """An empty --domains, --ops or --fit-batch-sizes was replaced by the default."""
    from tta_norm.cli import _source

    def no_load(args):
        raise AssertionError("the model and data were loaded before the options were checked")

    monkeypatch.setattr(_source, "load_model_and_source", no_load)
    assert module.run(parse(module.add_arguments, ["--device", "cpu", "--out", str(tmp_path / "x.pt"), *extra])) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
