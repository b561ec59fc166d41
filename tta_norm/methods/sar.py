"""SAR: sharpness-aware and reliable entropy minimisation (Niu et al., ICLR 2023)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tta_norm.methods.base import GradientMethod, softmax_entropy
from tta_norm.methods.eata import entropy_margin
from tta_norm.norm.convert import keep_state


class SAR(GradientMethod):
    """SAR: reliable-entropy filtering, a sharpness-aware (SAM) step, and model recovery on collapse.

    Per batch: forward, keep samples with entropy below ``e_margin`` (default ``0.4 ln C``), back-propagate
    their mean entropy and move the parameters to the SAM point ``theta + rho * g / ||g||`` (``rho`` 0.05);
    forward again (statistics state not updated twice), keep the first filter's samples whose new entropy is
    still below the margin, back-propagate their mean entropy at the perturbed point, restore ``theta`` and
    take the base optimiser step.  An EMA (0.9) of that second loss below ``reset_constant`` (0.2) asks the
    wrapper for a model recovery (parameters, statistics and optimiser back to the source); as in the
    reference, the loss EMA itself survives the recovery.  Returns the logits of the first forward pass.
    Base optimiser: the toolkit default (Adam lr 1e-3, Marsden & Doebler's CIFAR setting); the paper's
    ImageNet setting is ``optimizer="sgd", lr=0.00025``.
    """

    name = "sar"

    def __init__(
        self,
        model: nn.Module,
        *,
        e_margin: float | None = None,
        rho: float = 0.05,
        reset_constant: float = 0.2,
        **optim_kwargs,
    ) -> None:
        super().__init__(model, **optim_kwargs)
        if rho < 0:
            raise ValueError(f"rho must be >= 0, got {rho}")
        self.e_margin = e_margin
        self.rho = rho
        self.reset_constant = reset_constant
        self.loss_ema: float | None = None

    def reset_method_state(self) -> None:
        self.loss_ema = None

    @torch.no_grad()
    def _perturb(self) -> list[Tensor | None]:
        grads = [p.grad for p in self.params]
        norms = [g.norm(2) for g in grads if g is not None]
        if not norms:
            return [None] * len(grads)
        scale = self.rho / (torch.stack(norms).norm(2) + 1e-12)
        deltas = []
        for p, g in zip(self.params, grads, strict=True):
            delta = None if g is None else g * scale
            if delta is not None:
                p.add_(delta)
            deltas.append(delta)
        return deltas

    @torch.no_grad()
    def _unperturb(self, deltas: list[Tensor | None]) -> None:
        for p, delta in zip(self.params, deltas, strict=True):
            if delta is not None:
                p.sub_(delta)

    def adapt_step(self, x: Tensor, logits: Tensor) -> None:
        margin = self.e_margin if self.e_margin is not None else entropy_margin(logits.shape[1])
        entropy = softmax_entropy(logits)
        reliable = entropy < margin
        self.optimizer.zero_grad(set_to_none=True)
        if reliable.any():
            entropy[reliable].mean(0).backward()
        deltas = self._perturb()
        self.optimizer.zero_grad(set_to_none=True)
        with keep_state(self.model):
            entropy2 = softmax_entropy(self.model(x))[reliable]
        still = entropy2 < margin
        if still.any():
            loss2 = entropy2[still].mean(0)
            value = float(loss2.detach())
            if value == value:  # not NaN
                self.loss_ema = value if self.loss_ema is None else 0.9 * self.loss_ema + 0.1 * value
            loss2.backward()
        self._unperturb(deltas)
        if still.any():
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.loss_ema is not None and self.loss_ema < self.reset_constant:
            self.reset_requested = True
