"""Writing a file all at once: readers see the old file or the new one, never a part."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def unwritable_ancestor(directory: str | os.PathLike) -> Path | None:
    """The nearest existing path at or above ``directory`` when it is not a directory this process can create
    entries in (so ``directory`` cannot be written into, or made); ``None`` when it can be."""
    directory = Path(directory)
    existing = next((p for p in (directory, *directory.parents) if p.exists()), None)
    if existing is not None and (not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK)):
        return existing
    return None


def write_atomically(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` into a temporary file beside ``path`` (its parents created), then ``os.replace`` it over
    ``path``.  If ``write`` or the rename fails, ``path`` is as it was and the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # unique per process: concurrent writers never share it
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
