"""Natural distribution shifts of ImageNet as benchmark domains: ImageNet-R, ImageNet-A, ImageNet-Sketch.

Each is read from its release folder, ``<root>/<wnid>/<image>`` (ImageFolder layout), found in the data
search list (:mod:`tta_norm.data.paths`) under its usual names:

=================== ============================================== ========= =====================================
dataset             folder names searched                           classes   labels / model outputs
=================== ============================================== ========= =====================================
``imagenet_r``      ``imagenet-r``, ``ImageNet-R``, ``imagenet_r``   200       position in the sorted 200 wnids;
                                                                              the model's matching 200 logits
``imagenet_a``      ``imagenet-a``, ``ImageNet-A``, ``imagenet_a``   200       as for ImageNet-R
``imagenet_sketch`` ``imagenet-sketch``, ``ImageNet-Sketch``,       1000      ImageNet-1k index; all 1,000 logits
                    ``ImageNet-Sketch/sketch``, ``sketch``
=================== ============================================== ========= =====================================

Images are decoded with the usual ImageNet evaluation transform, resize of the short side to 256 and a
224 x 224 center crop, and cached like every ImageFolder source; ``n_examples`` draws a seeded
class-stratified subset before decoding.  Sources: Hendrycks et al., "The Many Faces of Robustness" (ICCV
2021, ImageNet-R), "Natural Adversarial Examples" (CVPR 2021, ImageNet-A); Wang et al., "Learning Robust
Global Representations by Penalizing Local Predictive Power" (NeurIPS 2019, ImageNet-Sketch).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from tta_norm.data.imagenet_classes import (
    IMAGENET_A_WNIDS,
    IMAGENET_R_WNIDS,
    IMAGENET_WNIDS,
    imagenet_index,
    output_indices,
)
from tta_norm.data.paths import describe_search, find_dataset_dir
from tta_norm.data.readers import ArrayDataset, read_image_folder

_WNID = re.compile(r"^n\d{8}$")


@dataclass(frozen=True)
class NaturalShift:
    """A natural-shift test set: its name, release folder names and class wnids (label order)."""

    name: str
    folders: tuple[str, ...]
    wnids: tuple[str, ...]

    @property
    def output_indices(self) -> list[int] | None:
        """The ImageNet-1k logits its labels correspond to (``None``: all 1,000 in order)."""
        return None if self.wnids == IMAGENET_WNIDS else output_indices(self.wnids)


NATURAL_SHIFTS: dict[str, NaturalShift] = {
    "imagenet_r": NaturalShift("imagenet_r", ("imagenet-r", "ImageNet-R", "imagenet_r"), IMAGENET_R_WNIDS),
    "imagenet_a": NaturalShift("imagenet_a", ("imagenet-a", "ImageNet-A", "imagenet_a"), IMAGENET_A_WNIDS),
    "imagenet_sketch": NaturalShift(
        "imagenet_sketch",
        ("imagenet-sketch", "ImageNet-Sketch", "imagenet_sketch", "ImageNet-Sketch/sketch", "sketch"),
        IMAGENET_WNIDS,
    ),
}


def natural_shift(name: str) -> NaturalShift | None:
    """The :class:`NaturalShift` called ``name`` (``imagenet-r`` and ``imagenet_r`` alike), else ``None``."""
    return NATURAL_SHIFTS.get(str(name).lower().replace("-", "_"))


def dataset_output_indices(dataset: str) -> list[int] | None:
    """The ImageNet-1k logits a benchmark ``dataset`` is evaluated on: the 200 classes of ImageNet-R /
    ImageNet-A (in label order), ``None`` for every other dataset (all outputs)."""
    shift = natural_shift(dataset)
    return shift.output_indices if shift is not None else None


def _is_wnid_folder(path: Path) -> bool:
    try:
        return any(e.is_dir() and _WNID.match(e.name) for e in os.scandir(path))
    except OSError:
        return False


def find_natural_shift(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """The release folder of natural-shift set ``name`` in the data search list (FileNotFoundError naming
    the searched directories and folder names otherwise)."""
    shift = natural_shift(name)
    if shift is None:
        raise ValueError(f"unknown natural-shift dataset {name!r}; choose from {', '.join(NATURAL_SHIFTS)}")
    others = [f for other in NATURAL_SHIFTS.values() if other is not shift for f in other.folders]
    root = find_dataset_dir(shift.folders, _is_wnid_folder, data_dir, others=others)
    if root is None:
        raise FileNotFoundError(
            f"{shift.name} release folder ({' / '.join(shift.folders)} with <wnid>/ class folders) not found; "
            f"{describe_search(data_dir)}"
        )
    return root


def read_natural_shift(
    name: str,
    root: str | os.PathLike | None = None,
    *,
    n_examples: int | None = None,
    seed: int = 0,
    size: int | None = 256,
    crop: int | None = 224,
    data_dir: str | os.PathLike | None = None,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> ArrayDataset:
    """Natural-shift set ``name`` from ``root`` (default: found with :func:`find_natural_shift`), labels in
    its own class order (see the module docstring), ``n_examples`` a seeded class-stratified subset chosen
    before decoding.  Class folders that are not classes of the set are an error."""
    shift = natural_shift(name)
    if shift is None:
        raise ValueError(f"unknown natural-shift dataset {name!r}; choose from {', '.join(NATURAL_SHIFTS)}")
    root = Path(root) if root is not None else find_natural_shift(shift.name, data_dir)
    class_index = {w: i for i, w in enumerate(shift.wnids)}
    ds = read_image_folder(root, size=size, crop=crop, n_examples=n_examples, seed=seed, class_index=class_index,
                           cache=cache, cache_dir=cache_dir, progress=progress)  # fmt: skip
    ds.source = f"release:{root}"
    ds.info["dataset"] = shift.name
    return ds


#: conventional names of the clean ImageNet-1k validation set as ``<wnid>/`` class folders
IMAGENET_VAL_FOLDERS: tuple[str, ...] = ("imagenet/val", "ImageNet/val", "imagenet-val", "ILSVRC2012_img_val")


def find_imagenet_val(data_dir: str | os.PathLike | None = None) -> Path:
    """The clean ImageNet-1k validation folder in the data search list (``FileNotFoundError`` otherwise)."""
    root = find_dataset_dir(IMAGENET_VAL_FOLDERS, _is_wnid_folder, data_dir)
    if root is None:
        raise FileNotFoundError(
            f"the clean ImageNet validation set ({' / '.join(IMAGENET_VAL_FOLDERS)} with <wnid>/ class folders) "
            f"was not found; {describe_search(data_dir)}"
        )
    return root


def read_imagenet_val(
    n_examples: int,
    *,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> ArrayDataset:
    """A seeded class-stratified subset of ``n_examples`` clean ImageNet-1k validation images (chosen before
    decoding), short side resized to 256 and center-cropped to 224 as ImageNet-C's images were made, labels the
    ImageNet-1k indices of the ``<wnid>/`` folders.  The source images of EATA's Fisher weights on ImageNet and
    its natural shifts (``mr-eggplant/EATA`` ``main.py`` draws them from the clean validation set)."""
    root = find_imagenet_val(data_dir)
    ds = read_image_folder(root, size=256, crop=224, n_examples=n_examples, seed=seed, class_index=imagenet_index(),
                           progress=progress)  # fmt: skip
    ds.source = f"clean:{root}"
    return ds


def restrict_outputs(model: nn.Module, dataset: str) -> nn.Module:
    """``model`` evaluated on ``dataset``'s classes: wrapped in :class:`tta_norm.models.LogitSubset` for
    ImageNet-R / ImageNet-A (200 logits in label order), unchanged for every other dataset."""
    indices = dataset_output_indices(dataset)
    if indices is None:
        return model
    from tta_norm.models.wrappers import LogitSubset

    return LogitSubset(model, indices)
