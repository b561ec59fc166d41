"""The small-batch training study's models: a CIFAR ResNet with each normalisation variant, and the recipe that
trains it at a given batch size (the command line is ``scripts/small_batch_study.py``; the clean and corruption
errors it reports are :func:`tta_norm.fitting.benchdata.classification_error` and
:func:`~tta_norm.fitting.benchdata.corruption_errors`).

Variants (Summers & Dinneen, ICLR 2020; Labatie et al., NeurIPS 2021; layers from :mod:`tta_norm.layers`, decay
groups from :mod:`tta_norm.training.param_groups`):

========== =====================================================================================================
bn         BatchNorm, no weight decay on gamma/beta (common practice)
bn-decay   BatchNorm with the same weight decay on gamma/beta as on the weights
ghost      Ghost BN, ghost batch ``min(16, max(2, B // 4))`` (= BN when that equals B), momentum scaled per chunk
bgn        batch-group norm (statistics over the batch and groups of 4 channels), running stats for inference
gn         GroupNorm with groups of 4 channels (G = C / 4)
gnpn       GroupNorm (groups of 4 channels) + Proxy Norm after every BN+ReLU pair (fx conversion)
========== =====================================================================================================

Recipe (:func:`train_variant`, identical for all variants): SGD momentum 0.9, nesterov, weight decay on
conv/linear weights (and gamma/beta for ``bn-decay``), peak lr ``base_lr * B / 128`` (linear scaling), linear
warm-up over the first 5% of the steps then cosine to 0, random crop + flip, float32, full batches only.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tta_norm.data.tensors import to_float_nchw
from tta_norm.layers.convert import (
    convert_to_batch_group_norm,
    convert_to_ghost_bn,
    convert_to_gn_pn,
    convert_to_group_norm,
)
from tta_norm.models import cifar_resnet, load_model
from tta_norm.training.augment import augment_batch
from tta_norm.training.loop import fit
from tta_norm.training.param_groups import param_groups
from tta_norm.training.schedule import lr_at

VARIANTS = ("bn", "bn-decay", "ghost", "bgn", "gn", "gnpn")


def groups_of_four(channels: int) -> int:
    """The study's GN / batch-group grouping: groups of 4 channels (at least one group)."""
    return max(1, channels // 4)


def ghost_size(batch_size: int) -> int:
    """The study's ghost batch at training batch ``batch_size``: ``min(16, max(2, B // 4))``."""
    return min(16, max(2, batch_size // 4))


def build_variant(variant: str, batch_size: int, depth: int = 20, init: str = "scratch") -> nn.Module:
    """A CIFAR ResNet-``depth`` with the variant's normalisation layers: fresh (``init="scratch"``, seeded by the
    caller) or the released checkpoint (``"release"``) converted (gamma/beta copied; running statistics kept by
    the BN-based variants).  ``batch_size`` is the training batch size (it sets the ghost batch)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}")
    model = cifar_resnet(depth) if init == "scratch" else load_model(f"resnet{depth}")  # released checkpoint
    if variant == "ghost":
        return convert_to_ghost_bn(model, ghost_size(batch_size))
    if variant == "bgn":
        return convert_to_batch_group_norm(model, groups_of_four)
    if variant == "gn":
        return convert_to_group_norm(model, groups_of_four)
    if variant == "gnpn":
        return convert_to_gn_pn(model, groups_of_four)
    return model


def train_variant(
    model: nn.Module,
    variant: str,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    *,
    epochs: int,
    base_lr: float,
    weight_decay: float,
    seed: int,
    device: torch.device,
    progress: bool = False,
) -> dict[str, Any]:
    """Train ``model`` in place with the study's recipe (see the module docstring) on uint8 NHWC ``images``.

    Returns ``steps``, the mean ``train_loss`` over the steps, ``train_seconds`` and ``peak_lr``; the model is
    left in eval mode."""
    groups = param_groups(model, weight_decay, norm_decay=variant == "bn-decay", bias_decay=False)
    peak = base_lr * batch_size / 128
    opt = torch.optim.SGD(groups, lr=peak, momentum=0.9, nesterov=True)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()

    def loss_fn(idx: torch.Tensor) -> torch.Tensor:
        x = to_float_nchw(augment_batch(images[idx], gen)).to(device)
        return F.cross_entropy(model(x), labels[idx].to(device))

    model.train()
    run = fit(opt, loss_fn, n=len(labels), batch_size=batch_size, epochs=epochs, generator=gen,
              drop_last=True, lr=lambda step, total: lr_at(step, total, max(1, int(0.05 * total)), peak),
              progress=progress, desc=f"{variant} B={batch_size}")  # fmt: skip
    model.eval()
    train_loss = sum(r["train_loss"] for r in run.history) / max(1, len(run.history))
    return {"steps": run.steps, "train_loss": train_loss, "train_seconds": time.perf_counter() - t0,
            "peak_lr": peak}  # fmt: skip
