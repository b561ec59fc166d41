"""EATA: efficient anti-forgetting test-time adaptation (Niu et al., ICML 2022)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tta_norm.methods.base import GradientMethod, softmax_entropy
from tta_norm.methods.fisher import FISHER_BATCH_SIZE, Fishers, cached_fishers, check_fishers, compute_fishers


def entropy_margin(num_classes: int, factor: float = 0.4) -> float:
    """EATA's and SAR's entropy threshold ``E0 = factor * ln(C)`` (factor 0.4)."""
    return factor * math.log(num_classes)


def eata_defaults(num_classes: int) -> dict[str, float]:
    """EATA's ``d_margin`` and ``fisher_alpha`` for a ``num_classes``-way problem, as the reference configs set them.

    ``d_margin``: 0.4 up to 10 classes, 0.1 up to 100, 0.05 above; ``fisher_alpha``: 1 up to 100 classes (CIFAR),
    2000 above (ImageNet).  Sources: Marsden & Doebler ``test-time-adaptation`` ``classification/cfgs/
    {cifar10_c,cifar100_c,imagenet_c}/eata.yaml`` (0.4/1, 0.1/1, 0.05/2000); MedBN ``cfgs/cifar10/eata.yaml``
    (0.4/1); ``mr-eggplant/EATA`` ``main.py`` for ImageNet (0.05/2000).  The cosine of a probability vector with
    a near-uniform average is about ``1/sqrt(C)`` (0.32 at C = 10), so the ImageNet ``d_margin`` would discard
    almost every sample on 10 classes.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    d_margin = 0.4 if num_classes <= 10 else 0.1 if num_classes <= 100 else 0.05
    return {"d_margin": d_margin, "fisher_alpha": 1.0 if num_classes <= 100 else 2000.0}


class EATA(GradientMethod):
    """EATA: entropy minimisation on reliable, non-redundant samples, with an optional Fisher regulariser.

    Per batch, as ``mr-eggplant/EATA`` ``forward_and_adapt_eata``: keep samples with entropy below ``e_margin``
    (default ``0.4 ln C``); of those, drop samples whose softmax has ``|cos| >= d_margin`` with the moving
    average of past selected softmax outputs (updated ``0.9 * old + (1 - 0.9) * new mean``); weight each kept
    entropy by ``1 / exp(H - e_margin)`` and average; add ``sum over params of fisher_alpha * sum(F * (theta -
    theta_0) ** 2)`` when Fisher weights are given; step only if a sample survives both filters (and, unlike
    the reference, only if the loss is finite).  ``d_margin`` and ``fisher_alpha`` default by the class count
    (:func:`eata_defaults`: 0.4/1 for <= 10 classes, 0.1/1 for <= 100, 0.05/2000 above); explicit values win.

    Fisher weights: ``fishers=`` (a :func:`~tta_norm.methods.fisher.compute_fishers` result), or
    ``fisher_images=`` (a float ``(N, C, H, W)`` tensor of clean source images, cut in batches of
    ``fisher_batch_size`` = 64 and memoised per model by :func:`~tta_norm.methods.fisher.cached_fishers`), or
    ``fisher_data=`` (any iterable of input batches; not memoised).  Without Fisher weights (or with
    ``fisher_alpha=0``) this is ETA.  ``num_samples_update`` / ``num_samples_reliable`` count the samples that
    passed both filters / the first one (the reference's ``num_samples_update_2`` / ``_1``), ``last_num_selected``
    the survivors of the last batch.  Returns the logits of the forward pass used for the update.
    """

    name = "eata"

    def __init__(
        self,
        model: nn.Module,
        *,
        e_margin: float | None = None,
        d_margin: float | None = None,
        fisher_alpha: float | None = None,
        fishers: Fishers | None = None,
        fisher_images: Tensor | None = None,
        fisher_data: Iterable[Tensor] | None = None,
        fisher_batch_size: int = FISHER_BATCH_SIZE,
        **optim_kwargs: Any,
    ) -> None:
        given = [k for k, v in (("fishers", fishers), ("fisher_images", fisher_images), ("fisher_data", fisher_data))
                 if v is not None]  # fmt: skip
        if len(given) > 1:
            raise ValueError(f"pass one source of Fisher weights, got {given}")
        super().__init__(model, **optim_kwargs)
        if fisher_images is not None:
            fishers = cached_fishers(model, fisher_images, batch_size=fisher_batch_size, named_params=self.named_params)
        elif fisher_data is not None:
            fishers = compute_fishers(model, fisher_data, self.named_params)
        if fishers is not None:
            check_fishers(fishers, self.named_params)
        self.e_margin = e_margin
        self.d_margin = d_margin
        self.fisher_alpha = fisher_alpha
        self.fishers = fishers
        self.current_probs: Tensor | None = None
        self.num_samples_update = 0
        self.num_samples_reliable = 0
        self.last_num_selected = 0

    @property
    def uses_fisher(self) -> bool:
        """Whether the Fisher regulariser is active (EATA rather than ETA)."""
        return self.fishers is not None and self.fisher_alpha != 0

    def reset_method_state(self) -> None:
        self.current_probs = None
        self.num_samples_update = 0
        self.num_samples_reliable = 0
        self.last_num_selected = 0

    def _update_probs(self, new_probs: Tensor) -> None:
        if new_probs.shape[0] == 0:
            return
        with torch.no_grad():
            mean = new_probs.mean(0)
            self.current_probs = mean if self.current_probs is None else 0.9 * self.current_probs + (1 - 0.9) * mean

    def adapt_step(self, x: Tensor, logits: Tensor) -> None:
        num_classes = logits.shape[1]
        defaults = eata_defaults(num_classes)
        e_margin = self.e_margin if self.e_margin is not None else entropy_margin(num_classes)
        d_margin = self.d_margin if self.d_margin is not None else defaults["d_margin"]
        fisher_alpha = self.fisher_alpha if self.fisher_alpha is not None else defaults["fisher_alpha"]
        entropy = softmax_entropy(logits)
        reliable = torch.where(entropy < e_margin)
        entropy = entropy[reliable]
        probs = logits[reliable].softmax(1)
        self.num_samples_reliable += entropy.shape[0]
        if self.current_probs is not None:
            cos = F.cosine_similarity(self.current_probs.unsqueeze(0), probs, dim=1)
            novel = torch.where(cos.abs() < d_margin)
            entropy, probs = entropy[novel], probs[novel]
        self._update_probs(probs)
        self.last_num_selected = entropy.shape[0]
        self.num_samples_update += entropy.shape[0]
        if entropy.shape[0] == 0:
            self.optimizer.zero_grad(set_to_none=True)
            return
        coeff = 1 / (torch.exp(entropy.clone().detach() - e_margin))
        loss = entropy.mul(coeff).mean(0)
        if self.fishers is not None:
            ewc: Tensor | float = 0
            for name, p in self.named_params:
                if name in self.fishers:
                    fisher, anchor = self.fishers[name]
                    ewc += fisher_alpha * (fisher * (p - anchor) ** 2).sum()
            loss += ewc
        if torch.isfinite(loss):
            loss.backward()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
