"""Norm + act layers outside the adaptive converter: the GN + PN converter refuses them, snapshots keep the act."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tta_norm
from tests.norm.invariants import randomize_batchnorms
from tests.norm.test_registry import BatchNormAct, x_image
from tta_norm.attacks.lp import deployed_forward, frozen_snapshot
from tta_norm.layers import convert_to_aux_bn
from tta_norm.layers.convert import convert_to_gn_pn
from tta_norm.norm import AdaptiveNormAct, registry


def act_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct(4), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    return randomize_batchnorms(net, 0).eval()


@pytest.mark.filterwarnings("ignore:convert_to_gn_pn")
@pytest.mark.parametrize("method", ["fx", "sequential"])
def test_gn_pn_converter_refuses_a_batchnorm_with_its_own_activation(method: str) -> None:
    net = act_net()
    kinds = [type(m) for m in net]
    with pytest.raises(ValueError, match=r"\['1'\] \(BatchNormAct\).*drop.*unfused='keep'"):
        convert_to_gn_pn(net, 2, method=method)
    assert [type(m) for m in net] == kinds  # nothing replaced
    out = convert_to_gn_pn(net, 2, method=method, unfused="keep")
    assert isinstance(out.get_submodule("1"), BatchNormAct)  # kept whole, activation included


def test_frozen_snapshot_keeps_the_activation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_CONVERTERS", dict(registry._CONVERTERS))
    monkeypatch.setattr(registry, "_lazy_done", set(registry._lazy_done))
    tta_norm.register_norm_converter(BatchNormAct, registry.adaptive_norm_act_from)
    x = x_image(n=6)
    tta = tta_norm.adapt(act_net(), "tbn")
    snap = frozen_snapshot(tta, x)
    assert isinstance(snap[1], AdaptiveNormAct) and isinstance(snap[1].act, nn.SiLU)
    with torch.no_grad():
        torch.testing.assert_close(snap(x), deployed_forward(tta)(x), rtol=1e-5, atol=1e-5)


def test_aux_bn_converter_refuses_a_batchnorm_with_its_own_activation() -> None:
    net = act_net()
    with pytest.raises(ValueError, match=r"convert_to_aux_bn: \['1 \(BatchNormAct\)'\].*drop"):
        convert_to_aux_bn(net)
    assert type(net[1]) is BatchNormAct and type(net[3]) is nn.BatchNorm2d  # nothing replaced
