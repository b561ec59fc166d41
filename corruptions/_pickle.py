"""CIFAR's python batches (``cifar-10-batches-py``, ``cifar-100-python``) read without running code.

The files are pickles, and a pickle can name any callable to run while it loads.  A CIFAR batch needs only
dicts, lists, bytes, str, numbers and uint8 NumPy arrays, so :class:`CifarUnpickler` builds those and refuses
every other global (``os.system``, ``builtins.eval``, any class) before it is called.
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


def _array_scalar(dtype: np.dtype, data: bytes = b"") -> np.generic:
    """``numpy`` scalar reconstruction, refused for object dtypes (their bytes would be raw pointers)."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise pickle.UnpicklingError("numpy scalar of an object dtype")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _array_from_buffer(buf: object, dtype: np.dtype, shape: tuple[int, ...], order: str = "C") -> np.ndarray:
    """``numpy``'s protocol-5 array reconstruction, refused for object dtypes."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject or order not in ("C", "F"):
        raise pickle.UnpicklingError("numpy array of an object dtype")
    return np.frombuffer(buf, dtype=dtype).reshape(shape, order=order)  # type: ignore[call-overload]


_RECONSTRUCT = np.zeros(0).__reduce__()[0]  # numpy's array reconstructor (its module moved in NumPy 2)

#: the only globals a CIFAR pickle may name: NumPy array reconstruction (no object dtypes) and bytes decoding
PICKLE_GLOBALS = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.multiarray", "scalar"): _array_scalar,
    ("numpy._core.multiarray", "scalar"): _array_scalar,
    ("numpy.core.numeric", "_frombuffer"): _array_from_buffer,
    ("numpy._core.numeric", "_frombuffer"): _array_from_buffer,
    ("_codecs", "encode"): _encode_latin1,
}


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
            obj = CifarUnpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as err:
        if "refused" in str(err):
            raise CifarPickleError(f"{path} is not a plain CIFAR batch ({err}); nothing was run") from err
        raise CifarPickleError(f"could not unpickle {path}: {err} (truncated or not a CIFAR batch?)") from err
    except Exception as err:
        raise CifarPickleError(f"could not unpickle {path}: {err} (truncated or not a CIFAR batch?)") from err
    if not isinstance(obj, dict):
        raise CifarPickleError(f"{path}: expected a dict, got {type(obj).__name__}")
    for value in obj.values():
        if isinstance(value, np.ndarray) and value.dtype.hasobject:
            raise CifarPickleError(f"{path}: NumPy arrays of Python objects are not CIFAR data")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}
