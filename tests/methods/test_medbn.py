"""MedBN + TENT against MedBN's official arithmetic: which element of a tie gets the median's gradient, and the
layer computed as the reference ``MedNorm`` computes it while a gradient method adapts."""

from __future__ import annotations

import copy

import torch
from torch import nn

import tta_norm
from tta_norm.stats.estimators import batch_median


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)))  # conv of ReLU outputs: exact zeros, ties at the median
        return self.fc(h.mean((2, 3)))


def reference_mednorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """MedBN's layer arithmetic: per channel, over the contiguous (C, N*H*W) rows, the median m and
    s2 = sum((row - m)^2) / count; output weight * ((x - m) / sqrt(s2 + eps)) + bias."""
    c = x.shape[1]
    rows = x.transpose(0, 1).contiguous().view(c, -1)
    m = rows.median(dim=1).values
    s2 = ((rows - m[:, None]) ** 2).sum(dim=1) / rows.shape[1]
    out = weight[:, None] * ((rows - m[:, None]) / torch.sqrt(s2[:, None] + eps)) + bias[:, None]
    return out.view(c, x.shape[0], *x.shape[2:]).transpose(0, 1)


def test_median_gradient_goes_to_the_element_torch_median_picks() -> None:
    x = torch.zeros(6, 2, 3, 3)
    x[:, :, 0, 0] = torch.arange(12.0).view(6, 2) - 20.0  # a few negatives, many exact zeros: ties at the median
    x[:, 1, 1, 1] = 3.0
    a = x.clone().requires_grad_(True)
    (g_ours,) = torch.autograd.grad(batch_median(a).sum(), a)
    b = x.clone().requires_grad_(True)
    rows = b.transpose(0, 1).contiguous().view(2, -1)
    (g_ref,) = torch.autograd.grad(rows.median(dim=1)[0].sum(), b)
    assert torch.equal(g_ours, g_ref)
    first = (x.transpose(0, 1).reshape(2, -1) == 0).float().argmax(1)  # the old rule: first zero in row order
    assert not torch.equal(g_ref.transpose(0, 1).reshape(2, -1).argmax(1), first), "the case must be a real tie"


def test_medbn_tent_step_follows_the_official_arithmetic() -> None:
    torch.manual_seed(0)
    model = ConvNet().eval()
    x = torch.rand(16, 3, 8, 8)
    ref = copy.deepcopy(model)
    ref.bn1.forward = lambda h: reference_mednorm(h, ref.bn1.weight, ref.bn1.bias, ref.bn1.eps)
    ref.bn2.forward = lambda h: reference_mednorm(h, ref.bn2.weight, ref.bn2.bias, ref.bn2.eps)
    ref.requires_grad_(False)
    params = [ref.bn1.weight, ref.bn1.bias, ref.bn2.weight, ref.bn2.bias]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=1e-3)
    tta = tta_norm.adapt(model, "medbn", "tent")
    for _ in range(3):
        out = ref(x)
        (-(out.softmax(1) * out.log_softmax(1)).sum(1).mean(0)).backward()
        opt.step()
        opt.zero_grad()
        ours = tta(x)
        torch.testing.assert_close(ours, out.detach(), rtol=0, atol=1e-6)
    fresh = tta_norm.adapt(model, "medbn", "tent")  # one layer while adapting: bit-identical to the reference
    expected = reference_mednorm(model.conv1(x), model.bn1.weight, model.bn1.bias, model.bn1.eps)
    with torch.enable_grad():
        assert torch.equal(fresh.model.bn1(fresh.model.conv1(x)).detach(), expected.detach())
