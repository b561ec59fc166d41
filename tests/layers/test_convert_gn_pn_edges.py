"""convert_to_gn_pn on models that defeat a naive pairing: Sequential subclasses with their own forward."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from tta_norm.layers import GroupNormProxyAct, convert_to_gn_pn


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class ResidualAct(nn.Sequential):
    """A Sequential subclass whose forward is act(bn(x) + x): its BN and ReLU are not a BN -> activation pair."""

    def __init__(self) -> None:
        super().__init__(nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self[1](self[0](x) + x)


class PlainSubclass(nn.Sequential):
    """A Sequential subclass that keeps Sequential's forward (as torchvision's Conv2dNormActivation)."""


def test_sequential_method_pairs_only_inside_containers_that_chain_their_children() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(ResidualAct(), PlainSubclass(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU())).eval()
    x = torch.randn(2, 4, 3, 3, generator=_gen(1))
    reference = convert_to_gn_pn(model, 1)  # fx sees act(bn(x) + x) and leaves that BN unfused
    with pytest.warns(UserWarning, match=r"convert_to_gn_pn\(method='sequential'\): 1 BatchNorm.*\['0\.0'\]"):
        out = convert_to_gn_pn(model, 1, method="sequential")
    assert type(out[0][0]) is nn.GroupNorm and type(out[0][1]) is nn.ReLU  # the residual block is not fused
    assert isinstance(out[1][1], GroupNormProxyAct) and type(out[1][2]) is nn.Identity
    with torch.no_grad():
        torch.testing.assert_close(out(x), reference(x))
        assert out[0](x).min() >= 0  # the ReLU still follows the residual sum
    with pytest.raises(ValueError, match="not a subclass with its own forward"):
        convert_to_gn_pn(nn.Sequential(ResidualAct()), 1, method="sequential", activation_after={"0.0"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert_to_gn_pn(PlainSubclass(nn.BatchNorm2d(4), nn.ReLU()), 1, method="sequential")  # fused: no warning


def test_sequential_method_refuses_a_shared_batchnorm_before_any_change() -> None:
    bn = nn.BatchNorm2d(4)
    model = nn.Sequential(nn.Sequential(bn, nn.ReLU()), nn.Conv2d(4, 4, 1), nn.Sequential(bn, nn.ReLU()))
    kinds = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=r"\['0\.0', '2\.0'\] .*called more than once"):
        convert_to_gn_pn(model, 1, method="sequential")
    assert [type(m) for m in model.modules()] == kinds and model[0][0] is bn and model[2][0] is bn


@pytest.mark.parametrize("bad", [{"num_groups": 4}, {"num_groups": 2, "moments": "analytic"}])
def test_sequential_method_checks_every_layer_before_the_first_change(bad: dict) -> None:
    # the second BN (6 channels) refuses 4 groups; the SiLU pair refuses analytic moments: nothing is replaced
    model = nn.Sequential(nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 1), nn.BatchNorm2d(6), nn.SiLU())
    kinds = [type(m) for m in model]
    with pytest.raises(ValueError):
        convert_to_gn_pn(model, method="sequential", **bad)
    assert [type(m) for m in model] == kinds
