"""record_inputs sees each adaptive layer's input and leaves no hook behind."""

from __future__ import annotations

import torch
from torch import nn

import tta_norm
from tta_norm.norm.probe import record_inputs


def test_record_inputs_equals_layer_inputs_and_removes_hooks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))
    tta = tta_norm.adapt(model.eval(), "tbn")
    x = torch.randn(5, 3, 8, 8)
    with record_inputs(tta.model, lambda t: t.detach().clone()) as seen:
        out = tta.model(x)
    first = model[0](x)
    assert set(seen) == {"1", "4"} and torch.equal(seen["1"], first)
    assert seen["4"].shape == (5, 2, 6, 6)
    assert all(not layer._forward_pre_hooks for _, layer in tta.norm_layers())
    assert torch.equal(out, tta.model(x))  # recording changed nothing
