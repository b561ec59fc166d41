"""Learning-rate schedule and weight averaging used by the supervised training loops."""

from __future__ import annotations

import math

import torch
from torch import nn


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up from ``peak / warmup`` to ``peak`` over ``warmup`` steps, then cosine decay to 0 at
    ``total`` (Loshchilov & Hutter 2017, SGDR without restarts; Goyal et al. 2017 warm-up). ``step`` counts from 0."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * peak * (1.0 + math.cos(math.pi * min(1.0, t)))


class WeightEMA:
    """Exponential moving average of all float parameters and buffers (BatchNorm statistics included):
    ``avg <- decay * avg + (1 - decay) * current`` after every optimizer step (Polyak averaging)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = float(decay)
        self.avg = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        current = model.state_dict()
        keys = list(self.avg)
        torch._foreach_lerp_([self.avg[k] for k in keys], [current[k].detach() for k in keys], 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        state = model.state_dict()
        for k, v in self.avg.items():
            state[k].copy_(v)
