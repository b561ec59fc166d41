"""Small data helpers shared by the post-training routines (input conventions, seeded subsets)."""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import Tensor

from tta_norm.data.tensors import to_float_nchw

ImageArray = np.ndarray | Tensor


def as_image_tensor(images: ImageArray) -> Tensor:
    """Images as a CPU tensor: uint8 NHWC (the data readers' format) or float NCHW in [0, 1], kept as is."""
    t = torch.as_tensor(np.asarray(images)) if isinstance(images, np.ndarray) else images
    if t.dim() != 4:
        raise ValueError(f"expected a 4-D image batch (uint8 NHWC or float NCHW), got shape {tuple(t.shape)}")
    if t.dtype != torch.uint8 and not t.is_floating_point():
        raise TypeError(f"images must be uint8 NHWC or float NCHW, got dtype {t.dtype}")
    return t


def to_model_input(batch: Tensor, device: torch.device) -> Tensor:
    """A uint8 NHWC batch -> contiguous float32 NCHW in [0, 1] on ``device``; float batches are only moved."""
    if batch.dtype == torch.uint8:
        return to_float_nchw(batch.to(device))
    return batch.to(device, torch.float32)


def as_labels(labels: np.ndarray | Tensor | list[int], n: int) -> Tensor:
    """Class indices as a CPU int64 tensor of shape ``(n,)``."""
    y = labels if isinstance(labels, Tensor) else torch.as_tensor(np.asarray(labels))
    y = y.to(torch.long).cpu()
    if y.shape != (n,):
        raise ValueError(f"expected {n} labels of shape ({n},), got shape {tuple(y.shape)}")
    return y


def seeded_subset(n_total: int, n: int | None, seed: int) -> np.ndarray:
    """Indices of ``n`` samples of ``range(n_total)`` from a seeded permutation (the mirror is class-sorted, so
    never take the first n)."""
    perm = np.random.default_rng(seed).permutation(n_total)
    return perm if n is None or n >= n_total else perm[:n]


def load_source_split(
    split: str = "train",
    n: int | None = None,
    *,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    source: str = "cifar10-jpeg",
    offset: int = 0,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images (uint8 NHWC) and labels of ``<source>/<split>`` chosen by a seeded permutation.

    ``offset`` skips the first ``offset`` images of the permutation: two calls with the same seed and
    non-overlapping ``[offset, offset + n)`` ranges give disjoint sets (a fitting set and a held-out set)."""
    from tta_norm.data.source import find_source_root, load_split

    data = load_split(find_source_root(data_dir, source), split, progress)
    perm = seeded_subset(len(data), None, seed)[offset:]
    idx = np.sort(perm[:n] if n is not None else perm)
    return np.ascontiguousarray(data.images[idx]), np.asarray(data.labels[idx])
