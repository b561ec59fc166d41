"""Tiny models and data for the adaptation tests (independent of tta_norm.models)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TinyNet(nn.Module):
    """conv(3->4) + BN + ReLU + conv(4->4) + BN + ReLU + global average pool + linear(4 -> classes)."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.linear = nn.Linear(4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return self.linear(out.mean(dim=(2, 3)))


def tiny_net(seed: int = 0, num_classes: int = 3) -> TinyNet:
    """A TinyNet with seeded weights and non-trivial BN running statistics and affine parameters."""
    torch.manual_seed(seed)
    net = TinyNet(num_classes)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for bn in (net.bn1, net.bn2):
            bn.running_mean.copy_(torch.randn(4, generator=g) * 0.3)
            bn.running_var.copy_(torch.rand(4, generator=g) + 0.5)
            bn.weight.copy_(1 + 0.3 * torch.randn(4, generator=g))
            bn.bias.copy_(0.2 * torch.randn(4, generator=g))
    return net.eval()


def tiny_data(n: int = 24, seed: int = 0, num_classes: int = 3, size: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Float NCHW images in [0, 1] and labels that depend on the images' colour (learnable)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % num_classes
    x = torch.rand(n, 3, size, size, generator=g) * 0.5
    x[torch.arange(n), y % 3] += 0.4
    return x.clamp(0, 1), y
