"""Tiny models for the attack tests (independent of tta_norm.models)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PoolBNNet(nn.Module):
    """Per-channel spatial mean -> BatchNorm1d -> linear: benign logits depend directly on the batch statistics."""

    def __init__(self, channels: int = 3, num_classes: int = 4) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(channels)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(x.mean((2, 3))))


class ConvBNNet(nn.Module):
    """conv -> BatchNorm2d -> relu -> pool -> linear."""

    def __init__(self, c: int = 4, num_classes: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.8)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.2 + 0.4)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 0.02 + 0.01)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def pool_bn_net(seed: int = 0) -> nn.Module:
    return _randomize(PoolBNNet(), seed)


def conv_bn_net(seed: int = 0) -> nn.Module:
    return _randomize(ConvBNNet(), seed)


def batch(n: int = 12, seed: int = 0, num_classes: int = 4, size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g), torch.randint(0, num_classes, (n,), generator=g)
