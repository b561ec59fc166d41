from __future__ import annotations

import argparse
import math
import shutil

import numpy as np
import pytest
import torch

import tta_norm.training.source as source_mod
from tests.data.test_data import _write_png_tree
from tta_norm.cli import train as train_cli
from tta_norm.data.source import load_split
from tta_norm.data.tensors import to_float_nchw
from tta_norm.models import load_model
from tta_norm.training import (
    ThreadChooser,
    TrainConfig,
    WeightEMA,
    augment_batch,
    cutout_batch,
    evaluate_accuracy,
    lr_at,
    prepare_source_model,
    read_checkpoint_meta,
    train_source_model,
)

pytestmark = pytest.mark.usefixtures("_isolated_cache")  # tests here write to the cache


def test_augment_batch_is_crop_of_padded_image_or_its_mirror():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 8, 8, 3), dtype=torch.uint8)
    out = augment_batch(images, gen, pad=2)
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(images, (0, 0, 2, 2, 2, 2))
    flips = 0
    for i in range(len(images)):
        windows = [padded[i, y : y + 8, x : x + 8] for y in range(5) for x in range(5)]
        plain = any(torch.equal(out[i], w) for w in windows)
        mirrored = any(torch.equal(out[i], w.flip(1)) for w in windows)
        assert plain or mirrored
        flips += mirrored and not plain
    assert 10 < flips < 54  # about half are flipped
    again = augment_batch(images, torch.Generator().manual_seed(0), pad=2)
    assert torch.equal(out, again)  # deterministic given the generator


def test_augment_batch_reflect_is_crop_of_reflect_padded_image():
    gen = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (48, 6, 7, 3), dtype=torch.uint8)
    out = augment_batch(images, gen, pad=3, pad_mode="reflect")
    # reference: torch's reflect padding (NCHW float), then every crop window and its mirror
    ref = torch.nn.functional.pad(images.permute(0, 3, 1, 2).float(), (3, 3, 3, 3), mode="reflect")
    ref = ref.permute(0, 2, 3, 1).to(torch.uint8)
    for i in range(len(images)):
        windows = [ref[i, y : y + 6, x : x + 7] for y in range(7) for x in range(7)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(1)) for w in windows)
    with pytest.raises(ValueError, match="pad_mode"):
        augment_batch(images, gen, pad=3, pad_mode="edge")
    with pytest.raises(ValueError, match="pad < image size"):
        augment_batch(images, gen, pad=6, pad_mode="reflect")


def test_augment_offsets_cover_full_range():
    gen = torch.Generator().manual_seed(1)
    images = torch.zeros(2000, 4, 4, 1, dtype=torch.uint8)
    images[:, 0, 0, 0] = 255  # marker at the top-left pixel
    out = augment_batch(images, gen, pad=4)
    # the marker moves to row (4 - oy): every offset 0..8 appears, rows >= 4 mean it was cropped away
    rows = set()
    for img in out[:, :, :, 0]:
        nz = torch.nonzero(img)
        if len(nz):
            rows.add(int(nz[0, 0]))
    assert rows == {0, 1, 2, 3}


def test_to_float_nchw_is_contiguous():
    x = to_float_nchw(torch.full((2, 4, 4, 3), 255, dtype=torch.uint8))
    assert x.shape == (2, 3, 4, 4) and x.is_contiguous() and float(x.max()) == 1.0


def test_lr_schedule():
    assert lr_at(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert lr_at(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(100, 100, 10, 1.0) == pytest.approx(0.0)
    assert lr_at(3, 10, 0, 0.2) == pytest.approx(0.1 * (1 + math.cos(math.pi * 0.3)))


@pytest.fixture
def tiny_source(tmp_path):
    data = tmp_path / "data"
    _write_png_tree(data / "toy" / "train", ["a", "b"], 8, size=(32, 32))
    _write_png_tree(data / "toy" / "test", ["a", "b"], 4, size=(32, 32), seed=3)
    return data


def test_train_tiny_scratch_is_deterministic_and_loadable(tiny_source, tmp_path):
    threads_before = torch.get_num_threads()
    cfg = TrainConfig(init="scratch", epochs=2, batch_size=8, amp=False, threads=1)  # 2 steps per epoch
    a = train_source_model(cfg, data_dir=tiny_source, source="toy", out=tmp_path / "a.pt", progress=False)
    b = train_source_model(cfg, data_dir=tiny_source, source="toy", out=tmp_path / "b.pt", progress=False)
    sa, sb = (torch.load(p, weights_only=True)["state_dict"] for p in (a.path, b.path))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.epochs_done == 2 and len(a.history) == 2 and 0.0 <= a.test_accuracy <= 1.0
    meta = read_checkpoint_meta(a.path)
    assert meta["num_classes"] == 2 and meta["config"]["epochs"] == 2 and meta["test_accuracy"] == a.test_accuracy
    model = load_model("resnet20", a.path)
    assert model.linear.out_features == 2
    assert torch.get_num_threads() == threads_before  # restored after training


def test_prepare_source_model_trains_once(tiny_source, monkeypatch):
    cfg = TrainConfig(init="scratch", epochs=1, batch_size=8, amp=False)
    path = prepare_source_model("resnet20", data_dir=tiny_source, source="toy", config=cfg, progress=False)
    assert path.is_file() and "resnet20-toy-" in path.name

    def no_training(*args, **kwargs):
        raise AssertionError("must not retrain a cached checkpoint")

    monkeypatch.setattr(source_mod, "train_source_model", no_training)
    assert prepare_source_model("resnet20", data_dir=tiny_source, source="toy", config=cfg) == path
    other = TrainConfig(init="scratch", epochs=2, batch_size=8, amp=False)
    with pytest.raises(AssertionError, match="retrain"):  # a different config is a different checkpoint
        prepare_source_model("resnet20", data_dir=tiny_source, source="toy", config=other)


def test_missing_source_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar10-jpeg"):
        prepare_source_model("resnet20", data_dir=tmp_path)


def test_cli(tiny_source, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    train_cli.add_arguments(parser)
    out = tmp_path / "cli.pt"
    args = parser.parse_args(["--data-dir", str(tiny_source), "--source", "toy", "--init", "scratch", "--epochs",
                              "1", "--batch-size", "8", "--no-amp", "--out", str(out), "--quiet"])  # fmt: skip
    assert train_cli.run(args) == 0 and out.is_file()
    assert "test accuracy" in capsys.readouterr().out
    assert train_cli.run(args) == 0
    assert "cached checkpoint" in capsys.readouterr().out
    bad = parser.parse_args(["--data-dir", str(tmp_path / "nowhere")])
    assert train_cli.run(bad) == 2


@pytest.mark.slow
def test_small_budget_finetune_on_mirror(mirror_root, resnet20_checkpoint, tmp_path):
    """A few hundred steps of the real recipe on mirror images: the fine-tuned model stays a good classifier."""
    cfg = TrainConfig(epochs=1, max_train_samples=1024, batch_size=128, lr=0.01)
    result = train_source_model(cfg, data_dir=mirror_root, out=tmp_path / "r20.pt", evaluate=False, progress=False)
    model = load_model("resnet20", result.path)
    test = load_split(mirror_root, "test", progress=False)
    acc = evaluate_accuracy(model, test.images[::20], test.labels[::20])
    assert acc > 0.7
    assert np.isfinite(result.history[0]["train_loss"])


def test_thread_chooser_picks_the_faster_count():
    import time as _time

    default = torch.get_num_threads()
    if default < 2:
        pytest.skip("needs torch with >= 2 threads")
    chooser = ThreadChooser(None, torch.device("cpu"))
    try:
        for slow_count in (1, default):
            chooser.new_epoch()
            for _ in range(2 * chooser.PROBE):
                chooser.before_step()
                if torch.get_num_threads() == slow_count:
                    _time.sleep(0.02)
                chooser.after_step()
            assert torch.get_num_threads() == (default if slow_count == 1 else 1)
    finally:
        chooser.restore()
    assert torch.get_num_threads() == default
    assert not ThreadChooser(None, torch.device("cuda")).auto


def test_weight_ema_update_and_copy():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    ema = WeightEMA(model, 0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model[1].running_mean.fill_(2.0)
    ema.update(model)
    ema.copy_to(model)
    state = model.state_dict()
    for name in ("0.weight", "0.bias", "1.weight"):
        assert torch.allclose(state[name], start[name] + 0.1)  # 0.9 * old + 0.1 * (old + 1)
    assert torch.allclose(state["1.running_mean"], torch.full((2,), 0.2))
    assert state["1.num_batches_tracked"] == start["1.num_batches_tracked"]  # integer buffers are not averaged


def test_train_with_ema_records_both_accuracies(tiny_source, tmp_path):
    cfg = TrainConfig(init="scratch", epochs=1, batch_size=8, amp=False, threads=1, ema_decay=0.5,
                      label_smoothing=0.1)  # fmt: skip
    result = train_source_model(cfg, data_dir=tiny_source, source="toy", out=tmp_path / "e.pt", progress=False)
    meta = read_checkpoint_meta(result.path)
    assert meta["test_accuracy"] == result.test_accuracy and "test_accuracy_last_iterate" in meta


def test_cutout_masks_a_clipped_square():
    gen = torch.Generator().manual_seed(0)
    images = torch.full((500, 32, 32, 3), 7, dtype=torch.uint8)
    out = cutout_batch(images, gen, 16, fill=(1, 2, 3))
    masked = (out[..., 0] == 1)
    assert torch.equal(out[masked], torch.tensor([1, 2, 3], dtype=torch.uint8).expand(int(masked.sum()), 3))
    assert ((out[..., 0] == 7) | masked).all()
    area = masked.sum((1, 2))
    assert area.max() == 256 and area.min() >= 64  # a 16x16 square, at worst a quarter inside the image
    for i in range(20):  # each mask is one axis-aligned rectangle
        rows, cols = masked[i].any(1).nonzero().flatten(), masked[i].any(0).nonzero().flatten()
        assert area[i] == len(rows) * len(cols) == (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)


def test_cli_never_reuses_a_file_of_another_training_and_refuses_bad_options(tiny_source, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    train_cli.add_arguments(parser)
    out = tmp_path / "cli.pt"
    base = ["--data-dir", str(tiny_source), "--source", "toy", "--init", "scratch", "--batch-size", "8", "--no-amp",
            "--out", str(out), "--quiet"]  # fmt: skip
    assert train_cli.run(parser.parse_args([*base, "--epochs", "1"])) == 0
    capsys.readouterr()
    assert train_cli.run(parser.parse_args([*base, "--epochs", "2"])) == 2  # the file holds a 1-epoch training
    err = capsys.readouterr().err
    assert "another training: epochs 1 (asked 2)" in err and len(err.strip().splitlines()) == 1
    assert train_cli.run(parser.parse_args([*base, "--epochs", "2", "--model", "resnet32"])) == 2
    assert "model 'resnet20' (asked 'resnet32')" in capsys.readouterr().err
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"junk")
    assert train_cli.run(parser.parse_args([*base, "--out", str(junk), "--epochs", "1"])) == 2
    assert "not written by tta-norm train" in capsys.readouterr().err
    for bad, message in ((["--epochs", "0"], "epochs must be an integer >= 1"),
                         (["--batch-size", "0"], "batch_size must be an integer >= 1"),
                         (["--device", "bogus"], "unknown device 'bogus'"),
                         (["--model", "nosuch"], "unknown model 'nosuch'"),
                         (["--init", str(tmp_path / "none.pt")], "--init: no such checkpoint file")):  # fmt: skip
        assert train_cli.run(parser.parse_args([*base, "--force", *bad])) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_a_training_cut_short_or_on_other_data_is_never_cached(tiny_source, tmp_path, capsys, monkeypatch):
    """A checkpoint stopped by --max-minutes was reused as "cached" by the full training (and by the bench's
    cache); one trained on another source folder too."""
    parser = argparse.ArgumentParser()
    train_cli.add_arguments(parser)
    out = tmp_path / "short.pt"
    base = ["--source", "toy", "--init", "scratch", "--batch-size", "8", "--no-amp", "--epochs", "2", "--quiet",
            "--out", str(out)]  # fmt: skip
    clock = iter(range(0, 10**6, 60))  # each reading a minute later: the loop stops after its first step
    monkeypatch.setattr(source_mod.warnings, "warn", lambda *a, **k: None)
    from tta_norm.training import loop

    monkeypatch.setattr(loop.time, "perf_counter", lambda: float(next(clock)))
    assert train_cli.run(parser.parse_args([*base, "--data-dir", str(tiny_source), "--max-minutes", "0.5"])) == 0
    monkeypatch.undo()
    assert read_checkpoint_meta(out)["stopped_early"] is True
    capsys.readouterr()
    assert train_cli.run(parser.parse_args([*base, "--data-dir", str(tiny_source)])) == 2
    assert "cut short by --max-minutes" in capsys.readouterr().err
    assert train_cli.run(parser.parse_args([*base, "--data-dir", str(tiny_source), "--max-minutes", "9"])) == 0
    assert "cached checkpoint" in capsys.readouterr().out  # a caller who sets a budget takes a budgeted run
    full = tmp_path / "full.pt"
    args = [*base[:-1], str(full)]
    assert train_cli.run(parser.parse_args([*args, "--data-dir", str(tiny_source)])) == 0
    capsys.readouterr()
    copy_dir = tmp_path / "copy"
    shutil.copytree(tiny_source, copy_dir)
    assert train_cli.run(parser.parse_args([*args, "--data-dir", str(copy_dir)])) == 2
    assert "was trained on" in capsys.readouterr().err
    cfg = TrainConfig(init="scratch", epochs=1, batch_size=8, amp=False)
    short = TrainConfig(init="scratch", epochs=1, batch_size=8, amp=False, max_minutes=1.0)
    path = source_mod.default_checkpoint_path(cfg, tiny_source / "toy")
    assert path == source_mod.default_checkpoint_path(short, tiny_source / "toy")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    path.with_suffix(".json").write_text('{"stopped_early": true, "epochs_done": 0.5, "config": {"epochs": 1}}')
    trained = []
    monkeypatch.setattr(source_mod, "train_source_model", lambda *a, **k: trained.append(1))
    source_mod.prepare_source_model("resnet20", data_dir=tiny_source, source="toy", config=cfg, progress=False)
    assert trained == [1]  # the bench's cache retrains a cut-short checkpoint


def test_train_refuses_bad_numbers_and_paths_before_any_work(tiny_source, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    train_cli.add_arguments(parser)
    base = ["--data-dir", str(tiny_source), "--source", "toy", "--init", "scratch", "--batch-size", "8", "--no-amp",
            "--epochs", "1", "--quiet", "--force"]  # fmt: skip
    (tmp_path / "adir").mkdir()
    (tmp_path / "readme.txt").write_text("not a checkpoint")
    for extra, message in ((["--label-smoothing", "2"], "label_smoothing must be in"),
                           (["--threads", "0"], "threads must be"), (["--ema-decay", "1.5"], "ema_decay must be"),
                           (["--weight-decay", "-1"], "weight_decay must be"), (["--cutout", "-3"], "cutout must be"),
                           (["--max-minutes", "-1"], "max_minutes must be > 0"),
                           (["--out", str(tmp_path / "m.json")], "ends in .json"),
                           (["--out", str(tmp_path / "adir")], "is a directory"),
                           (["--init", str(tmp_path / "readme.txt")], "could not read checkpoint")):  # fmt: skip
        assert train_cli.run(parser.parse_args([*base, *extra])) == 2, extra
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (extra, err)
    assert not list((tmp_path / "adir").iterdir()) and not list(tmp_path.glob(".*.tmp"))
