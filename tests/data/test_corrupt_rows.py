"""``tta-norm corrupt`` on an ImageFolder writes class-mixed rows: the bench's fixed permutation, recorded."""

from __future__ import annotations

import argparse
import json

import numpy as np

from corruptions import cli
from corruptions.datasets import class_mixing_permutation
from tests.data.conftest import write_tree
from tta_norm.data.benchmark import _interleave_classes, regenerate_domain
from tta_norm.data.readers import read_image_folder


def _robustbench_style_read(root, corruption: str, n_examples: int, severity: int = 5):
    """What ``robustbench.data.load_cifar10c(n_examples, severity, corruptions=[c])`` reads: the first
    ``n_examples`` rows of the severity block of ``<c>.npy`` and of ``labels.npy`` (REFERENCE part 3, 3.2)."""
    labels = np.load(root / "labels.npy")
    n_total = len(labels) // 5
    images = np.load(root / f"{corruption}.npy")
    block = slice((severity - 1) * n_total, (severity - 1) * n_total + n_examples)
    return images[block], labels[block]


def _run_corrupt(src, out, *extra):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return cli.run(parser.parse_args([str(src), str(out), "--no-progress", "--workers", "1", *extra]))


def test_corrupt_image_folder_prefix_mixes_classes(tmp_path):
    classes = [f"class{i}" for i in range(5)]
    write_tree(tmp_path / "test", classes, 12, size=(32, 32))
    assert _run_corrupt(tmp_path / "test", tmp_path / "C", "--corruptions", "brightness", "--severities", "5") == 0
    _, labels = _robustbench_style_read(tmp_path / "C", "brightness", n_examples=10)
    assert len(set(labels.tolist())) >= 3  # class order would give class 0 only
    perm = np.load(tmp_path / "C" / "permutation.npy")
    assert np.array_equal(perm, class_mixing_permutation(60))
    assert json.loads((tmp_path / "C" / "manifest.json").read_text())["settings"]["row_order"] == "permutation.npy"


def test_corrupt_rows_equal_the_bench_regeneration(tmp_path):
    write_tree(tmp_path / "test", ["a", "b", "c"], 6, size=(32, 32))
    assert _run_corrupt(tmp_path / "test", tmp_path / "C", "--corruptions", "contrast", "--severities", "3",
                        "--seed", "4") == 0  # fmt: skip
    clean = _interleave_classes(read_image_folder(tmp_path / "test", cache=False, progress=False))
    regen = regenerate_domain(clean, "contrast", 3, tmp_path / "regen", seed=4)
    written = np.load(tmp_path / "C" / "contrast.npy")[2 * 18 : 3 * 18]
    assert np.array_equal(written, np.asarray(regen.images))  # the same permutation and bytes as the bench
    assert np.array_equal(np.load(tmp_path / "C" / "labels.npy")[:18], regen.labels)


def test_resume_with_the_old_class_order_is_refused(tmp_path, capsys):
    write_tree(tmp_path / "test", ["a", "b"], 4, size=(32, 32))
    out = tmp_path / "C"
    out.mkdir()
    old = {"settings": {"seed": 0, "preset": "cifar", "n": 8, "shape": [32, 32], "layout": "cifar"}, "files": {}}
    (out / "manifest.json").write_text(json.dumps(old))
    assert _run_corrupt(tmp_path / "test", out, "--corruptions", "contrast", "--severities", "1") == 2
    assert "overwrite" in capsys.readouterr().err
