"""TENT: test entropy minimisation (Wang, Shelhamer, Liu, Olshausen, Darrell; ICLR 2021)."""

from __future__ import annotations

import torch
from torch import Tensor

from tta_norm.methods.base import GradientMethod, softmax_entropy


class Tent(GradientMethod):
    """TENT: minimise the mean softmax entropy over the affine parameters of the norm layers.

    Faithful to the reference (``DequanWang/tent``): trainable = ``weight``/``bias`` of every norm layer,
    loss = ``-(softmax * log_softmax).sum(1).mean(0)``, Adam lr 1e-3 betas (0.9, 0.999), ``steps=1`` update
    per batch.  **The returned logits are those of the forward pass used for the update** (computed before
    the step).  With ``steps > 1`` the logits of the last forward are returned, and only the first forward
    may move stateful statistics (EMA).  The statistics come from the preset (``tbn`` reproduces TENT).
    A non-finite loss skips the step.
    """

    name = "tent"

    def adapt_step(self, x: Tensor, logits: Tensor) -> None:
        loss = softmax_entropy(logits).mean(0)
        if torch.isfinite(loss):
            loss.backward()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
