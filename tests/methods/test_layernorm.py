"""Gradient methods on LayerNorm / GroupNorm networks (timm ViT-tiny, ConvNeXt-atto; random init, small input),
checked against hand-written steps; statistics presets refuse models without BatchNorm; mixed models adapt both."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

import tta_norm

timm = pytest.importorskip("timm")

LR = 1e-3


def vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=10).eval()


def convnext() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("convnext_atto", pretrained=False, num_classes=10).eval()


X = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def entropy(logits: torch.Tensor) -> torch.Tensor:
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def adam_first_step(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return p - LR * g / (g.abs() + 1e-8)


def norm_params(model: nn.Module, skip=lambda name: False) -> dict[str, torch.Tensor]:
    return {
        f"{n}.{k}": getattr(m, k).detach().clone()
        for n, m in model.named_modules()
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm)) and not skip(n)
        for k in ("weight", "bias")
    }


@pytest.mark.parametrize("build", [vit, convnext])
def test_tent_step_equals_hand_written_step(build) -> None:
    model = build()
    params = {k: v.requires_grad_(True) for k, v in norm_params(model).items()}
    logits = functional_call(model, params, (X,))
    grads = torch.autograd.grad(entropy(logits).mean(0), list(params.values()))
    tta = tta_norm.adapt(model, method="tent", lr=LR)
    assert [n for n, _ in tta.method.named_params] == list(params)
    torch.testing.assert_close(tta(X), logits.detach())
    for (name, p), g in zip(params.items(), grads, strict=True):
        torch.testing.assert_close(tta.model.get_parameter(name).detach(), adam_first_step(p.detach(), g), msg=name)


@pytest.mark.parametrize("build", [vit, convnext])
def test_sar_step_equals_hand_written_step(build) -> None:
    from tta_norm.methods.sar import is_sar_top_layer

    model = build()
    margin, rho = 10.0, 0.05
    params = {k: v.requires_grad_(True) for k, v in norm_params(model, is_sar_top_layer).items()}
    logits = functional_call(model, params, (X,))
    ent = entropy(logits)
    keep = ent < margin
    g1 = torch.autograd.grad(ent[keep].mean(0), list(params.values()))
    scale = rho / (torch.stack([g.norm() for g in g1]).norm() + 1e-12)
    perturbed = {k: (p + g * scale).detach().requires_grad_(True) for (k, p), g in zip(params.items(), g1, strict=True)}
    ent2 = entropy(functional_call(model, perturbed, (X,)))[keep]
    g2 = torch.autograd.grad(ent2[ent2 < margin].mean(0), list(perturbed.values()))
    tta = tta_norm.adapt(model, method="sar", lr=LR, e_margin=margin)
    assert [n for n, _ in tta.method.named_params] == list(params)
    tta(X)
    for (name, p), g in zip(params.items(), g2, strict=True):
        torch.testing.assert_close(tta.model.get_parameter(name).detach(), adam_first_step(p.detach(), g), msg=name)


def test_sar_skips_the_top_vit_blocks_and_final_norm() -> None:
    names = [n for n, _ in tta_norm.adapt(vit(), method="sar").method.named_params]
    assert names and not any(n.startswith(("blocks.9.", "blocks.10.", "blocks.11.", "norm.")) for n in names)
    every = [n for n, _ in tta_norm.adapt(vit(), method="sar", freeze_top=False).method.named_params]
    assert "norm.weight" in every and "blocks.11.norm1.weight" in every


def test_eata_adapts_a_layernorm_model() -> None:
    tta = tta_norm.adapt(vit(), method="eata", e_margin=10.0)
    before = [p.detach().clone() for p in tta.method.params]
    tta(X)
    assert tta.method.last_num_selected == len(X)
    assert any(not torch.equal(a, p) for a, p in zip(before, tta.method.params, strict=True))


@pytest.mark.parametrize("preset", ["tbn", "medbn", "ema", "sabn", "iew"])
def test_statistics_presets_need_batchnorm(preset: str) -> None:
    with pytest.raises(ValueError, match="statistics presets need BatchNorm"):
        tta_norm.adapt(vit(), preset, "tent")
    with pytest.raises(ValueError, match="statistics presets need BatchNorm"):
        tta_norm.adapt(vit(), preset)
    with pytest.raises(ValueError, match="statistics presets need BatchNorm"):
        tta_norm.adapt(vit(), method="tent", alpha=0.5)
    tta = tta_norm.adapt(vit(), "source", "tent")
    assert tta.preset_name == "source"
    from tta_norm.norm import NormSpec

    # a NormSpec equal to the source preset is the source preset (it was refused for having no name)
    assert tta_norm.adapt(vit(), NormSpec(mixing="source"), "tent").preset_name == "source"
    with pytest.raises(ValueError, match="statistics presets need BatchNorm"):
        tta_norm.adapt(vit(), NormSpec(mixing="test"), "tent")
    model = vit().eval()
    with torch.no_grad():  # "source" alone wraps the model unchanged
        torch.testing.assert_close(tta_norm.adapt(model, "source")(X), model(X), rtol=0, atol=0)


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.ln = nn.LayerNorm(4)
        self.gn = nn.GroupNorm(2, 4)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        h = torch.relu(self.gn(self.bn(self.conv(x)))).mean((2, 3))
        return self.fc(self.ln(h))


def test_mixed_model_adapts_batchnorm_statistics_and_every_norm_affine() -> None:
    torch.manual_seed(0)
    model = Mixed().eval()
    x = torch.randn(8, 3, 6, 6)
    tta = tta_norm.adapt(model, "tbn", "tent", lr=0.01)
    names = [n for n, _ in tta.method.named_params]
    assert names == ["bn.weight", "bn.bias", "ln.weight", "ln.bias", "gn.weight", "gn.bias"]
    reference = copy.deepcopy(model).train()  # test-batch statistics = train-mode BatchNorm
    torch.testing.assert_close(tta(x), reference(x))
    assert all(not torch.equal(p, model.get_parameter(n)) for n, p in tta.method.named_params)


def test_a_norm_affine_two_layers_share_takes_one_step() -> None:
    torch.manual_seed(0)
    first, second = nn.LayerNorm(8), nn.LayerNorm(8)
    second.weight, second.bias = first.weight, first.bias  # tied: one parameter, two layers
    with torch.no_grad():
        first.weight.uniform_(0.5, 1.5)
    model = nn.Sequential(nn.Linear(4, 8), first, nn.Linear(8, 8), second, nn.Linear(8, 5)).eval()
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    weight = first.weight.detach().clone()
    logits = model(x)
    (grad,) = torch.autograd.grad(entropy(logits).mean(0), [first.weight])  # both uses, summed once
    tta = tta_norm.adapt(model, method="tent", optimizer="sgd", optim={"lr": 0.1, "momentum": 0.0})
    assert [n for n, _ in tta.method.named_params] == ["1.weight", "1.bias"]
    tta(x)
    torch.testing.assert_close(tta.model[1].weight.detach(), weight - 0.1 * grad)
    assert tta.model[3].weight is tta.model[1].weight


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["tent", "eata", "sar"])
def test_gradient_methods_refuse_reduced_precision_parameters(dtype: torch.dtype, method: str) -> None:
    model = convnext().to(dtype)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=f"{str(dtype)[6:]}, too coarse") as err:
        tta_norm.adapt(model, method=method, inplace=True)
    assert "\n" not in str(err.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(p.requires_grad is False for p in model.parameters())  # flags untouched
