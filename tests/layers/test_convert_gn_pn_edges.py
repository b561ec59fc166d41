"""convert_to_gn_pn on models that defeat a naive pairing: Sequential subclasses with their own forward, shared
BNs, identities and dropout between a BN and its activation (timm)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from tta_norm.layers import GroupNormProxyAct, convert_to_gn_pn, convert_to_group_norm, find_bn_activations


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


class ThroughIdentity(nn.Module):
    """bn -> nn.Identity -> ReLU (fusable); bn_d -> Dropout -> ReLU and bn_s -> Identity used twice (not)."""

    def __init__(self) -> None:
        super().__init__()
        self.bn, self.bn_d, self.bn_s = nn.BatchNorm2d(4), nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.drop_block, self.drop, self.skip = nn.Identity(), nn.Dropout(0.5), nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.drop_block(self.drop_block(self.bn(x))))
        y = torch.relu(self.drop(self.bn_d(y)))
        s = self.skip(self.bn_s(y))
        return torch.relu(s) + s


def test_fx_method_fuses_through_identity_calls_not_dropout_and_warns_about_the_rest() -> None:
    model = ThroughIdentity().eval()
    assert set(find_bn_activations(model)) == {"bn"}
    with pytest.warns(UserWarning, match=r"convert_to_gn_pn\(method='fx'\): 1 BatchNorm.*dropout.*\['bn_d'\]"):
        gm = convert_to_gn_pn(model, 2)
    assert isinstance(gm.bn, GroupNormProxyAct) and type(gm.bn_d) is nn.GroupNorm and type(gm.bn_s) is nn.GroupNorm
    x = torch.randn(2, 4, 3, 3, generator=_gen(2))
    y = torch.relu(gm.drop(gm.bn_d(gm.bn(x))))  # the ReLU and the two identities after bn are gone
    s = gm.bn_s(y)
    torch.testing.assert_close(gm(x), torch.relu(s) + s)
    with pytest.warns(UserWarning, match=r"kept as BatchNorm: \['bn_d'\]"):
        convert_to_gn_pn(model, 2, unfused="keep")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert_to_gn_pn(nn.Sequential(nn.BatchNorm2d(4), nn.ReLU()), 2)  # everything fused: no warning


def test_fx_method_on_timm_resnet18_equals_the_hand_built_conversion() -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=5).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    # the stem and every block: bn1 -> (drop_block: nn.Identity) -> act1 fused; bn2 and downsample BNs not
    fused = ["bn1"] + [f"layer{i}.{j}.bn1" for i in range(1, 5) for j in range(2)]
    assert sorted(find_bn_activations(model)) == sorted(fused)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # bn2 and the downsample BNs feed residual sums: unfused by design, quietly
        gm = convert_to_gn_pn(model, 8)
    reference = copy.deepcopy(model)
    for name in fused:
        owner = reference.get_submodule(name.rpartition(".")[0])
        bn = owner.bn1
        layer = GroupNormProxyAct(bn.num_features, 8, nn.ReLU(), norm_eps=bn.eps)
        with torch.no_grad():
            layer.proxy.weight.copy_(bn.weight)
            layer.proxy.bias.copy_(bn.bias)
        owner.bn1, owner.act1 = layer, nn.Identity()
    reference = convert_to_group_norm(reference, 8).eval()
    x = torch.randn(2, 3, 32, 32, generator=_gen(3))
    with torch.no_grad():
        torch.testing.assert_close(gm(x), reference(x))
