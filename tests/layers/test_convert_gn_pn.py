"""BN + activation -> GN + Proxy Norm converter on a tiny CIFAR-style ResNet (functional ReLU) and Sequentials."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from tta_norm.layers import GroupNormProxyAct, ProxyNorm, convert_to_gn_pn, find_bn_activations


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Block(nn.Module):
    """conv-bn-relu-conv-bn-(+shortcut)-relu with functional ReLUs (like tta_norm.models.cifar_resnet)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class TinyResNet(nn.Module):
    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(Block(8, 8, 1))
        self.layer2 = nn.Sequential(Block(8, 16, 2))
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer2(self.layer1(out))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


FUSED = {"bn1", "layer1.0.bn1", "layer2.0.bn1"}
UNFUSED = {"layer1.0.bn2", "layer2.0.bn2", "layer2.0.shortcut.1"}


def _tiny() -> TinyResNet:
    torch.manual_seed(0)
    return TinyResNet()


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_find_bn_activations() -> None:
    found = find_bn_activations(_tiny())
    assert set(found) == FUSED
    assert all(isinstance(a, nn.ReLU) for a in found.values())


def test_conversion_structure_and_parameter_count() -> None:
    model = _tiny()
    channels = {name: m.num_features for name, m in model.named_modules() if isinstance(m, _BatchNorm)}
    converted = convert_to_gn_pn(model, 4)
    assert not any(isinstance(m, _BatchNorm) for m in converted.modules())
    for name in FUSED:
        mod = converted.get_submodule(name)
        assert isinstance(mod, GroupNormProxyAct)
        assert mod.norm.num_groups == 4 and not mod.norm.affine
    for name in UNFUSED:
        mod = converted.get_submodule(name)
        assert type(mod) is nn.GroupNorm and mod.affine and mod.num_groups == 4
    # documented count: each fused BN 2C -> 4C, unfused BN 2C -> GN 2C
    assert _n_params(converted) == _n_params(model) + 2 * sum(channels[n] for n in FUSED)
    # the ReLUs after fused BNs were removed from the graph; the two post-residual ReLUs remain
    relus = [n for n in converted.graph.nodes if n.op == "call_function" and n.target is F.relu]
    assert len(relus) == 2
    assert all(n.args[0].op == "call_function" for n in relus)  # both applied to the residual sum
    assert any(isinstance(m, _BatchNorm) for m in model.modules())  # original model untouched


def test_converted_forward_equals_hand_wired_reference() -> None:
    gm = convert_to_gn_pn(_tiny(), 2)
    m = gm.get_submodule
    x = torch.randn(3, 3, 8, 8, generator=_gen(1))

    def block(prefix: str, t: torch.Tensor, shortcut) -> torch.Tensor:
        out = m(f"{prefix}.bn1")(m(f"{prefix}.conv1")(t))  # GN + PN (ReLU inside), no second ReLU
        out = m(f"{prefix}.bn2")(m(f"{prefix}.conv2")(out))
        return F.relu(out + shortcut(t))

    out = m("bn1")(m("conv1")(x))
    out = block("layer1.0", out, lambda t: t)
    out = block("layer2.0", out, lambda t: m("layer2.0.shortcut.1")(m("layer2.0.shortcut.0")(t)))
    expected = m("fc")(F.adaptive_avg_pool2d(out, 1).flatten(1))
    torch.testing.assert_close(gm(x), expected)


def test_converted_model_trains_and_is_batch_independent() -> None:
    gm = convert_to_gn_pn(_tiny(), 4)
    gm.train()
    x = torch.randn(8, 3, 8, 8, generator=_gen(2))
    y = torch.arange(8) % 3
    opt = torch.optim.SGD(gm.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = F.cross_entropy(gm(x), y)
        loss.backward()
        losses.append(loss.item())
        opt.step()
    assert losses[-1] < 0.5 * losses[0]
    pn_grads = [p.grad for mod in gm.modules() if isinstance(mod, ProxyNorm) for p in mod.parameters()]
    assert pn_grads and all(g is not None and torch.isfinite(g).all() for g in pn_grads)
    # batch size 1 works in training mode and each sample is processed independently of the others
    single = gm(x[:1])
    assert single.shape == (1, 3)
    torch.testing.assert_close(single, gm(x)[:1], atol=1e-5, rtol=1e-5)


def test_copy_affine_and_eps() -> None:
    model = _tiny()
    with torch.no_grad():
        model.bn1.weight.fill_(2.0)
        model.layer1[0].bn2.bias.fill_(-1.0)
    gm = convert_to_gn_pn(model, 4, norm_eps=1e-3, proxy_eps=0.05)
    assert torch.all(gm.get_submodule("bn1").proxy.weight == 2.0)
    assert gm.get_submodule("bn1").norm.eps == 1e-3 and gm.get_submodule("bn1").proxy.eps == 0.05
    assert torch.all(gm.get_submodule("layer1.0.bn2").bias == -1.0)
    fresh = convert_to_gn_pn(model, 4, copy_affine=False)
    assert torch.all(fresh.get_submodule("bn1").proxy.weight == 1.0)
    assert fresh.get_submodule("bn1").norm.eps == model.bn1.eps


def test_activation_after_selection() -> None:
    gm = convert_to_gn_pn(_tiny(), 4, activation_after={"layer1.0.bn1"})
    assert isinstance(gm.get_submodule("layer1.0.bn1"), GroupNormProxyAct)
    assert type(gm.get_submodule("bn1")) is nn.GroupNorm  # not selected: GN, its ReLU kept
    assert len([n for n in gm.graph.nodes if n.target is F.relu]) == 4
    gm = convert_to_gn_pn(_tiny(), 4, activation_after=lambda name, bn: name.startswith("layer"))
    assert isinstance(gm.get_submodule("layer2.0.bn1"), GroupNormProxyAct)
    assert type(gm.get_submodule("bn1")) is nn.GroupNorm
    with pytest.raises(ValueError, match="layer1.0.bn2"):
        convert_to_gn_pn(_tiny(), 4, activation_after={"layer1.0.bn2"})  # feeds the residual sum


def test_unfused_keep_and_group_errors() -> None:
    gm = convert_to_gn_pn(_tiny(), lambda c: c // 4, unfused="keep")
    assert isinstance(gm.get_submodule("layer1.0.bn2"), nn.BatchNorm2d)
    assert gm.get_submodule("layer2.0.bn1").norm.num_groups == 4
    with pytest.raises(ValueError, match="num_groups=3 does not divide"):
        convert_to_gn_pn(_tiny(), 3)
    with pytest.raises(ValueError, match="method"):
        convert_to_gn_pn(_tiny(), 4, method="graph")  # type: ignore[arg-type]


def test_state_dict_round_trip_of_converted_model() -> None:
    gm = convert_to_gn_pn(_tiny(), 4)
    with torch.no_grad():
        for p in gm.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=_gen(3)))
    buf = io.BytesIO()
    torch.save(gm.state_dict(), buf)
    buf.seek(0)
    other = convert_to_gn_pn(TinyResNet(), 4)
    other.load_state_dict(torch.load(buf))
    x = torch.randn(2, 3, 8, 8, generator=_gen(4))
    torch.testing.assert_close(other(x), gm(x))
    assert "bn1.proxy.proxy_weight" in gm.state_dict() and "bn1.running_mean" not in gm.state_dict()


def test_module_relu_and_other_activations_fx() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(4)
            self.relu = nn.ReLU(inplace=True)
            self.bn_b = nn.BatchNorm2d(4)
            self.bn_c = nn.BatchNorm2d(4)
            self.bn_d = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.relu(self.bn(self.conv(x)))
            x = F.gelu(self.bn_b(x), approximate="tanh")
            x = self.bn_c(x).relu()
            return F.leaky_relu(self.bn_d(x), 0.2) + x  # x used twice, but bn_d feeds only the activation

    found = find_bn_activations(Net())
    assert set(found) == {"bn", "bn_b", "bn_c", "bn_d"}
    assert isinstance(found["bn"], nn.ReLU) and found["bn"].inplace is False
    assert isinstance(found["bn_b"], nn.GELU) and found["bn_b"].approximate == "tanh"
    assert isinstance(found["bn_d"], nn.LeakyReLU) and found["bn_d"].negative_slope == 0.2
    gm = convert_to_gn_pn(Net(), 2)
    assert gm(torch.randn(1, 3, 4, 4, generator=_gen(5))).shape == (1, 4, 4, 4)


def test_untraceable_and_shared_bn_errors() -> None:
    class Dynamic(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent control flow
                return F.relu(self.bn(x))
            return x

    with pytest.raises(RuntimeError, match="method='sequential'"):
        convert_to_gn_pn(Dynamic(), 2)

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.relu(self.bn(x)) + self.bn(x)

    with pytest.raises(ValueError, match="called more than once"):
        convert_to_gn_pn(Shared(), 2)


def test_sequential_method_in_place() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.SiLU()),
        nn.Conv2d(8, 4, 1),
        nn.BatchNorm2d(4),
    )
    before = _n_params(model)
    with pytest.warns(UserWarning, match=r"\['5'\]"):
        out = convert_to_gn_pn(model, 2, method="sequential")
    assert out is model
    assert isinstance(model[1], GroupNormProxyAct) and isinstance(model[2], nn.Identity)
    assert isinstance(model[3][1], GroupNormProxyAct) and isinstance(model[3][2], nn.Identity)
    assert isinstance(model[3][1].proxy.activation, nn.SiLU)
    assert type(model[5]) is nn.GroupNorm
    assert _n_params(model) == before + 2 * 8 + 2 * 8
    assert model(torch.randn(1, 3, 5, 5, generator=_gen(6))).shape == (1, 4, 3, 3)

    # functional ReLUs are invisible without tracing: the ResNet's BNs all become plain GN (with a warning)
    with pytest.warns(UserWarning, match="method='fx'"):
        tiny = convert_to_gn_pn(_tiny(), 4, method="sequential")
    assert not any(isinstance(m, GroupNormProxyAct) for m in tiny.modules())
    with pytest.raises(ValueError, match="method='fx'"):
        convert_to_gn_pn(_tiny(), 4, method="sequential", activation_after={"bn1"})


def test_torchvision_basic_block_with_shared_relu_module() -> None:
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=5)
    found = find_bn_activations(model)
    # stem bn1 + bn1 of the 8 blocks; bn2 and downsample BNs feed the residual sum
    assert len(found) == 9 and "layer1.0.bn1" in found and "layer1.0.bn2" not in found
    gm = convert_to_gn_pn(model, 8).train()
    assert gm(torch.randn(1, 3, 32, 32, generator=_gen(7))).shape == (1, 5)


def test_project_cifar_resnet() -> None:
    models = pytest.importorskip("tta_norm.models")
    if not hasattr(models, "cifar_resnet"):
        pytest.skip("tta_norm.models.cifar_resnet not available")
    model = models.cifar_resnet(20)
    found = find_bn_activations(model)
    expected = {"bn1"} | {f"layer{s}.{i}.bn1" for s in (1, 2, 3) for i in range(3)}
    assert set(found) == expected
    gm = convert_to_gn_pn(model, 8).train()
    assert gm(torch.rand(1, 3, 32, 32, generator=_gen(8))).shape == (1, 10)
