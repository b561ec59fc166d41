"""EATA: efficient anti-forgetting test-time adaptation (Niu et al., ICML 2022)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tta_norm.methods.base import GradientMethod, collect_norm_params, grad_context, softmax_entropy
from tta_norm.norm.convert import keep_state

Fishers = dict[str, tuple[Tensor, Tensor]]


def entropy_margin(num_classes: int, factor: float = 0.4) -> float:
    """EATA's and SAR's entropy threshold ``E0 = factor * ln(C)`` (factor 0.4)."""
    return factor * math.log(num_classes)


def compute_fishers(model: nn.Module, batches: Iterable[Tensor]) -> Fishers:
    """Diagonal Fisher information of the norm affine parameters, EATA's anti-forgetting weights.

    For each batch (inputs only; the labels are the model's own predictions), the squared gradient of the
    cross-entropy is accumulated; the sum is divided by the number of batches.  Returns
    ``{param name: (fisher, value at computation)}``.  The model's statistics state is not changed
    (:func:`~tta_norm.norm.keep_state`); its parameters' ``.grad`` are cleared afterwards.
    """
    named = collect_norm_params(model)
    total = {name: torch.zeros_like(p) for name, p in named}
    count = 0
    with keep_state(model):
        for x in batches:
            with grad_context(x) as x:
                for _, p in named:
                    p.grad = None
                logits = model(x)
                loss = F.cross_entropy(logits, logits.argmax(1))
                grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
            for (name, _), g in zip(named, grads, strict=True):
                if g is not None:
                    total[name] += g.detach().square()
            count += 1
    if count == 0:
        raise ValueError("compute_fishers needs at least one batch of data")
    return {name: (total[name] / count, p.detach().clone()) for name, p in named}


class EATA(GradientMethod):
    """EATA: entropy minimisation on reliable, non-redundant samples, with an optional Fisher regulariser.

    Per batch: keep samples with entropy below ``e_margin`` (default ``0.4 ln C``); of those, drop samples
    whose softmax has ``|cos| >= d_margin`` (default 0.05) with the moving average of past selected softmax
    outputs (average updated ``0.9 * old + 0.1 * new mean``); weight each kept entropy by
    ``exp(-(H - e_margin))``; add ``fisher_alpha * sum(F * (theta - theta_0)^2)`` when Fisher weights are
    given (``fishers=``, or ``fisher_data=``, an iterable of input batches, e.g. clean source data, from
    which :func:`compute_fishers` computes them).  Updates only if a sample survives both filters.
    ``fisher_alpha=0`` (or no Fisher data) is ETA.  Returns the logits of the forward pass used for the update.
    Defaults: Niu et al. 2022 (``d_margin`` 0.05, ``fisher_alpha`` 2000); Marsden & Doebler's CIFAR-10-C config
    uses ``d_margin=0.4, fisher_alpha=1``.
    """

    name = "eata"

    def __init__(
        self,
        model: nn.Module,
        *,
        e_margin: float | None = None,
        d_margin: float = 0.05,
        fisher_alpha: float = 2000.0,
        fishers: Fishers | None = None,
        fisher_data: Iterable[Tensor] | None = None,
        **optim_kwargs,
    ) -> None:
        super().__init__(model, **optim_kwargs)
        self.e_margin = e_margin
        self.d_margin = d_margin
        self.fisher_alpha = fisher_alpha
        if fishers is None and fisher_data is not None:
            fishers = compute_fishers(model, fisher_data)
        self.fishers = fishers
        self.current_probs: Tensor | None = None
        self.num_samples_update = 0

    def reset_method_state(self) -> None:
        self.current_probs = None
        self.num_samples_update = 0

    def _update_probs(self, new_probs: Tensor) -> None:
        if new_probs.shape[0] == 0:
            return
        mean = new_probs.detach().mean(0)
        self.current_probs = mean if self.current_probs is None else 0.9 * self.current_probs + 0.1 * mean

    def adapt_step(self, x: Tensor, logits: Tensor) -> None:
        e_margin = self.e_margin if self.e_margin is not None else entropy_margin(logits.shape[1])
        entropy = softmax_entropy(logits)
        reliable = entropy < e_margin
        entropy = entropy[reliable]
        probs = logits[reliable].softmax(1)
        if self.current_probs is not None:
            cos = F.cosine_similarity(self.current_probs.unsqueeze(0), probs, dim=1)
            novel = cos.abs() < self.d_margin
            entropy, probs = entropy[novel], probs[novel]
        self._update_probs(probs)
        if entropy.numel() == 0:
            self.optimizer.zero_grad(set_to_none=True)
            return
        loss = (entropy * torch.exp(-(entropy.detach() - e_margin))).mean(0)
        if self.fishers is not None and self.fisher_alpha:
            for name, p in self.named_params:
                if name in self.fishers:
                    fisher, anchor = self.fishers[name]
                    loss = loss + self.fisher_alpha * (fisher * (p - anchor).square()).sum()
        if torch.isfinite(loss):
            loss.backward()
            self.optimizer.step()
            self.num_samples_update += entropy.numel()
        self.optimizer.zero_grad(set_to_none=True)
