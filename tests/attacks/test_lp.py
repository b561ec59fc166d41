"""Adaptive Lp attacks: projection by hand, budgets, the deployed function and its untouched state, snapshots,
the pyautoattack glue."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import tta_norm
from tta_norm.attacks.lp import deployed_forward, frozen_snapshot, pgd_attack, project, run_autoattack, threat_model

from .nets import batch, conv_bn_net
from .test_malicious import _assert_same_state, _state


def test_projection_by_hand():
    x = torch.zeros(2, 1, 1, 2)
    adv = torch.tensor([[[[0.3, 0.4]]], [[[0.03, 0.04]]]])
    out = project(adv, x, 0.1, "L2")  # first sample: norm 0.5 -> scaled to 0.1; second (0.05) unchanged
    assert torch.allclose(out[0].flatten(), torch.tensor([0.06, 0.08]))
    assert torch.allclose(out[1].flatten(), torch.tensor([0.03, 0.04]))
    assert torch.equal(project(adv, x, 0.1, "Linf")[0].flatten(), torch.tensor([0.1, 0.1]))
    assert torch.equal(project(-adv, x, 0.1, "Linf"), torch.zeros_like(x))  # [0, 1] clip


@pytest.mark.parametrize("norm,eps", [("Linf", 8 / 255), ("L2", 0.5)])
def test_pgd_budget_and_loss(norm, eps):
    x, y = batch(10, seed=2)
    tta = tta_norm.adapt(conv_bn_net(), "tbn")
    g = torch.Generator().manual_seed(0)
    x_adv = pgd_attack(tta, x, y, norm=norm, eps=eps, step_size=eps / 4, steps=10, generator=g)
    delta = (x_adv - x).flatten(1)
    bound = delta.abs().max(1).values if norm == "Linf" else delta.norm(dim=1)
    assert (bound <= eps + 1e-5).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        f = deployed_forward(tta)
        assert F.cross_entropy(f(x_adv), y) > F.cross_entropy(f(x), y)


@pytest.mark.parametrize("preset,method", [("tbn", None), ("ema", None), ("medbn", "tent")])
def test_pgd_attacks_the_deployed_function_and_leaves_state(preset, method):
    x, y = batch(10, seed=3)
    tta = tta_norm.adapt(conv_bn_net(), preset, method)
    with torch.enable_grad():
        tta(batch(10, seed=8)[0])
    before, mode, counters = _state(tta), tta.model.training, (tta.num_batches, tta.num_adapted)
    with torch.no_grad():
        deployed = deployed_forward(tta)(x)
    pgd_attack(tta, x, y, steps=3)
    _assert_same_state(before, _state(tta))
    assert tta.model.training == mode and (tta.num_batches, tta.num_adapted) == counters
    assert all(p.grad is None for p in tta.model.parameters())
    with torch.enable_grad():
        returned = tta(x)  # the victim's own prediction is the attacked function
    assert torch.allclose(deployed, returned, atol=1e-6)


def test_plain_module_mode_is_not_switched():
    model = conv_bn_net().train()
    x, y = batch(6)
    pgd_attack(model, x, y, steps=1)
    assert model.training


@pytest.mark.parametrize("preset", ["tbn", "ema", "medbn", "iabn"])
def test_frozen_snapshot_is_static_and_matches_on_the_reference(preset):
    x, _ = batch(10, seed=4)
    tta = tta_norm.adapt(conv_bn_net(), preset)
    before = _state(tta)
    snap = frozen_snapshot(tta, x)
    _assert_same_state(before, _state(tta))
    with torch.no_grad():
        ref = deployed_forward(tta)(x)
        full = snap(x)
        assert torch.allclose(full, ref, atol=1e-5)
        assert torch.allclose(snap(x[:3]), full[:3], atol=1e-5)  # per-sample: independent of the batch


def test_autoattack_glue_with_a_fake_package(monkeypatch):
    calls = {}

    class FakeAutoAttack:
        def __init__(self, model, *, norm, eps, version, seed, device, attacks=None):
            calls["init"] = {"norm": norm, "eps": eps, "version": version, "seed": seed, "device": str(device)}
            self.model = model

        def run_standard_evaluation(self, x, y, /, *, batch_size=250, state_path=None):
            calls["batch_size"] = batch_size
            x.view(x.shape[0], -1)  # pyautoattack 0.2 views inputs and their gradients: fails if not contiguous
            return x + 0, self.model(x).argmax(1)

    monkeypatch.setitem(sys.modules, "pyautoattack", SimpleNamespace(AutoAttack=FakeAutoAttack))
    model = conv_bn_net()
    x, y = batch(4)
    x_adv, y_adv = run_autoattack(model, x, y, eps=8 / 255, batch_size=2)
    assert calls["batch_size"] == 2 and calls["init"]["norm"] == "Linf" and calls["init"]["device"] == "cpu"
    assert torch.equal(x_adv, x) and y_adv.shape == (4,)
    x_cl = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # channels-last strides, as from HWC images
    assert torch.equal(run_autoattack(model, x_cl, y, batch_size=2)[0], x)
    with pytest.raises(TypeError, match="static"):
        run_autoattack(tta_norm.adapt(model, "tbn"), x, y)
    monkeypatch.setitem(sys.modules, "pyautoattack", None)
    with pytest.raises(ImportError, match="pip install pyautoattack"):
        run_autoattack(model, x, y)


def test_threat_model_text():
    text = threat_model(attack="AutoAttack", norm="Linf", eps=8 / 255, batch_size=200, attacker_fraction=1.0,
                        box="white", state="frozen snapshot")  # fmt: skip
    assert "8/255" in text and "100%" in text and "white box" in text


@pytest.mark.parametrize("policy", [{"window": 16}, {"episodic": True, "method": "tent"}, {"reset_every": 1}])
def test_pgd_differentiates_what_the_deployed_model_will_compute(policy):
    """The attacked function skipped the window's samples and a reset that was due: its logits were 0.08-0.36
    off the deployed model's."""
    method = policy.pop("method", None)
    lr = {"lr": 0.05} if method else {}
    tta = tta_norm.adapt(conv_bn_net(), "ema" if "reset_every" in policy else "tbn", method, **lr, **policy)
    with torch.enable_grad():
        for seed in (4, 5):
            tta(batch(6, seed=seed)[0] * 0.5)
    x, _ = batch(6, seed=2)
    before = _state(tta)
    with torch.no_grad():
        attacked = deployed_forward(tta)(x)
    _assert_same_state(_state(tta), before)
    with torch.enable_grad():
        expected = tta(x)
    torch.testing.assert_close(attacked, expected, rtol=1e-5, atol=1e-5)


def test_pgd_takes_inputs_as_the_wrapper_does_and_refuses_bad_ones():
    """A float32 batch on a float64 wrapper failed inside the convolution; NaN pixels passed the range check."""
    tta = tta_norm.adapt(conv_bn_net().double(), "tbn")
    x, y = batch(6, seed=2)
    x_adv = pgd_attack(tta, x, y, steps=2, generator=torch.Generator().manual_seed(0))
    assert x_adv.dtype == x.dtype and (x_adv - x).abs().max() <= 8 / 255 + 1e-6
    with pytest.raises(ValueError, match="NaN"):
        pgd_attack(tta, x.clone().index_fill_(0, torch.tensor([1]), float("nan")), y, steps=1)
    with pytest.raises(ValueError, match="labels of shape"):
        pgd_attack(tta, x, y[:3], steps=1)
    with pytest.raises(ValueError, match="non-empty"):
        pgd_attack(tta, x[:0], y[:0], steps=1)
