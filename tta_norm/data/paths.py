"""Where data, checkpoints and caches live.

Search order for datasets (first hit wins):

1. the ``data_dir`` argument (the CLI's ``--data-dir``), if given: *only* that directory is searched;
2. otherwise the environment variable ``TTA_NORM_DATA`` (one directory or several joined by ``os.pathsep``),
   if set: only those directories are searched;
3. otherwise the default list :func:`default_data_dirs`:
   ``./data``, ``../shared/data`` (both relative to the current directory), ``<repo>/data``,
   ``<repo>/../shared/data`` (``<repo>`` = the checkout this package was imported from, so a fresh clone
   beside ``shared/`` finds ``shared/data/cifar10-jpeg`` without flags), and ``<cache>/data``.

A search directory contains datasets under their conventional names (``cifar10-jpeg``, ``cifar-10-batches-py``,
``cifar-100-python``, ``CIFAR-10-C``, ``CIFAR-100-C``, ``ImageNet-C``); an explicitly given directory may also be
the dataset itself (e.g. ``--data-dir ../shared/data/cifar10-jpeg``).

Caches (decoded image arrays, regenerated benchmarks, trained checkpoints) live outside the repository under
``TTA_NORM_CACHE`` (default ``~/.cache/tta_norm``): ``<cache>/data`` and ``<cache>/checkpoints`` (the latter
overridable with ``TTA_NORM_CHECKPOINTS``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

ENV_DATA = "TTA_NORM_DATA"
ENV_CACHE = "TTA_NORM_CACHE"
ENV_CHECKPOINTS = "TTA_NORM_CHECKPOINTS"
ENV_MODELS = "TTA_NORM_MODELS"

PathLike = str | os.PathLike


def repo_root() -> Path | None:
    """The source checkout this package was imported from (``None`` for a non-editable install)."""
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file() and (root / "tta_norm").is_dir():
        return root
    return None


def cache_root() -> Path:
    """``$TTA_NORM_CACHE`` or ``~/.cache/tta_norm``."""
    env = os.environ.get(ENV_CACHE)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tta_norm"


def data_cache_dir() -> Path:
    """Directory for decoded arrays and regenerated benchmarks (``<cache>/data``)."""
    return cache_root() / "data"


def checkpoint_dir() -> Path:
    """Directory for trained checkpoints (``$TTA_NORM_CHECKPOINTS`` or ``<cache>/checkpoints``)."""
    env = os.environ.get(ENV_CHECKPOINTS)
    return Path(env).expanduser() if env else cache_root() / "checkpoints"


def _split_env(value: str) -> list[Path]:
    return [Path(p).expanduser() for p in value.split(os.pathsep) if p]


def _unique(paths: Iterable[Path]) -> list[Path]:
    seen: set[str] = set()
    out = []
    for p in paths:
        key = os.path.abspath(p)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def default_data_dirs() -> list[Path]:
    """The documented default search list (see the module docstring)."""
    cwd = Path.cwd()
    dirs = [cwd / "data", cwd.parent / "shared" / "data"]
    root = repo_root()
    if root is not None:
        dirs += [root / "data", root.parent / "shared" / "data"]
    dirs.append(data_cache_dir())
    return _unique(dirs)


def data_search_dirs(data_dir: PathLike | None = None) -> list[Path]:
    """Directories searched for datasets: ``data_dir``, else ``$TTA_NORM_DATA``, else the defaults."""
    if data_dir is not None:
        return [Path(data_dir).expanduser()]
    env = os.environ.get(ENV_DATA)
    if env:
        return _split_env(env)
    return default_data_dirs()


def download_dir(data_dir: PathLike | None = None) -> Path:
    """Where a downloaded release is saved so that the search finds it next time: ``data_dir``, else the first
    ``$TTA_NORM_DATA`` directory, else ``<cache>/data`` (one of the defaults)."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env_dirs = _split_env(os.environ.get(ENV_DATA) or "")
    return env_dirs[0] if env_dirs else data_cache_dir()


def model_search_dirs() -> list[Path]:
    """Directories searched for released checkpoints: ``$TTA_NORM_MODELS`` then ``../shared/models``
    (relative to the current directory and to the repository) and the checkpoint cache."""
    dirs: list[Path] = []
    env = os.environ.get(ENV_MODELS)
    if env:
        dirs += _split_env(env)
    cwd = Path.cwd()
    dirs += [cwd.parent / "shared" / "models", cwd / "shared" / "models", cwd / "models"]
    root = repo_root()
    if root is not None:
        dirs.append(root.parent / "shared" / "models")
    dirs.append(checkpoint_dir())
    return _unique(dirs)


def folder_key(name: str) -> str:
    """A dataset folder name compared loosely: ``CIFAR-10-C``, ``cifar10_c`` and ``cifar-10-c`` alike."""
    return name.rsplit("/", 1)[-1].lower().replace("_", "-").replace("-", "")


def find_dataset_dir(
    names: Sequence[str],
    is_dataset: Callable[[Path], bool],
    data_dir: PathLike | None = None,
    *,
    others: Iterable[str] = (),
) -> Path | None:
    """First directory in the search list that is a dataset (``is_dataset(path)``) under one of its
    conventional ``names``, or itself when the directory was given explicitly (``data_dir`` or
    ``$TTA_NORM_DATA``; default directories such as ``./data`` are only containers), unless it is named
    as another dataset (``others``: their conventional names; ``CIFAR-10-C`` is never read as CIFAR-100-C).
    ``None`` if nothing matches."""
    explicit = data_dir is not None or bool(os.environ.get(ENV_DATA))
    refused = {folder_key(n) for n in others} - {folder_key(n) for n in names}
    for base in data_search_dirs(data_dir):
        if not base.is_dir():
            continue
        if explicit and folder_key(base.name) not in refused and is_dataset(base):
            return base
        for name in names:
            cand = base / name
            if cand.is_dir() and is_dataset(cand):
                return cand
    return None


def describe_search(data_dir: PathLike | None = None) -> str:
    """Human-readable list of searched directories, for error messages."""
    how = (
        "--data-dir" if data_dir is not None else (f"${ENV_DATA}" if os.environ.get(ENV_DATA) else "defaults")
    )
    return f"searched ({how}): " + ", ".join(str(p) for p in data_search_dirs(data_dir))
