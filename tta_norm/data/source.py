"""The source domain of a model: an ImageFolder dataset directory with ``train/`` and ``test/`` splits.

The shipped source is the JPEG-75 CIFAR-10 mirror ``cifar10-jpeg`` (found through the data search list of
:mod:`tta_norm.data.paths`); training, fitting (TTN, SaBN heads) and Fisher estimation read their clean images
from it.
"""

from __future__ import annotations

import os
from pathlib import Path

from tta_norm.data.paths import describe_search, find_dataset_dir
from tta_norm.data.readers import CIFAR10_CLASSES, ArrayDataset, is_image_folder_split, read_image_folder

DEFAULT_SOURCE = "cifar10-jpeg"

#: source directories whose class folders are labelled by name (in the dataset's label order), not by position
NAMED_CLASSES: dict[str, tuple[str, ...]] = {"cifar10-jpeg": CIFAR10_CLASSES}


def find_source_root(data_dir: str | os.PathLike | None = None, source: str = DEFAULT_SOURCE) -> Path:
    """The ImageFolder dataset directory (with ``train/`` and ``test/``) named ``source`` in the search list."""
    root = find_dataset_dir([source], is_image_folder_split, data_dir)
    if root is None:
        raise FileNotFoundError(
            f"source ImageFolder {source!r} (with train/ and test/) not found; {describe_search(data_dir)}"
        )
    return root


def load_split(root: Path, split: str, progress: bool = True) -> ArrayDataset:
    """Split ``split`` (``"train"`` or ``"test"``) of the source directory ``root``, decoded once and cached as
    uint8 NHWC (:func:`tta_norm.data.read_image_folder`).  A directory named in :data:`NAMED_CLASSES` is
    labelled by folder name (a folder that is not one of its classes is an error), any other by folder position."""
    path = root / split
    if not path.is_dir():
        raise FileNotFoundError(f"{path} not found (expected {root}/{{train,test}}/<class>/<image>)")
    names = NAMED_CLASSES.get(root.name)
    class_index = None if names is None else {c: i for i, c in enumerate(names)}
    return read_image_folder(path, class_index=class_index, progress=progress)
