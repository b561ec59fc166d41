"""All-or-nothing adaptation: a failed forward or step leaves every piece of state unchanged bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import tta_norm
from tta_norm.models import cifar_resnet


def _bn_flatten_linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3 * 32 * 32, 10)).eval()


def _conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 30 * 30, 10)
    ).eval()


def _state(tta) -> dict:
    """Everything an adapting forward may change, copied."""
    out = {f"model.{k}": v.clone() for k, v in tta.model.state_dict().items()}
    if tta.method is not None:
        out["optimizer"] = copy.deepcopy(tta.method.optimizer.state_dict())
        out["method"] = {k: copy.deepcopy(v) for k, v in vars(tta.method).items()
                         if k not in ("model", "optimizer", "params", "named_params", "fishers")}  # fmt: skip
    out["counters"] = (tta.num_adapted, tta.num_resets)
    return out


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k].view(-1).view(torch.uint8) if a[k].is_floating_point() else a[k],
                               b[k].view(-1).view(torch.uint8) if b[k].is_floating_point() else b[k]), k  # bits
        else:
            assert repr(a[k]) == repr(b[k]), k


def test_shape_error_late_in_the_forward_leaves_the_ema_untouched(path):
    tta = tta_norm.adapt(_bn_flatten_linear(), "ema")
    with torch.no_grad():
        tta(torch.rand(4, 3, 32, 32))  # one good batch: the state is not the source state any more
    before = tta.model[0].ema_mean.clone(), tta.model[0].ema_var.clone()
    with pytest.raises(ValueError, match="could not process a batch"):
        with torch.no_grad():
            tta(torch.rand(4, 3, 16, 16))  # BatchNorm works, the Linear layer fails
    assert torch.equal(tta.model[0].ema_mean, before[0]) and torch.equal(tta.model[0].ema_var, before[1])
    assert tta.num_adapted == 1


@pytest.mark.parametrize("method", ["tent", "eata", "sar"])
@pytest.mark.parametrize("preset", ["medbn", "medbn-mad"])
def test_a_gradient_method_never_steps_on_non_finite_logits(preset, method):
    """A ResNet's overflowing median statistics: no backward through them (SAR's used to fail inside it)."""
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(0)
    net = cifar_resnet(20).eval()
    raising = tta_norm.adapt(net, preset, method)
    raising(x)
    before = _state(raising)
    with pytest.raises(ValueError, match="NaN or Inf logits"):
        raising(x * 1e30)  # finite input whose statistics overflow (float32)
    _assert_same(before, _state(raising))
    skipping = tta_norm.adapt(net, preset, method, on_bad_batch="skip")
    skipping(x)
    kept = _state(skipping)
    skipping(x * 1e30)
    assert skipping.skipped_batches == 1
    _assert_same(kept, _state(skipping))


def test_a_state_that_does_not_fit_is_refused_and_loads_nothing():
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    tent = tta_norm.adapt(_conv_net(), "ema", "tent")
    tent(x)
    sar = tta_norm.adapt(_conv_net(), "ema", "sar")
    sar(x)
    before = _state(sar)
    with pytest.raises(ValueError, match="of method 'Tent'"):
        sar.load_state(tent.state())  # another method's optimiser and attributes
    broken = sar.state()
    broken["model"] = {k: (v[:1] if k.endswith("ema_mean") else v) for k, v in broken["model"].items()}
    with pytest.raises(ValueError, match="shape mismatches"):
        sar.load_state(broken)
    late = sar.state()
    late["model"] = {k: v + 1 if v.is_floating_point() else v for k, v in late["model"].items()}
    late["method"]["optimizer"]["param_groups"] = []  # fails after the model part was loaded: rolled back
    with pytest.raises(ValueError):
        sar.load_state(late)
    no_counters = {k: v for k, v in sar.state().items() if k != "counters"}
    with pytest.raises(ValueError, match="parts"):
        sar.load_state(no_counters)
    with pytest.raises(RuntimeError, match="does not fit") as err:
        sar.load_state_dict({k: (v[:1] if k.endswith("ema_mean") else v) for k, v in sar.state_dict().items()})
    assert "\n" not in str(err.value)
    _assert_same(before, _state(sar))
