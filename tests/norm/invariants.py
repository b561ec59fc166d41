"""Shared checks of the conversion invariants: ``source`` equals ``eval()``, ``tbn`` equals ``train()``."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

import tta_norm


def randomize_batchnorms(model: nn.Module, seed: int) -> nn.Module:
    """Give every BatchNorm seeded non-trivial running statistics and affine parameters (in place), so that
    ``eval()`` and ``train()`` outputs differ and a dropped statistic or affine shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, _BatchNorm):
                continue
            c = m.num_features
            if m.running_mean is not None:
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.running_var.copy_(0.75 + 0.5 * torch.rand(c, generator=g))
            if m.affine:
                m.weight.copy_(0.8 + 0.4 * torch.rand(c, generator=g))
                m.bias.copy_(0.1 * torch.randn(c, generator=g))
    return model


def references(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(model.eval()(x), model.train()(x))`` with dropout off in both; the model itself is not changed (train
    mode runs on a copy)."""
    trained = copy.deepcopy(model).train()
    for m in trained.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()
    with torch.no_grad():
        ref_eval = model.eval()(x)
        ref_train = trained(x)
    return ref_eval, ref_train


def adapted(model: nn.Module, preset: str, x: Tensor) -> Tensor:
    with torch.no_grad():
        return tta_norm.adapt(model, preset)(x)


def assert_invariants(model: nn.Module, x: Tensor, *, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """``adapt(model, "source")(x) == model.eval()(x)`` and ``adapt(model, "tbn")(x) == model.train()(x)``."""
    ref_eval, ref_train = references(model, x)
    scale = ref_train.abs().max().item() + ref_eval.abs().max().item()
    # the two references differ, so each comparison below can fail
    assert (ref_eval - ref_train).abs().max().item() > 100 * (atol + rtol * scale)
    torch.testing.assert_close(adapted(model, "source", x), ref_eval, rtol=rtol, atol=atol)
    torch.testing.assert_close(adapted(model, "tbn", x), ref_train, rtol=rtol, atol=atol * max(scale, 1.0))
