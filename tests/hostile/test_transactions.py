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
def test_gradient_method_failing_forward_takes_no_step(path, method):
    tta = tta_norm.adapt(_conv_net(), "ema", method=method, steps=2 if method == "tent" else 1)
    x = torch.randn(8, 3, 32, 32)
    tta(x)
    tta(x + 0.5)  # optimiser moments exist now
    before = _state(tta)
    with pytest.raises(ValueError, match="could not process"):
        tta(torch.randn(8, 3, 20, 20))
    _assert_same(before, _state(tta))


@pytest.mark.parametrize("method", ["tent", "sar"])
def test_failure_after_the_optimiser_step_is_rolled_back(path, method, monkeypatch):
    tta = tta_norm.adapt(_conv_net(), "ema", method=method)
    x = torch.randn(8, 3, 32, 32)
    tta(x)
    before = _state(tta)
    real_step = type(tta.method).adapt_step

    def step_then_fail(self, xb, logits):
        real_step(self, xb, logits)  # parameters, moments and EMA have moved
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(tta.method), "adapt_step", step_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        tta(x * 0.9)
    _assert_same(before, _state(tta))


@pytest.mark.parametrize("preset", ["tbn", "ema", "medbn", "alpha", "iabn", "ttn"])
def test_non_finite_outputs_are_refused_like_non_finite_inputs(path, preset):
    tta = tta_norm.adapt(_conv_net(), preset)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        tta(x)
        before = _state(tta)
        huge = x * 1e30  # finite input, non-finite statistics (float32)
        try:
            out = tta(huge)
        except ValueError as err:
            assert "NaN or Inf logits" in str(err)
            _assert_same(before, _state(tta))
            skipped = tta_norm.adapt(_conv_net(), preset, on_bad_batch="skip")
            skipped(x)
            kept = _state(skipped)
            skipped(huge)
            assert skipped.skipped_batches == 1
            _assert_same(kept, _state(skipped))
        else:
            assert torch.isfinite(out).all()  # a preset that keeps its state finite (EMA drops the batch)


def _huge_batch_outcome(preset: str) -> tuple:
    tta = tta_norm.adapt(_conv_net(), preset)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        try:
            out = tta(x * 1e30)
        except ValueError:
            return ("raised", None, [b.clone() for b in tta.model.buffers()])
    return ("adapted", out, [b.clone() for b in tta.model.buffers()])


@pytest.mark.parametrize("preset", ["tbn", "ema", "medbn", "medbn-mad", "alpha", "iew", "source"])
def test_kernel_and_aten_agree_on_extreme_inputs(preset, monkeypatch):
    from tta_norm import kernels

    if kernels.kernel() is None:
        pytest.skip("compiled kernel unavailable")
    fused = _huge_batch_outcome(preset)
    monkeypatch.setattr(kernels, "_lib", None)
    aten = _huge_batch_outcome(preset)
    assert fused[0] == aten[0]
    if fused[1] is not None:
        torch.testing.assert_close(fused[1], aten[1], rtol=1e-4, atol=0)
    for a, b in zip(fused[2], aten[2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch", [1, 2, 16])
def test_medbn_mad_kernel_and_aten_paths_are_equal(batch, monkeypatch):
    from tta_norm import kernels

    if kernels.kernel() is None:
        pytest.skip("compiled kernel unavailable")
    torch.manual_seed(0)
    model = cifar_resnet(20).eval()
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fused = tta_norm.adapt(model, "medbn-mad")(x)
        monkeypatch.setattr(kernels, "_lib", None)
        aten = tta_norm.adapt(model, "medbn-mad")(x)
    assert torch.equal(fused, aten)  # was 9e-3 apart at batch 1: MAD near 0 amplified 1-ulp differences


def test_failed_batch_does_not_apply_a_due_reset(path):
    tta = tta_norm.adapt(_conv_net(), "ema", method="tent", reset_every=1)
    tta(torch.randn(8, 3, 32, 32))
    before = _state(tta)
    with pytest.raises(ValueError):
        tta(torch.randn(8, 3, 20, 20))  # the reset due before this batch is rolled back with it
    _assert_same(before, _state(tta))
    assert tta.num_resets == 0


def test_window_buffer_is_rolled_back(path):
    tta = tta_norm.adapt(_bn_flatten_linear(), "ema", window=4)
    with torch.no_grad():
        tta(torch.rand(1, 3, 32, 32))
        tta(torch.rand(1, 3, 32, 32))
        buffered = tta._window_buffer.clone()
        with pytest.raises(ValueError):
            tta(torch.rand(1, 3, 32, 32) * float("nan"))
        assert torch.equal(tta._window_buffer, buffered)


@pytest.mark.parametrize("method", ["tent", "eata", "sar"])
@pytest.mark.parametrize("preset", ["medbn", "medbn-mad", "alpha"])
def test_a_gradient_method_never_steps_on_non_finite_logits(preset, method):
    """Overflowing statistics (median or mixed) of a ResNet: no step at all (TENT and EATA already skipped a
    non-finite loss; SAR used to fail inside the median's backward or step on NaN)."""
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(0)
    net = cifar_resnet(20).eval()
    raising = tta_norm.adapt(net, preset, method)
    raising(x)
    before = _state(raising)
    steps = []
    raising.method.optimizer.register_step_pre_hook(lambda *_: steps.append(1))
    with pytest.raises(ValueError, match="NaN or Inf logits"):
        raising(x * 1e30)  # finite input whose statistics overflow (float32)
    assert steps == []  # no step was taken (not only rolled back)
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
    unnamed = sar.state()
    del unnamed["method"]["class"]  # a state saved before states named their method still loads
    sar.load_state(unnamed)
    broken = sar.state()
    broken["model"] = {k: (v[:1] if k.endswith("ema_mean") else v) for k, v in broken["model"].items()}
    with pytest.raises(ValueError, match="shape mismatches"):
        sar.load_state(broken)
    late = sar.state()
    late["model"] = {k: v + 1 if v.is_floating_point() else v for k, v in late["model"].items()}
    late["method"]["optimizer"]["param_groups"] = []  # fails after the model part was loaded: rolled back
    with pytest.raises(ValueError):
        sar.load_state(late)
    stray = sar.state()
    stray["method"]["attributes"] = {"stray": 1, **stray["method"]["attributes"]}
    with pytest.raises(ValueError, match="attributes"):
        sar.load_state(stray)  # an attribute this method does not have
    assert not hasattr(sar.method, "stray")
    for broken_method in ({"class": "SAR", "optimizer": sar.state()["method"]["optimizer"]},
                          {**sar.state()["method"], "attributes": [1]}):  # fmt: skip
        with pytest.raises(ValueError, match="attributes"):  # (a KeyError/AttributeError once)
            sar.load_state({**sar.state(), "method": broken_method})
    uncopyable = sar.state()
    rest = {k: v for k, v in uncopyable["method"]["attributes"].items() if k not in ("steps", "loss_ema")}
    uncopyable["method"]["attributes"] = {"steps": 99, **rest, "loss_ema": (i for i in ())}
    with pytest.raises(TypeError):
        sar.load_state(uncopyable)  # fails after it set an attribute: that one comes back
    assert sar.method.steps != 99
    adam = tta_norm.adapt(_conv_net(), "ema", "sar")
    sgd = tta_norm.adapt(_conv_net(), "ema", "sar", optimizer="sgd")
    sgd_before = _state(sgd)
    with pytest.raises(ValueError, match="not this wrapper's SGD"):
        sgd.load_state(adam.state())  # (it loaded, and every later step failed on the missing 'momentum')
    _assert_same(sgd_before, _state(sgd))
    sgd(x)
    no_window = sar.state()
    no_window["window"] = [1.0]
    with pytest.raises(ValueError, match="window"):
        sar.load_state(no_window)
    for counters in ({**sar.state()["counters"], "num_batches": "3"}, {**sar.state()["counters"], "num_resets": -1}):
        with pytest.raises(ValueError, match="counter"):
            sar.load_state({**sar.state(), "counters": counters})
    no_counters = {k: v for k, v in sar.state().items() if k != "counters"}
    with pytest.raises(ValueError, match="parts"):
        sar.load_state(no_counters)
    with pytest.raises(RuntimeError, match="does not fit") as err:
        sar.load_state_dict({k: (v[:1] if k.endswith("ema_mean") else v) for k, v in sar.state_dict().items()})
    assert "\n" not in str(err.value)
    given = {k: v.clone() + (1 if v.is_floating_point() else 0) for k, v in sar.state_dict().items()}
    given[next(k for k in given if k.endswith("ema_mean"))] = torch.zeros(1)
    kept = {k: v.clone() for k, v in given.items()}
    with pytest.raises(RuntimeError, match="does not fit"):
        sar.load_state_dict(given, assign=True)  # swaps tensors in before it fails: the wrapper's come back
    assert all(torch.equal(given[k], kept[k]) for k in given)  # and the caller's are left alone
    assert all(p is q for p, q in zip(sar.method.params, [p for _, p in sar.method.named_params], strict=True))
    _assert_same(before, _state(sar))


def test_loading_keeps_the_layers_own_key_migrations():
    """An adapted SaAuxBN state with the old ``branch_*`` key names still loads, through the wrapper's
    ``load_state_dict`` and as an ``init_state`` (the layer renames them when it loads)."""
    from tta_norm.layers import SaAuxBatchNorm2d

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 1), SaAuxBatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    tta = tta_norm.adapt(net, "tbn")
    old = {k.replace("domain_weight", "branch_weight").replace("domain_bias", "branch_bias"): v
           for k, v in tta.state_dict().items()}  # fmt: skip
    assert any("branch_weight" in k for k in old)
    with pytest.warns(DeprecationWarning):
        tta.load_state_dict(old)
    with pytest.warns(DeprecationWarning):
        tta_norm.adapt(net, "tbn", init_state={k[len("model."):]: v for k, v in old.items()})


def test_a_state_of_other_statistics_or_window_is_refused():
    """States that loaded and then failed every forward (or silently changed nothing): tbn statistics into a
    medbn wrapper (the same tensors), a window of other samples or of more samples than the window keeps."""
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    medbn = tta_norm.adapt(_conv_net(), "medbn", "tent")
    with pytest.raises(ValueError, match="statistics"):
        medbn.load_state(tta_norm.adapt(_conv_net(), "tbn", "tent").state())
    windowed = tta_norm.adapt(_conv_net(), "tbn", window=4)
    windowed(x[:1])
    windowed(x[1:2])
    before = _state(windowed)
    good = windowed.state()
    for window in (torch.randn(2, 3, 16, 16), torch.randn(4, 3, 32, 32), torch.randn(3, 32, 32)[None, None],
                   torch.zeros(2, 3, 32, 32, dtype=torch.uint8)):  # fmt: skip
        with pytest.raises(ValueError, match="window part"):
            windowed.load_state({**good, "window": window})
    _assert_same(before, _state(windowed))
    with pytest.raises(ValueError, match="window part"):  # a wrapper without a window keeps none
        tta_norm.adapt(_conv_net(), "tbn").load_state({**good, "counters": good["counters"]})
    windowed.load_state({**good, "window": good["window"].double()})  # cast like a batch is
    assert windowed.state()["window"].dtype == torch.float32
    windowed(x[2:3])


@pytest.mark.parametrize("policy", [{"episodic": True}, {"reset_every": 1}])
def test_a_skipped_batch_is_predicted_after_the_reset_that_is_due(policy):
    """An episodic (or reset_every) wrapper predicted a skipped batch from the previous batch's adapted state."""
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    bad = x.flip(0).clone()
    bad[0, 0, 0, 0] = float("nan")  # skipped; the other samples' predictions stay finite
    fresh = tta_norm.adapt(_conv_net(), "ema", on_bad_batch="skip")
    expected = fresh(bad)
    tta = tta_norm.adapt(_conv_net(), "ema", on_bad_batch="skip", **policy)
    tta(x)
    got = tta(bad)
    assert bool(torch.isfinite(got[1:]).all())
    torch.testing.assert_close(got, expected, equal_nan=True)
    assert tta.skipped_batches == 1 and tta.num_batches == 2
