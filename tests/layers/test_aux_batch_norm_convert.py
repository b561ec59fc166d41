"""convert_to_aux_bn on models beyond plain BatchNorm2d layers: converted already, SyncBatchNorm, BatchNorm2d
subclasses, frozen or parametrized BNs, a model that is itself a BN."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from tta_norm.layers import convert_to_aux_bn


@pytest.mark.parametrize("kind", ["aux", "saaux"])
def test_a_converted_model_is_refused_unchanged(kind: str) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    assert convert_to_aux_bn(model, kind) == ["1"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layer = model[1]
    with pytest.raises(ValueError, match=r"convert_to_aux_bn: the model already has AuxBN/SaAuxBN layers \(1\)"):
        convert_to_aux_bn(model, kind)
    assert model[1] is layer and all(type(b) is nn.BatchNorm2d for b in layer.bns)
    assert model.state_dict().keys() == before.keys()


class PlainSubclass(nn.BatchNorm2d):
    """A BatchNorm2d subclass that keeps BatchNorm's forward and state (converted)."""


class Positive(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w.abs()


class FrozenBN(nn.Module):
    """Fixed statistics and affine as buffers (as torchvision's FrozenBatchNorm2d): no _BatchNorm."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.running_mean[:, None, None]) * (self.running_var[:, None, None] + 1e-5).rsqrt()


def _randomized(bn: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in [*bn.named_parameters(), *bn.named_buffers()]:
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + 0.5 if "var" in name or "weight" in name
                        else torch.randn(t.shape, generator=g))  # fmt: skip
    return bn


SOURCES = {
    "sync": lambda: nn.SyncBatchNorm(3),
    "sync-no-affine-cumulative": lambda: nn.SyncBatchNorm(3, eps=1e-3, momentum=None, affine=False),
    "subclass": lambda: PlainSubclass(3, eps=1e-2, momentum=0.3),
    "subclass-no-stats": lambda: PlainSubclass(3, track_running_stats=False),
}


@pytest.mark.parametrize("kind", ["aux", "saaux"])
@pytest.mark.parametrize("source", sorted(SOURCES))
def test_sync_and_subclassed_batchnorms_convert_exactly_on_every_domain(kind: str, source: str) -> None:
    x = torch.randn(6, 3, 4, 4, generator=torch.Generator().manual_seed(1)) * 2 + 1
    for train in (False, True):
        for domain in range(2):
            bn = _randomized(SOURCES[source](), 0).train(train)
            model = nn.Sequential(copy.deepcopy(bn))
            assert convert_to_aux_bn(model, kind) == ["0"]
            layer = model[0]
            assert layer.training is train and all(type(b) is _base(bn) for b in layer.bns)
            inner = layer.bns[domain]
            for attr in ("eps", "momentum", "track_running_stats") + (("affine",) if kind == "aux" else ()):
                assert getattr(inner, attr) == getattr(bn, attr), attr  # (SaAuxBN's affine is outside its bns)
            layer.domain = domain
            torch.testing.assert_close(layer(x), bn(x), atol=1e-6, rtol=1e-6)
            if bn.track_running_stats:  # the running statistics moved alike
                torch.testing.assert_close(inner.running_mean, bn.running_mean)
                torch.testing.assert_close(inner.running_var, bn.running_var)
                assert inner.num_batches_tracked == bn.num_batches_tracked


def _base(bn: nn.Module) -> type:
    return nn.SyncBatchNorm if isinstance(bn, nn.SyncBatchNorm) else nn.BatchNorm2d


def test_batchnorms_it_cannot_represent_are_left_and_named_in_one_warning() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4), nn.BatchNorm2d(4), nn.BatchNorm2d(4),
                          nn.BatchNorm2d(4), FrozenBN(4), nn.Flatten(2), nn.BatchNorm1d(4))  # fmt: skip
    parametrize.register_parametrization(model[3], "weight", Positive())
    model[4].track_running_stats = False  # keeps buffers it neither updates nor would carry into an AuxBN
    with pytest.warns(UserWarning, match=r"convert_to_aux_bn: left unconverted .*: 3 \(ParametrizedBatchNorm2d\), "
                      r"4 \(BatchNorm2d\), 5 \(FrozenBN\), 7 \(BatchNorm1d\)$") as caught:  # fmt: skip
        names = convert_to_aux_bn(model, "aux")
    assert len(caught) == 1 and names == ["1", "2"]
    assert [type(m).__name__ for m in model][1:6] == ["AuxBatchNorm2d", "AuxBatchNorm2d", "ParametrizedBatchNorm2d",
                                                      "BatchNorm2d", "FrozenBN"]  # fmt: skip
    with pytest.raises(ValueError, match=r"no nn.BatchNorm2d layer to convert; left: 0 \(FrozenBN\)"):
        convert_to_aux_bn(nn.Sequential(FrozenBN(4)))


@pytest.mark.parametrize("bn", [nn.BatchNorm2d(4), nn.SyncBatchNorm(4), nn.BatchNorm1d(4)])
def test_a_model_that_is_a_batchnorm_is_refused_in_one_line(bn: nn.Module) -> None:
    with pytest.raises(ValueError, match=r"^convert_to_aux_bn: the model is itself a \w+.*from_batchnorm[^\n]*$"):
        convert_to_aux_bn(bn)
