"""Source readers, the CIFAR-10-C and ImageNet-C writers (layout, resumability, atomic files) and the CLI."""

from __future__ import annotations

import argparse
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import corruptions.datasets as ds
from corruptions import cli, corrupt, load_cifar_batches, load_image_folder, write_cifar_c, write_imagenet_c


def _write_cifar10(root: Path, n: int = 7, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = list(rng.integers(0, 10, n))
    with open(d / "test_batch", "wb") as f:
        pickle.dump({b"data": data, b"labels": labels, b"batch_label": b"testing batch 1 of 1"}, f)
    for i in range(1, 6):
        with open(d / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": data[:2], b"labels": labels[:2]}, f)
    return data.reshape(n, 3, 32, 32).transpose(0, 2, 3, 1), np.array(labels)


def _write_folder(root: Path, size=(32, 32), per_class: int = 3, ext: str = ".png") -> np.ndarray:
    rng = np.random.default_rng(1)
    images = []
    for cls in ("dog", "cat"):  # written out of order: readers must sort
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            img = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / cls / f"{per_class - i:03d}{ext}")
    (root / "notes.txt").write_text("not an image")
    for cls in ("cat", "dog"):
        for i in range(per_class, 0, -1):
            images.append(np.asarray(Image.open(root / cls / f"{i:03d}{ext}").convert("RGB")))
    return np.stack(images)


def test_load_cifar10_batches(tmp_path):
    x, y = _write_cifar10(tmp_path)
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):
        xi, yi = load_cifar_batches(root)
        assert xi.dtype == np.uint8 and xi.shape == (7, 32, 32, 3)
        assert np.array_equal(xi, x) and np.array_equal(yi, y)
    xt, yt = load_cifar_batches(tmp_path, train=True)
    assert xt.shape == (10, 32, 32, 3) and len(yt) == 10


def test_load_cifar100_batches(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    data = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    with open(d / "test", "wb") as f:
        pickle.dump({b"data": data, b"fine_labels": [99, 3], b"coarse_labels": [1, 2]}, f)
    (d / "meta").write_bytes(pickle.dumps({}))
    x, y = load_cifar_batches(tmp_path)
    assert list(y) == [99, 3] and x[0, 0, 1, 0] == data[0, 1]


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no CIFAR python batches"):
        load_cifar_batches(tmp_path)
    with pytest.raises(FileNotFoundError, match="no images"):
        load_image_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_folder(tmp_path / "missing")


def test_load_image_folder_order(tmp_path):
    expected = _write_folder(tmp_path)
    x, y, classes = load_image_folder(tmp_path)
    assert classes == ("cat", "dog")
    assert list(y) == [0, 0, 0, 1, 1, 1]
    assert np.array_equal(x, expected[[2, 1, 0, 5, 4, 3]])


def test_write_cifar_c_layout_and_resume(tmp_path, monkeypatch):
    x, y = _write_cifar10(tmp_path / "src", n=5)
    out = tmp_path / "c10c"
    names = ["gaussian_noise", "glass_blur"]
    res = write_cifar_c(x, y, out, names, seed=7, progress=False, workers=1)
    assert res == {n: [1, 2, 3, 4, 5] for n in names}
    labels = np.load(out / "labels.npy")
    assert labels.dtype == np.uint8 and np.array_equal(labels, np.tile(y, 5))
    for name in names:
        arr = np.load(out / f"{name}.npy")
        assert arr.dtype == np.uint8 and arr.shape == (25, 32, 32, 3)
        for s in range(1, 6):
            assert np.array_equal(arr[(s - 1) * 5 : s * 5], corrupt(x, name, s, seed=7))
        assert oct(os.stat(out / f"{name}.npy").st_mode & 0o777) != oct(0o600)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    # finished files are skipped
    monkeypatch.setattr(ds, "run_corruption", lambda *a, **k: pytest.fail("recomputed a finished file"))
    write_cifar_c(x, y, out, names, seed=7, progress=False)
    # a different seed in the same directory is refused
    with pytest.raises(ValueError, match="written with"):
        write_cifar_c(x, y, out, names, seed=8, progress=False)


def test_write_cifar_c_partial_severities(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    y = np.array([1, 2, 3, 4])
    out = tmp_path / "c"
    write_cifar_c(x, y, out, ["contrast"], severities=[5], progress=False)
    arr = np.load(out / "contrast.npy")
    assert arr[:16].max() == 0 and np.array_equal(arr[16:], corrupt(x, "contrast", 5))
    assert json.loads((out / "manifest.json").read_text())["files"]["contrast"] == [5]
    write_cifar_c(x, y, out, ["contrast"], severities=[1, 5], progress=False)
    arr = np.load(out / "contrast.npy")
    assert np.array_equal(arr[:4], corrupt(x, "contrast", 1)) and np.array_equal(
        arr[16:], corrupt(x, "contrast", 5)
    )


def test_write_cifar_c_bad_input(tmp_path):
    x = np.zeros((2, 32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="labels must have shape"):
        write_cifar_c(x, [1], tmp_path, ["contrast"], progress=False)
    with pytest.raises(ValueError, match="0..255"):
        write_cifar_c(x, [1, 300], tmp_path, ["contrast"], progress=False)
    with pytest.raises(ValueError, match="unknown corruption"):
        write_cifar_c(x, [1, 2], tmp_path, ["fuzz"], progress=False)
    with pytest.raises(ValueError, match="severity"):
        write_cifar_c(x, [1, 2], tmp_path, ["contrast"], severities=[6], progress=False)
    with pytest.raises(ValueError, match="uint8"):
        write_cifar_c(x.astype(float), [1, 2], tmp_path, ["contrast"], progress=False)


def test_write_imagenet_c_tree_and_resume(tmp_path, monkeypatch):
    src = tmp_path / "src"
    _write_folder(src, size=(40, 50), per_class=4, ext=".png")
    out = tmp_path / "inc"
    kw = dict(seed=3, preset="imagenet", resize=36, crop=32, progress=False, workers=1, chunk=5)
    n = write_imagenet_c(src, out, ["gaussian_noise", "pixelate"], [1, 5], **kw)
    assert n == 2 * 2 * 8
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.jpg"))
    assert files[0] == "gaussian_noise/1/cat/001.jpg" and len(files) == 32
    # the bytes are the ones of corrupt() on the resized+cropped images, saved as JPEG q85
    index = ds.index_image_folder(src)
    clean = np.stack([ds.read_image(src / f, 36, 32) for f in index.files])
    expected = corrupt(clean, "pixelate", 5, seed=3, preset="imagenet")
    got = np.asarray(Image.open(out / "pixelate" / "5" / "cat" / "001.jpg"))
    buf = out / "check.jpg"
    Image.fromarray(expected[0]).save(buf, format="JPEG", quality=85, optimize=True)
    assert np.array_equal(got, np.asarray(Image.open(buf)))
    buf.unlink()
    # resuming writes only the missing file, with the same bytes as a fresh run
    victim = out / "gaussian_noise" / "5" / "dog" / "002.jpg"
    before = victim.read_bytes()
    victim.unlink()
    assert write_imagenet_c(src, out, ["gaussian_noise", "pixelate"], [1, 5], **kw) == 1
    assert victim.read_bytes() == before


def test_cli_cifar_layout_from_folder(tmp_path, capsys):
    src = tmp_path / "src"
    _write_folder(src)
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(
        [str(src), str(tmp_path / "out"), "--corruptions", "contrast,fog", "--severities", "2,4",
         "--seed", "5", "--workers", "1", "--no-progress"]
    )  # fmt: skip
    assert cli.run(args) == 0
    arr = np.load(tmp_path / "out" / "fog.npy")
    x, y, _ = load_image_folder(src)
    perm = np.load(tmp_path / "out" / "permutation.npy")
    assert np.array_equal(perm, ds.class_mixing_permutation(len(x)))  # rows shuffled once, recorded
    assert np.array_equal(arr[6:12], corrupt(x[perm], "fog", 2, seed=5))
    assert np.array_equal(np.load(tmp_path / "out" / "labels.npy")[:6], y[perm])
    assert arr[:6].max() == 0  # severity 1 not requested


def test_cli_cifar_batches_and_errors(tmp_path, capsys):
    _write_cifar10(tmp_path / "src")
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    ok = parser.parse_args(
        [str(tmp_path / "src"), str(tmp_path / "o"), "--corruptions", "pixelate", "--no-progress"]
    )
    assert cli.run(ok) == 0
    assert np.load(tmp_path / "o" / "pixelate.npy").shape == (35, 32, 32, 3)
    bad = parser.parse_args([str(tmp_path / "src"), str(tmp_path / "o2"), "--corruptions", "nope"])
    assert cli.run(bad) == 2
    assert "unknown corruption 'nope'" in capsys.readouterr().err
    bad_sev = parser.parse_args([str(tmp_path / "src"), str(tmp_path / "o2"), "--severities", "0,9"])
    assert cli.run(bad_sev) == 2
    imnet = parser.parse_args([str(tmp_path / "src"), str(tmp_path / "o3"), "--layout", "imagenet"])
    assert cli.run(imnet) == 2
    assert "ImageFolder" in capsys.readouterr().err
    folder = tmp_path / "folder"
    _write_folder(folder)
    (folder / "cat" / "broken.png").write_bytes(b"not an image")  # an unreadable image: one line, exit 2
    assert cli.run(parser.parse_args([str(folder), str(tmp_path / "o4"), "--no-progress"])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "broken.png" in err[0]


def test_cli_imagenet_layout_auto(tmp_path):
    src = tmp_path / "src"
    _write_folder(src, size=(60, 48), per_class=2, ext=".jpg")
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(
        [str(src), str(tmp_path / "out"), "--corruptions", "brightness", "--severities", "3",
         "--resize", "40", "--crop", "32", "--no-progress"]
    )  # fmt: skip
    assert cli.run(args) == 0
    files = sorted((tmp_path / "out" / "brightness" / "3").rglob("*.jpg"))
    assert len(files) == 4 and Image.open(files[0]).size == (32, 32)


def test_python_m_corruptions_help():
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "corruptions", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "--severities" in res.stdout


def test_a_cifar_directory_is_resumed_only_from_the_same_source(tmp_path):
    from tta_norm.data.readers import DataFormatError, read_cifar_c

    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8) for _ in range(2))
    y = np.array([0, 1, 2, 3])
    out = tmp_path / "c"
    write_cifar_c(a, y, out, ["contrast", "fog"], severities=[5], progress=False)
    # other images of the same shape (CIFAR-100 after CIFAR-10): refused, naming what differs
    with pytest.raises(ValueError, match="source_sha256"):
        write_cifar_c(b, y, out, ["contrast"], severities=[5], progress=False)
    with pytest.raises(ValueError, match="source_sha256"):
        write_cifar_c(a, y[::-1].copy(), out, ["contrast"], severities=[5], progress=False)
    # overwrite starts a new dataset: fog.npy (from the old source) stays on disk but is no longer readable
    write_cifar_c(b, y, out, ["contrast"], severities=[5], progress=False, overwrite=True)
    assert np.array_equal(read_cifar_c(out, "contrast", [5])[5].images, corrupt(b, "contrast", 5))
    assert (out / "fog.npy").is_file()
    with pytest.raises(DataFormatError, match="not listed in manifest.json"):
        read_cifar_c(out, "fog", [5])


def test_an_interrupted_overwrite_leaves_no_old_file_readable(tmp_path, monkeypatch):
    from tta_norm.data.readers import DataFormatError, read_cifar_c

    rng = np.random.default_rng(1)
    a, b = (rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8) for _ in range(2))
    out = tmp_path / "c"
    write_cifar_c(a, [0, 1, 2, 3], out, ["contrast"], severities=[5], progress=False)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ds, "run_corruption", crash)
    with pytest.raises(KeyboardInterrupt):
        write_cifar_c(b, [3, 2, 1, 0], out, ["contrast"], severities=[5], progress=False, overwrite=True)
    with pytest.raises(DataFormatError, match="not listed"):  # old images under the new labels: never read
        read_cifar_c(out, "contrast", [5])


def test_imagenet_c_tree_refuses_other_settings_and_foreign_trees(tmp_path, monkeypatch):
    src = tmp_path / "src"
    _write_folder(src, size=(32, 32), per_class=2)
    out = tmp_path / "inc"
    kw = dict(preset="imagenet", resize=None, crop=None, progress=False, workers=1)
    assert write_imagenet_c(src, out, ["contrast"], [5], seed=0, **kw) == 4
    victim = out / "contrast" / "5" / "cat" / "001.jpg"
    with pytest.raises(ValueError, match="quality: 85 -> 10"):
        write_imagenet_c(src, out, ["contrast"], [5], seed=0, quality=10, **kw)
    with pytest.raises(ValueError, match="seed: 0 -> 1"):
        write_imagenet_c(src, out, ["contrast"], [5], seed=1, **kw)
    (src / "cat" / "003.png").write_bytes((src / "cat" / "001.png").read_bytes())  # the source changed
    with pytest.raises(ValueError, match="source_sha256"):
        write_imagenet_c(src, out, ["contrast"], [5], seed=0, **kw)
    (src / "cat" / "003.png").unlink()
    # overwrite rewrites every selected file with the new settings
    before = victim.read_bytes()
    assert write_imagenet_c(src, out, ["contrast"], [5], seed=0, quality=10, overwrite=True, **kw) == 4
    assert victim.read_bytes() != before
    # an interrupted overwrite must be finished with overwrite=True
    monkeypatch.setattr(ds, "run_corruption", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        write_imagenet_c(src, out, ["contrast"], [5], seed=0, overwrite=True, **kw)
    with pytest.raises(ValueError, match="overwrite was interrupted"):
        write_imagenet_c(src, out, ["contrast"], [5], seed=0, **kw)
    # a tree this generator did not write (no manifest) is not resumed into
    foreign = tmp_path / "release"
    (foreign / "contrast" / "5").mkdir(parents=True)
    with pytest.raises(ValueError, match="no manifest.json"):
        write_imagenet_c(src, foreign, ["contrast"], [5], seed=0, **kw)


def test_hidden_folders_and_files_are_not_classes_or_images(tmp_path):
    expected = _write_folder(tmp_path / "src")
    (tmp_path / "src" / ".ipynb_checkpoints").mkdir()
    (tmp_path / "src" / "cat" / "._001.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (tmp_path / "src" / "cat" / ".cache").mkdir()
    Image.fromarray(expected[0]).save(tmp_path / "src" / "cat" / ".cache" / "x.png")
    x, y, classes = load_image_folder(tmp_path / "src")
    assert classes == ("cat", "dog") and list(y) == [0, 0, 0, 1, 1, 1]
    assert np.array_equal(x, expected[[2, 1, 0, 5, 4, 3]])
    (tmp_path / "src" / "ant").mkdir()  # an empty class folder would shift every later label
    with pytest.raises(ValueError, match=r"class folders \['ant'\] hold no images"):
        load_image_folder(tmp_path / "src")


def test_a_planted_pickle_payload_is_refused_and_never_run(tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    d = tmp_path / "evil" / "cifar-10-batches-py"
    d.mkdir(parents=True)
    (d / "test_batch").write_bytes(pickle.dumps({"data": Payload(), "labels": [0]}))
    with pytest.raises(ValueError, match=r"refused global (posix|os)\.system.*nothing was run"):
        load_cifar_batches(tmp_path / "evil")
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    assert cli.run(parser.parse_args([str(tmp_path / "evil"), str(tmp_path / "out"), "--no-progress"])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nothing was run" in err[0]
    assert not marker.exists()


def _cli_run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return cli.run(parser.parse_args([*argv, "--no-progress", "--workers", "1"]))


def test_a_cifar_release_directory_without_manifest_is_not_written_into(tmp_path, capsys):
    rel = tmp_path / "release"  # a downloaded CIFAR-10-C: no manifest.json
    rel.mkdir()
    rng = np.random.default_rng(0)
    for name in ("gaussian_noise", "shot_noise"):
        np.save(rel / f"{name}.npy", rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8))
    np.save(rel / "labels.npy", np.tile(np.arange(4, dtype=np.uint8), 5))
    before = {p.name: p.read_bytes() for p in rel.iterdir()}
    x = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="holds files but no manifest.json"):
        write_cifar_c(x, [0, 1, 2], rel, ["gaussian_noise"], severities=[1], progress=False)
    src = tmp_path / "src"
    _write_folder(src)
    assert _cli_run([str(src), str(rel), "--corruptions", "gaussian_noise"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("tta-norm corrupt: error:") and "no manifest.json" in err[-1]
    assert {p.name: p.read_bytes() for p in rel.iterdir()} == before  # nothing written
    write_cifar_c(x, [0, 1, 2], rel, ["gaussian_noise"], severities=[1], progress=False, overwrite=True)
    assert json.loads((rel / "manifest.json").read_text())["files"] == {"gaussian_noise": [1]}


def test_an_image_folder_is_listed_as_tta_norms_reader_lists_it(tmp_path):
    from tta_norm.data.readers import list_image_folder

    src = tmp_path / "nest"
    rng = np.random.default_rng(0)
    for rel in ("b/0.png", "a/0.png", "a/extra/1.png", "a/extra/deeper/2.png", "a/B.PNG", "a/.hidden.png"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(src / rel, format="PNG")
    (src / "a" / "notes.txt").write_text("not an image")
    index = ds.index_image_folder(src)
    files, labels, classes = list_image_folder(src)
    assert index.classes == classes == ("a", "b")
    assert [str(index.root / f) for f in index.files] == [str(f) for f in files]
    assert index.files == ("a/0.png", "a/B.PNG", "b/0.png")  # a/extra/... is not read: not an image of 'a'
    assert np.array_equal(index.labels, labels)
    x, y, _ = load_image_folder(src)
    assert x.shape == (3, 32, 32, 3) and list(y) == [0, 0, 1]


def test_split_picks_the_train_or_test_tree_of_an_image_folder_dataset(tmp_path, capsys):
    root = tmp_path / "cifar10-jpeg"  # <root>/{train,test}/<class>/<image>, like ../shared/data/cifar10-jpeg
    _write_folder(root / "test", per_class=2)
    _write_folder(root / "train", per_class=3)
    train, _, _ = load_image_folder(root / "train")
    out = tmp_path / "out"
    assert _cli_run([str(root), str(out), "--corruptions", "contrast", "--severities", "1"]) == 0  # default test
    x, y, classes = load_image_folder(root / "test")
    assert classes == ("cat", "dog") and np.load(out / "contrast.npy").shape == (5 * 4, 32, 32, 3)
    perm = np.load(out / "permutation.npy")
    assert np.array_equal(np.load(out / "contrast.npy")[:4], corrupt(x[perm], "contrast", 1))
    assert np.array_equal(np.load(out / "labels.npy")[:4], y[perm])
    assert _cli_run([str(root), str(tmp_path / "tr"), "--split", "train", "--corruptions", "contrast"]) == 0
    perm = np.load(tmp_path / "tr" / "permutation.npy")
    assert np.array_equal(np.load(tmp_path / "tr" / "contrast.npy")[:6], corrupt(train[perm], "contrast", 1))
    x, y = ds.load_source(root, train=True)
    assert np.array_equal(x, train)
    capsys.readouterr()
    # a split of a plain ImageFolder tree, or one the directory lacks: one line, exit 2, nothing written
    for src, split in ((root / "test", "train"), (tmp_path / "only_train", "test")):
        if split == "test":
            _write_folder(src / "train")
        assert _cli_run([str(src), str(tmp_path / "bad"), "--split", split, "--corruptions", "contrast"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("tta-norm corrupt: error:") and split in err[0]
        assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize(
    ("data", "labels", "message"),
    [
        (np.full((4, 3072), 300, np.int64), [0, 1, 2, 3], r"'data' must be uint8 \(N, 3072\), got int64"),
        (np.zeros((4, 3072), np.float32), [0, 1, 2, 3], "got float32"),
        (np.zeros((2, 6144), np.uint8), [0, 1, 2, 3], r"got uint8 \(2, 6144\)"),  # 4 images' bytes, other shape
        (np.zeros(4 * 3072, np.uint8), [0, 1, 2, 3], r"got uint8 \(12288,\)"),
        ([[0] * 3072] * 4, [0, 1, 2, 3], "got int64"),  # a list: cast nothing
        (np.zeros((4, 3072), np.uint8), [0, 1, 2], "4 images but 'labels' is int64 \\(3,\\)"),
        (np.zeros((4, 3072), np.uint8), [0, 1, 2, 3, 4], "not 4 integers"),
        (np.zeros((4, 3072), np.uint8), [0.0, 1.5, 2.0, 3.0], "float64"),
        (np.zeros((4, 3072), np.uint8), [0, 1, 2, 10], r"must be in 0\.\.9, got 0\.\.10"),
        (np.zeros((4, 3072), np.uint8), [0, 1, -1, 3], r"got -1\.\.3"),
    ],
)
def test_a_cifar_batch_is_read_only_as_stored(tmp_path, capsys, data, labels, message):
    d = tmp_path / "lax" / "cifar-10-batches-py"
    d.mkdir(parents=True)
    with open(d / "test_batch", "wb") as f:
        pickle.dump({b"data": data, b"labels": labels}, f)
    with pytest.raises(ValueError, match=message):
        load_cifar_batches(tmp_path / "lax")
    assert _cli_run([str(tmp_path / "lax"), str(tmp_path / "out"), "--corruptions", "contrast"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tta-norm corrupt: error:") and "test_batch" in err[0]
    assert not (tmp_path / "out").exists()


def test_cifar100_fine_labels_range_up_to_99(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    (d / "meta").write_bytes(pickle.dumps({}))
    with open(d / "test", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [99, 100]}, f)
    with pytest.raises(ValueError, match=r"'fine_labels' must be in 0\.\.99"):
        load_cifar_batches(tmp_path)


def test_two_sources_with_one_output_name_are_refused_before_writing(tmp_path, capsys):
    src = tmp_path / "src" / "n01440764"
    src.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for ext in (".png", ".bmp"):  # both would be written as img1.jpg: one image would be lost
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(src / f"img1{ext}")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"img1\.bmp and .*img1\.png would both be written as n01440764/img1\.jpg"):
        write_imagenet_c(tmp_path / "src", out, ["contrast"], [1], resize=None, crop=None, progress=False)
    assert not out.exists()
    argv = [str(tmp_path / "src"), str(out), "--layout", "imagenet", "--resize", "0", "--crop", "0",
            "--corruptions", "contrast", "--severities", "1"]  # fmt: skip
    assert _cli_run(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "would both be written as" in err[0]
    assert not out.exists()


def test_a_decompression_bomb_or_running_out_of_memory_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    src = tmp_path / "src"
    _write_folder(src)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # a 32 x 32 image is over twice the limit: refused
    with pytest.raises(ValueError, match=r"001\.png: Image size \(1024 pixels\) exceeds limit"):
        ds.read_image(src / "cat" / "001.png")
    for layout in ("auto", "cifar", "imagenet"):
        assert _cli_run([str(src), str(tmp_path / "o"), "--layout", layout, "--corruptions", "contrast"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("tta-norm corrupt: error:") and "decompression bomb" in err[-1]
        assert not any(line.startswith("Traceback") for line in err)
    monkeypatch.undo()

    def no_memory(*args, **kwargs):
        raise MemoryError("Unable to allocate 28.6 GiB for an array with shape (10000000, 3072) and data type uint8")

    monkeypatch.setattr(ds, "run_corruption", no_memory)
    assert _cli_run([str(src), str(tmp_path / "o"), "--corruptions", "contrast"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "tta-norm corrupt: error: out of memory: Unable to allocate 28.6 GiB for an array with shape " \
        "(10000000, 3072) and data type uint8"  # fmt: skip
    monkeypatch.setattr(ds, "run_corruption", lambda *a, **k: (_ for _ in ()).throw(MemoryError()))
    assert _cli_run([str(src), str(tmp_path / "o2"), "--corruptions", "contrast"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "tta-norm corrupt: error: out of memory: MemoryError"
