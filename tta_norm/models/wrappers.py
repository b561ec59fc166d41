"""Thin wrappers that adapt a model's interface: [0, 1] inputs and a subset of its outputs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tta_norm.models.cifar_resnet import IMAGENET_MEAN, IMAGENET_STD, InputNormalization


class NormalizedModel(nn.Module):
    """``model((x - mean) / std)``: a model trained on normalized inputs, fed [0, 1] images.  ``mean`` /
    ``std`` are per channel (ImageNet's by default; timm models use their ``pretrained_cfg`` values)."""

    def __init__(
        self, model: nn.Module, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
    ) -> None:
        super().__init__()
        self.normalize = InputNormalization(mean, std)
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(x))


class LogitSubset(nn.Module):
    """``model(x)[:, indices]``: the logits of the classes a test set has, in the order of its labels.

    ImageNet-R and ImageNet-A cover 200 of the 1,000 ImageNet classes; their evaluation (Hendrycks et al.,
    ICCV 2021 and CVPR 2021) keeps only the matching logits, so predictions, and the entropy a TTA method
    minimises, range over those 200 classes.  Output ``k`` is the logit of ImageNet class ``indices[k]``."""

    def __init__(self, model: nn.Module, indices: Sequence[int]) -> None:
        super().__init__()
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        if idx.ndim != 1 or idx.numel() == 0:
            raise ValueError("LogitSubset needs a non-empty list of class indices")
        if len(set(idx.tolist())) != idx.numel() or int(idx.min()) < 0:
            raise ValueError("LogitSubset indices must be distinct non-negative class indices")
        self.model = model
        self.register_buffer("indices", idx, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        if logits.shape[-1] <= int(self.indices.max()):
            raise ValueError(
                f"LogitSubset: the model has {logits.shape[-1]} outputs but class index {int(self.indices.max())} "
                "was requested (a 1,000-class ImageNet model is needed)"
            )
        return logits.index_select(-1, self.indices)


def inner_name(model: nn.Module, name: str) -> str:
    """``name`` (a submodule path of ``model``) relative to the network inside the package's wrappers
    (:class:`NormalizedModel`, :class:`LogitSubset`, each holding it as ``model``): the name the bare network
    gives that submodule, as rules written for it (SAR's top layers) expect."""
    while isinstance(model, (NormalizedModel, LogitSubset)):
        if name == "model":
            return ""
        if not name.startswith("model."):
            return name
        model, name = model.model, name[len("model."):]
    return name

