"""timm's model zoo, randomly initialised: conversion is exact on every BatchNorm architecture (timm builds most
of them with ``BatchNormAct2d``), a TENT step equals a hand-written one, and LayerNorm/GroupNorm models keep their
eval-mode outputs under the ``source`` preset and take the hand-written TENT step on their LayerNorm/GroupNorm
affine parameters."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

import tta_norm
from tests.norm.invariants import assert_invariants, randomize_batchnorms
from tta_norm.methods.base import softmax_entropy

timm = pytest.importorskip("timm")

BN_MODELS = [
    "efficientnet_b0",
    "mobilenetv3_small_100",
    "regnety_002",
    "resnet18d",
    "densenet121",
    "rexnet_100",
    "ghostnet_100",
    "dla34",
    "dpn68",
    "hrnet_w18_small",
    "cspresnet50",
    "mobilenetv2_050",
    "repvgg_a0",
]
PLAIN_BN_MODELS = {"resnet18d", "dla34", "hrnet_w18_small"}  # the others use timm's BatchNormAct2d
LN_GN_MODELS = {
    "vit_tiny_patch16_224": {"img_size": 32},
    "convnext_atto": {},
    "resnet50_gn": {},
}
HYBRID_MODELS = {  # attention with BatchNorm instead of LayerNorm: LeViT's BatchNorm1d over flattened tokens
    "levit_128s": {"img_size": 96},
    "efficientvit_m0": {"img_size": 96},
}
TENT_LR = 0.05


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Small forwards on a shared machine: one intra-op thread is several times faster than contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images() -> Tensor:
    """Two 64-pixel images: at stride 32 the last stage still sees 8 values per channel (fewer make the batch
    variance of random-init channels so small that float noise from earlier layers dominates)."""
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def build(name: str, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=10, drop_rate=0.0, **kwargs)
    return randomize_batchnorms(model, seed).eval()


@pytest.mark.parametrize("name", BN_MODELS)
def test_batchnorm_model_conversion_is_exact_and_tent_steps_as_by_hand(name: str, images: Tensor) -> None:
    model = build(name)
    norm_act = {type(m).__name__ for m in model.modules() if isinstance(m, timm.layers.BatchNormAct2d)}
    assert bool(norm_act) == (name not in PLAIN_BN_MODELS)
    assert_invariants(model, images)

    # TENT (SGD, one step): the wrapper's logits are the train-mode logits, its update the hand-written one
    tta = tta_norm.adapt(model, "tbn", method="tent", optimizer="sgd", lr=TENT_LR)
    logits = tta(images)
    ref = copy.deepcopy(model).train()
    bns = [m for m in ref.modules() if isinstance(m, _BatchNorm)]
    params = [p for m in bns for p in (m.weight, m.bias)]
    ref_logits = ref(images)
    softmax_entropy(ref_logits).mean(0).backward()
    with torch.no_grad():
        for p in params:
            p -= TENT_LR * p.grad
    torch.testing.assert_close(logits, ref_logits.detach(), rtol=1e-4, atol=1e-5)
    adapted = [p.detach() for _, layer in tta.norm_layers() for p in (layer.weight, layer.bias)]
    source = [p.detach() for m in model.modules() if isinstance(m, _BatchNorm) for p in (m.weight, m.bias)]
    assert len(adapted) == len(params) == len(source)
    step = max((p.detach() - q).abs().max().item() for p, q in zip(params, source, strict=True))
    off = max((p.detach() - q).abs().max().item() for p, q in zip(params, adapted, strict=True))
    assert step > 1e-6, "the TENT step moved no parameter: the comparison could not fail"
    assert off <= 1e-3 * step + 1e-7, f"TENT update off by {off:.3g} (step size {step:.3g})"


@pytest.mark.parametrize("name", list(LN_GN_MODELS))
def test_layernorm_groupnorm_model_source_is_eval_mode_and_tent_steps_as_by_hand(name: str) -> None:
    """Models without BatchNorm: ``source`` changes nothing, and TENT takes the hand-written SGD step on the
    affine parameters of every LayerNorm/GroupNorm (the statistics are the layers' own, per sample)."""
    kwargs = LN_GN_MODELS[name]
    model = build(name, **kwargs)
    assert not any(isinstance(m, _BatchNorm) for m in model.modules())
    size = kwargs.get("img_size", 64)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(tta_norm.adapt(model, "source")(x), ref, rtol=0, atol=0)

    tta = tta_norm.adapt(model, "source", method="tent", optimizer="sgd", lr=TENT_LR)
    logits = tta(x)
    hand = copy.deepcopy(model)
    norms = [m for m in hand.modules() if isinstance(m, (nn.LayerNorm, nn.GroupNorm)) and m.weight is not None]
    params = [p for m in norms for p in (m.weight, m.bias)]
    hand_logits = hand(x)
    softmax_entropy(hand_logits).mean(0).backward()
    with torch.no_grad():
        for p in params:
            p -= TENT_LR * p.grad
    torch.testing.assert_close(logits, hand_logits.detach(), rtol=1e-4, atol=1e-5)
    adapted = [p.detach() for m in tta.model.modules() if isinstance(m, (nn.LayerNorm, nn.GroupNorm))
               and m.weight is not None for p in (m.weight, m.bias)]  # fmt: skip
    source = [p.detach() for m in model.modules() if isinstance(m, (nn.LayerNorm, nn.GroupNorm))
              and m.weight is not None for p in (m.weight, m.bias)]  # fmt: skip
    assert len(adapted) == len(params) == len(source) > 0
    step = max((p.detach() - q).abs().max().item() for p, q in zip(params, source, strict=True))
    off = max((p.detach() - q).abs().max().item() for p, q in zip(params, adapted, strict=True))
    assert step > 1e-6, "the TENT step moved no parameter: the comparison could not fail"
    assert off <= 1e-3 * step + 1e-7, f"TENT update off by {off:.3g} (step size {step:.3g})"


@pytest.mark.parametrize("name", list(HYBRID_MODELS))
def test_token_batchnorm_models_are_exact_and_prior_counts_images(name: str) -> None:
    """Attention networks normalised by BatchNorm (LeViT: BatchNorm1d over images x tokens rows; EfficientViT-MSRA:
    BatchNorm2d, a BatchNorm1d head): the conversion is exact, and the ``prior`` preset mixes with n / (N + n)
    for the n images of the batch in every layer.  (Four
    96-pixel images: with two 64-pixel ones the last stage normalises two rows, where a random-init network
    turns float rounding into differences of the order of the outputs, in float64 too.)"""
    size = HYBRID_MODELS[name]["img_size"]
    images = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    model = build(name, **HYBRID_MODELS[name])
    assert any(type(m) is nn.BatchNorm1d for m in model.modules())
    assert_invariants(model, images, atol=1e-4)  # float32 rounding grows through random-init attention stages
    n = images.shape[0]
    with torch.no_grad():
        prior = tta_norm.adapt(model, "prior")(images)
        alpha = tta_norm.adapt(model, "alpha", alpha=n / (16 + n))(images)
    torch.testing.assert_close(prior, alpha, rtol=0, atol=0)
