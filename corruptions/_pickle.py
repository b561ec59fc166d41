"""CIFAR's python batches (``cifar-10-batches-py``, ``cifar-100-python``) read without running code.

The files are pickles, and a pickle can name any callable to run while it loads.  A CIFAR batch needs only
dicts, lists, bytes, str, numbers and uint8 NumPy arrays, so :class:`CifarUnpickler` builds those and refuses
every other global (``os.system``, ``builtins.eval``, any class) before it is called.  NumPy's own classes are
not handed to the file either: a dtype takes whatever state the pickle sets (object fields that read the file's
bytes as pointers) and ``ndarray`` builds arrays over any strides (a few bytes, gigabytes of array), so arrays
and scalars of plain number types are built here, each from exactly its own bytes in the file.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np


class CifarPickleError(ValueError):
    """A file that is not a plain CIFAR batch (nothing in it was run) or that is damaged."""


def _encode_latin1(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as Python-3 pickles of ``bytes`` (protocol <= 2) call it: strings only."""
    if not isinstance(text, str) or not isinstance(encoding, str):
        raise pickle.UnpicklingError("_codecs.encode with non-string arguments")
    return text.encode(encoding)


#: the dtypes a CIFAR batch holds (pixels, labels, counts): plain numbers, no fields, no sub-arrays, no objects
_PLAIN_KINDS = "biuf"


class _DtypeStub:
    """What a pickled ``numpy.dtype`` becomes while loading: its name and the state the pickle sets, turned into
    a real dtype by :meth:`dtype` only if that is a plain number type.  (A real ``np.dtype`` would take any state
    the file gives it: fields at arbitrary offsets, object fields that report ``hasobject == False``, so that raw
    bytes of the file are read as pointers.)"""

    def __init__(self, name: object, align: object = False, copy: object = False) -> None:
        if not isinstance(name, str):
            raise pickle.UnpicklingError("refused numpy dtype with a non-string name")
        self.name, self.state = name, None

    def __setstate__(self, state: object) -> None:
        self.state = state

    def dtype(self) -> np.dtype:
        try:
            dtype = np.dtype(self.name)
        except TypeError as err:
            raise pickle.UnpicklingError(f"refused numpy dtype {self.name!r}") from err
        if dtype.kind not in _PLAIN_KINDS or dtype.fields is not None or dtype.subdtype is not None:
            raise pickle.UnpicklingError(f"refused numpy dtype {self.name!r}: CIFAR data are plain numbers")
        state = self.state
        if state is None:
            return dtype
        if not (isinstance(state, tuple) and len(state) >= 5 and state[1] in ("<", ">", "|", "=")
                and state[2] is None and state[3] is None and state[4] is None):  # fmt: skip
            raise pickle.UnpicklingError(f"refused numpy dtype state {state!r}: CIFAR data are plain numbers")
        return dtype.newbyteorder(state[1]) if state[1] in ("<", ">") and dtype.itemsize > 1 else dtype


def _plain_dtype(dtype: object) -> np.dtype:
    if not isinstance(dtype, _DtypeStub):
        raise pickle.UnpicklingError("refused numpy data without a pickled dtype")
    return dtype.dtype()


def _raw_bytes(data: object) -> bytes:
    """The bytes of an array's data: ``bytes``, a protocol-5 buffer, or a Python-2 ``str`` (read as latin-1)."""
    if isinstance(data, str):
        return data.encode("latin1")
    if isinstance(data, (bytes, bytearray, pickle.PickleBuffer)):
        return bytes(memoryview(data))
    raise pickle.UnpicklingError(f"refused numpy data of type {type(data).__name__}")


def _shape(shape: object) -> tuple[int, ...]:
    if not (isinstance(shape, tuple) and all(type(n) is int and n >= 0 for n in shape)):
        raise pickle.UnpicklingError(f"refused numpy shape {shape!r}")
    return shape


def _from_bytes(data: object, dtype: object, shape: object, fortran: bool = False) -> np.ndarray:
    """A new array of ``shape`` from exactly ``prod(shape)`` items of the file's bytes (no view, no strides)."""
    raw, dt, dims = _raw_bytes(data), _plain_dtype(dtype), _shape(shape)
    count = int(np.prod(dims, dtype=np.int64)) if dims else 1
    if len(raw) != count * dt.itemsize:
        raise pickle.UnpicklingError(f"numpy data of {len(raw)} bytes for shape {dims} of {dt}")
    return np.frombuffer(raw, dtype=dt, count=count).reshape(dims, order="F" if fortran else "C").copy()


class _NdarrayName:
    """``numpy.ndarray`` as a pickle names it: only the class argument of ``_reconstruct``, never called (called,
    it would build an array over any buffer with any strides: a few bytes of file, gigabytes of array)."""

    def __call__(self, *args: object, **kwargs: object) -> None:
        raise pickle.UnpicklingError("refused call of numpy.ndarray (arrays are built from their own bytes only)")


_NDARRAY = _NdarrayName()


class _ArrayStub:
    """What ``_reconstruct`` returns: an empty array filled by the pickle's state (shape, dtype, data)."""

    def __init__(self) -> None:
        self.array: np.ndarray | None = None

    def __setstate__(self, state: object) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5) or self.array is not None:
            raise pickle.UnpicklingError("refused numpy array state")
        shape, dtype, fortran, data = state[-4:]
        self.array = _from_bytes(data, dtype, shape, fortran=bool(fortran))


def _reconstruct(cls: object, shape: object = (0,), code: object = b"b") -> _ArrayStub:
    if cls is not _NDARRAY:
        raise pickle.UnpicklingError("refused numpy reconstruction of a class other than ndarray")
    return _ArrayStub()


def _array_scalar(dtype: object, data: object = b"") -> np.generic:
    """``numpy`` scalar reconstruction (a plain number type, exactly one item of data)."""
    return _from_bytes(data, dtype, ())[()]


def _array_from_buffer(buf: object, dtype: object, shape: object, order: object = "C") -> np.ndarray:
    """``numpy``'s protocol-5 array reconstruction."""
    if order not in ("C", "F"):
        raise pickle.UnpicklingError(f"refused numpy order {order!r}")
    return _from_bytes(buf, dtype, shape, fortran=order == "F")


#: the only globals a CIFAR pickle may name: NumPy arrays and scalars of plain number types (built by the
#: functions above from the file's bytes, never by NumPy's own reconstructors) and bytes decoding
PICKLE_GLOBALS = {
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _DtypeStub,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "scalar"): _array_scalar,
    ("numpy._core.multiarray", "scalar"): _array_scalar,
    ("numpy.core.numeric", "_frombuffer"): _array_from_buffer,
    ("numpy._core.numeric", "_frombuffer"): _array_from_buffer,
    ("_codecs", "encode"): _encode_latin1,
}


def _finished(obj: object) -> object:
    """``obj`` with every loaded array in place of its stub; a stub left unfilled, or a bare dtype, is refused."""
    if isinstance(obj, _ArrayStub):
        if obj.array is None:
            raise pickle.UnpicklingError("refused numpy array without data")
        return obj.array
    if isinstance(obj, (_DtypeStub, _NdarrayName)):
        raise pickle.UnpicklingError("refused bare numpy dtype or class: CIFAR data are arrays and numbers")
    if isinstance(obj, dict):
        return {_finished(k): _finished(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finished(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_finished(v) for v in obj)
    return obj


class CifarUnpickler(pickle.Unpickler):
    """An unpickler that builds only builtin containers, bytes, str, numbers and NumPy arrays: any other global
    (``os.system``, ``builtins.eval``, a class) is refused before it is called."""

    def find_class(self, module: str, name: str) -> object:
        found = PICKLE_GLOBALS.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(
                f"refused global {module}.{name}: a CIFAR batch holds only lists, dicts, bytes, str, numbers "
                "and NumPy arrays"
            )
        return found

    def persistent_load(self, pid: object) -> object:
        raise pickle.UnpicklingError("refused persistent id: a CIFAR batch has none")


def load_cifar_pickle(path: str | os.PathLike) -> dict:
    """The dict in CIFAR batch file ``path`` (keys decoded to str), read with :class:`CifarUnpickler`.

    Raises :class:`FileNotFoundError` for a missing file and :class:`CifarPickleError` (one line) for a file that
    names anything but plain data (nothing was run) or that is truncated or not a pickled dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing CIFAR batch file {path}")
    try:
        with open(path, "rb") as f:
            obj = _finished(CifarUnpickler(f, encoding="latin1").load())
    except pickle.UnpicklingError as err:
        if "refused" in str(err):
            raise CifarPickleError(f"{path} is not a plain CIFAR batch ({err}); nothing was run") from err
        raise CifarPickleError(f"could not unpickle {path}: {err} (truncated or not a CIFAR batch?)") from err
    except Exception as err:
        raise CifarPickleError(f"could not unpickle {path}: {err} (truncated or not a CIFAR batch?)") from err
    if not isinstance(obj, dict):
        raise CifarPickleError(f"{path}: expected a dict, got {type(obj).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}
