"""Weight-decay parameter groups: every parameter exactly once, decay values as requested, optimizer behaviour."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tta_norm.layers import BatchGroupNorm, GhostBatchNorm2d, GroupNormProxyAct
from tta_norm.training import is_norm_layer, param_groups


class MarkedNorm(nn.Module):
    """A custom normalization layer identified only by the documented marker attribute."""

    is_norm_layer = True

    def __init__(self, c: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(c))
        self.shift = nn.Parameter(torch.zeros(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.view(1, -1, 1, 1) + self.shift.view(1, -1, 1, 1)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=True)
        self.bn = nn.BatchNorm2d(4)
        self.ghost = GhostBatchNorm2d(4, 2)
        self.gn = nn.GroupNorm(2, 4)
        self.bgn = BatchGroupNorm(4, 2)
        self.pn = GroupNormProxyAct(4, 2)
        self.marked = MarkedNorm(4)
        self.conv2 = nn.Conv2d(4, 4, 1, bias=False)
        self.ln = nn.LayerNorm(4)
        self.inorm = nn.InstanceNorm2d(4, affine=True)
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 4, bias=False)
        self.head.weight = self.fc.weight  # tied weights appear once


NORM = {
    "bn.weight", "bn.bias", "ghost.weight", "ghost.bias", "gn.weight", "gn.bias", "bgn.weight", "bgn.bias",
    "pn.proxy.weight", "pn.proxy.bias", "marked.scale", "marked.shift", "ln.weight", "ln.bias",
    "inorm.weight", "inorm.bias",
}  # fmt: skip
BIAS = {"conv.bias", "fc.bias"}
DECAY = {"conv.weight", "conv2.weight", "fc.weight", "pn.proxy.proxy_weight", "pn.proxy.proxy_bias"}


def _names(model: nn.Module, groups: list[dict]) -> dict[str, set[str]]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: {by_id[id(p)] for p in g["params"]} for g in groups}


def test_every_parameter_exactly_once_with_requested_decay() -> None:
    model = Net()
    groups = param_groups(model, 5e-4, norm_decay=False, bias_decay=1e-5)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    assert _names(model, groups) == {"decay": DECAY, "norm": NORM, "bias": BIAS}
    decay = {g["name"]: g["weight_decay"] for g in groups}
    assert decay == {"decay": 5e-4, "norm": 0.0, "bias": 1e-5}


@pytest.mark.parametrize(
    ("norm_decay", "bias_decay", "expected_norm", "expected_bias"),
    [(True, True, 0.1, 0.1), (False, False, 0.0, 0.0), (0.3, False, 0.3, 0.0), (0.0, 0.2, 0.0, 0.2)],
)
def test_decay_settings(norm_decay, bias_decay, expected_norm, expected_bias) -> None:
    groups = param_groups(Net(), 0.1, norm_decay=norm_decay, bias_decay=bias_decay)
    decay = {g["name"]: g["weight_decay"] for g in groups}
    assert decay == {"decay": 0.1, "norm": expected_norm, "bias": expected_bias}


def test_optimizer_applies_decay_only_where_requested() -> None:
    """Zero gradients: an SGD step changes a parameter only through its weight decay."""
    model = Net()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    opt = torch.optim.SGD(param_groups(model, 0.5, norm_decay=False, bias_decay=True), lr=0.1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    params = dict(model.named_parameters())
    for name in NORM:
        assert torch.all(params[name] == 1.0), name
    for name in BIAS | DECAY:
        torch.testing.assert_close(params[name], torch.full_like(params[name], 0.95), msg=name)
    assert [g["name"] for g in opt.param_groups] == ["decay", "norm", "bias"]


def test_trainable_only_and_empty_groups() -> None:
    model = Net()
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("bn."))
    groups = param_groups(model, 0.1, trainable_only=True)
    assert [g["name"] for g in groups] == ["norm"]
    assert len(groups[0]["params"]) == 2
    assert sum(len(g["params"]) for g in param_groups(model, 0.1)) == len(list(model.parameters()))


def test_is_norm_layer_and_errors() -> None:
    assert is_norm_layer(nn.SyncBatchNorm(3)) and is_norm_layer(MarkedNorm(2)) and is_norm_layer(nn.RMSNorm(3))
    assert not is_norm_layer(nn.Conv2d(1, 1, 1)) and not is_norm_layer(GroupNormProxyAct(2, 1))
    with pytest.raises(ValueError, match="norm_decay"):
        param_groups(Net(), 0.1, norm_decay=-1.0)
    with pytest.raises(ValueError, match="weight_decay"):
        param_groups(Net(), -0.1)


def test_every_parameter_of_the_package_norm_layers_is_a_norm_parameter():
    from tta_norm.layers import (
        AuxBatchNorm2d,
        BatchGroupNorm,
        GhostBatchNorm2d,
        GroupNormProxyAct,
        ProxyNorm,
        SaAuxBatchNorm2d,
    )  # fmt: skip

    layers = [AuxBatchNorm2d(4, 2), SaAuxBatchNorm2d(4, 2), BatchGroupNorm(4, 2), GhostBatchNorm2d(4, 2),
              ProxyNorm(4), GroupNormProxyAct(4, 2)]  # fmt: skip
    for layer in layers:
        groups = {g["name"]: g for g in param_groups(torch.nn.Sequential(layer), 5e-4, norm_decay=False)}
        regular = {n for m in layer.modules() for n in getattr(m, "regular_decay_params", ())}  # Proxy Norm's
        params = [p for n, p in layer.named_parameters() if n.rpartition(".")[2] not in regular]
        assert params and all(any(p is q for q in groups["norm"]["params"]) for p in params), type(layer).__name__
        assert groups["norm"]["weight_decay"] == 0.0
