"""Hostile files: planted CIFAR pickles never run code."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from tta_norm.data.readers import DataFormatError, read_cifar10_python, read_cifar100_python


class _Payload:
    """Unpickling this runs ``os.system`` (the classic pickle exploit)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _plant(path: Path, obj: object, protocol: int = 2) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


@pytest.mark.parametrize("protocol", [2, 5])
def test_planted_os_system_payload_is_refused_without_running(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "pwned"
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    data = np.zeros((2, 3072), np.uint8)
    _plant(root / "test_batch", {"data": data, "labels": _Payload(f"touch {marker}")}, protocol)
    with pytest.raises(DataFormatError, match=r"refused global .*system.*nothing was run"):
        read_cifar10_python(root, "test")
    assert not marker.exists()


def test_payload_in_meta_file_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    root = tmp_path / "c10"
    root.mkdir()
    _plant(root / "test_batch", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]})
    _plant(root / "batches.meta", {b"label_names": _Payload(f"touch {marker}")})
    with pytest.raises(DataFormatError, match="refused global"):
        read_cifar10_python(root, "test")
    assert not marker.exists()


def test_eval_and_classes_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "c100"
    root.mkdir()
    _plant(root / "test", {"data": np.zeros((1, 3072), np.uint8), "fine_labels": [0], "x": Path("/")}, 4)
    with pytest.raises(DataFormatError, match="refused global"):
        read_cifar100_python(root, "test")


def test_object_arrays_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "c10"
    root.mkdir()
    _plant(root / "test_batch", {"data": np.array([[1, "a"]], dtype=object), "labels": [0]}, 5)
    with pytest.raises(DataFormatError):
        read_cifar10_python(root, "test")


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_plain_batches_still_read(tmp_path: Path, protocol: int) -> None:
    root = tmp_path / "c10"
    root.mkdir()
    data = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    _plant(root / "test_batch", {b"batch_label": b"b", b"data": data, b"labels": [3, 4], b"n": np.int64(2)}, protocol)
    _plant(root / "batches.meta", {b"label_names": [f"c{i}" for i in range(10)], b"k": 1.5}, protocol)
    ds = read_cifar10_python(root, "test")
    assert ds.images.shape == (2, 32, 32, 3)
    assert ds.labels.tolist() == [3, 4]
    np.testing.assert_array_equal(ds.images[1].transpose(2, 0, 1).reshape(-1), data[1])
