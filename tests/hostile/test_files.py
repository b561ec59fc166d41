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


class _Reduced:
    """Pickles as ``factory(*args)`` followed by ``__setstate__(state)``: the shapes NumPy's own pickles take."""

    def __init__(self, factory, args, state=None) -> None:
        self.factory, self.args, self.state = factory, args, state

    def __reduce__(self):
        return (self.factory, self.args) if self.state is None else (self.factory, self.args, self.state)


def _object_field_dtype(name: str) -> _Reduced:
    """A dtype whose pickled state declares an object field at offset 0 (it then reports ``hasobject`` False,
    and NumPy reads the file's bytes as object pointers: a segmentation fault)."""
    return _Reduced(np.dtype, (name, False, True), (3, "|", None, ("a",), {"a": (np.dtype("O"), 0)}, 8, 1, 0))


@pytest.mark.parametrize("protocol", [2, 5])
@pytest.mark.parametrize("name", ["V8", "u1"])
def test_a_dtype_with_planted_object_fields_is_refused(tmp_path: Path, protocol: int, name: str) -> None:
    from numpy._core.numeric import _frombuffer

    root = tmp_path / "c10"
    root.mkdir()
    labels = _Reduced(_frombuffer, (b"A" * 16, _object_field_dtype(name), (2,), "C"))
    _plant(root / "test_batch", {b"data": np.zeros((2, 3072), np.uint8), b"labels": labels}, protocol)
    with pytest.raises(DataFormatError, match="refused numpy dtype"):
        read_cifar10_python(root, "test")


def test_an_array_over_zero_strides_is_refused(tmp_path: Path) -> None:
    """A 209-byte file made a (10**7, 3072) array over one byte: 28.6 GiB once copied."""
    root = tmp_path / "c10"
    root.mkdir()
    bomb = _Reduced(np.ndarray, ((10**7, 3072), np.dtype("u1"), b"\x07", 0, (0, 0)))
    _plant(root / "test_batch", {b"data": bomb, b"labels": [0]})
    assert (root / "test_batch").stat().st_size < 300
    with pytest.raises(DataFormatError, match="refused call of numpy.ndarray"):
        read_cifar10_python(root, "test")


@pytest.mark.parametrize("size", [2 * 3072 - 1, 2 * 3072 + 1])
def test_array_data_of_another_size_than_its_shape_is_refused(tmp_path: Path, size: int) -> None:
    from numpy._core.multiarray import _reconstruct

    root = tmp_path / "c10"
    root.mkdir()
    data = _Reduced(_reconstruct, (np.ndarray, (0,), b"b"), (1, (2, 3072), np.dtype("u1"), False, b"\x01" * size))
    _plant(root / "test_batch", {b"data": data, b"labels": [0, 1]})
    with pytest.raises(DataFormatError, match="bytes for shape"):
        read_cifar10_python(root, "test")


def test_python2_batches_with_latin1_strings_still_read(tmp_path: Path) -> None:
    """The released batches were written by Python 2: the pixels are a str, read back as latin-1."""
    from numpy._core.multiarray import _reconstruct

    root = tmp_path / "c10"
    root.mkdir()
    pixels = np.arange(2 * 3072).astype(np.uint8).reshape(2, 3072)
    state = (1, (2, 3072), np.dtype("u1"), False, pixels.tobytes().decode("latin1"))
    _plant(root / "test_batch", {"data": _Reduced(_reconstruct, (np.ndarray, (0,), "b"), state), "labels": [5, 6]})
    ds = read_cifar10_python(root, "test")
    assert ds.labels.tolist() == [5, 6]
    np.testing.assert_array_equal(ds.images[1].transpose(2, 0, 1).reshape(-1), pixels[1])
