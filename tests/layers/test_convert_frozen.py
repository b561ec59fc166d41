"""The layer converters name the frozen BatchNorms (running statistics, but no torch ``_BatchNorm``) they leave."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from tta_norm.layers import (
    BatchGroupNorm,
    GroupNormProxyAct,
    convert_to_batch_group_norm,
    convert_to_ghost_bn,
    convert_to_gn_pn,
    convert_to_group_norm,
)


class FrozenBN(nn.Module):
    """A BatchNorm with fixed statistics and affine, all buffers (as torchvision's FrozenBatchNorm2d)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            self.register_buffer(name, torch.full((c,), value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + 1e-5).rsqrt()
        return x * scale[:, None, None] + (self.bias - self.running_mean * scale)[:, None, None]


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 1), FrozenBN(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU())


@pytest.mark.parametrize(
    "convert",
    [
        lambda m: convert_to_group_norm(m, 2),
        lambda m: convert_to_batch_group_norm(m, 2),
        lambda m: convert_to_ghost_bn(m, 2),
        lambda m: convert_to_gn_pn(m, 2),
        lambda m: convert_to_gn_pn(m, 2, method="sequential"),
    ],
)
def test_a_frozen_batchnorm_left_unconverted_is_named_in_one_warning(convert) -> None:
    model = _net()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = convert(model)
    messages = [str(w.message) for w in caught if "1 (FrozenBN)" in str(w.message)]
    assert len(messages) == 1 and "left unchanged" in messages[0], [str(w.message) for w in caught]
    assert type(model[1]) is FrozenBN and type(out.get_submodule("4")) is not nn.BatchNorm2d


def test_torchvision_frozen_batchnorm_is_named_too() -> None:
    ops = pytest.importorskip("torchvision.ops")
    model = nn.Sequential(nn.Conv2d(3, 4, 1), ops.FrozenBatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4), nn.ReLU())
    with pytest.warns(UserWarning, match=r"convert_to_gn_pn: left unchanged .*1 \(FrozenBatchNorm2d\)"):
        gm = convert_to_gn_pn(model, 2)
    assert isinstance(gm.get_submodule("3"), GroupNormProxyAct)
    with pytest.warns(UserWarning, match=r"convert_to_group_norm: left unchanged .*1 \(FrozenBatchNorm2d\)"):
        convert_to_group_norm(model, 2)


def test_a_batch_group_norm_is_not_named_by_its_own_converter() -> None:
    model = nn.Sequential(BatchGroupNorm(4, 2), nn.BatchNorm2d(4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert_to_batch_group_norm(model, 2)
    assert type(model[1]) is BatchGroupNorm
