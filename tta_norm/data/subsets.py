"""Which images of a large test set are evaluated: seeded class-stratified subsets and fixed id lists.

Both are decided from the file list alone, before any image is decoded, so a 5,000-image subset of a
50,000-image ImageNet-C domain decodes 5,000 images.  The same file list, ``n`` and seed give the same subset
in every domain of a benchmark (ImageNet-C folders hold the same file names for every corruption/severity).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np

ROBUSTBENCH_IDS = "robustbench"
ROBUSTBENCH_IDS_FILE = ("helper_files", "imagenet_test_image_ids.txt")


def stratified_subset(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Indices of ``n`` of the samples with ``labels``, drawn per class in proportion to the class sizes
    (largest-remainder rounding, ties broken at random), returned in a seeded random order so that every
    prefix mixes the classes.

    With equal class sizes every class gets ``n // K`` or ``n // K + 1`` samples; with ``n < K`` a seeded
    random choice of ``n`` classes gets one each.  Deterministic in ``(labels, n, seed)``."""
    labels = np.asarray(labels)
    total = len(labels)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= total:
        raise ValueError(f"n_examples must be an integer in 1..{total} (the number of images), got {n!r}")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = n * counts / total
    take = np.floor(quota).astype(np.int64)
    left = int(n - take.sum())
    if left:
        # largest fractional remainder first; a random key breaks ties (equal class sizes: a random choice)
        order = np.lexsort((rng.random(len(classes)), -(quota - take)))
        take[order[:left]] += 1
    chosen = []
    for cls, k in zip(classes, take, strict=True):
        if k:
            members = np.flatnonzero(labels == cls)
            chosen.append(rng.choice(members, size=int(k), replace=False))
    picked = np.concatenate(chosen)
    return picked[rng.permutation(len(picked))].astype(np.int64)


def robustbench_ids_file() -> Path:
    """The 5,000-image ImageNet id list shipped inside an installed robustbench package (located without
    importing robustbench, whose import needs extra packages)."""
    spec = importlib.util.find_spec("robustbench")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "imagenet_ids: robustbench needs the robustbench package installed (its "
            "helper_files/imagenet_test_image_ids.txt); otherwise give the path of an id list file"
        )
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*ROBUSTBENCH_IDS_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"the installed robustbench has no id list at {path}; give an id list file instead")
    return path


def read_image_ids(spec: str | os.PathLike) -> list[str]:
    """Image ids ``"<wnid>/<file>"`` in file order from an id list (one id a line, optionally followed by a
    label column, as robustbench's ``imagenet_test_image_ids.txt``); ``"robustbench"`` reads the list of the
    installed robustbench package."""
    path = robustbench_ids_file() if str(spec) == ROBUSTBENCH_IDS else Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"image id list not found: {path} (give robustbench or a file of <wnid>/<file> lines)")
    ids = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        first = line.split()[0].replace("\\", "/")
        if "/" not in first:
            raise ValueError(f"{path}:{number}: expected '<class>/<file>' (optionally a label after it), got {line!r}")
        ids.append(first)
    if not ids:
        raise ValueError(f"image id list {path} is empty")
    if len(set(ids)) != len(ids):
        raise ValueError(f"image id list {path} repeats ids")
    return ids
