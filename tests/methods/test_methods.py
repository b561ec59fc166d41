"""Gradient methods against hand-written single steps, and the wrapper's reset policies."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import tta_norm
from tests.nets import tiny_net
from tta_norm.methods import entropy_margin

LR = 1e-3


def entropy(logits: torch.Tensor) -> torch.Tensor:
    p = logits.softmax(1)
    return -(p * p.log()).sum(1)


def bn_params(model):
    return [model.bn.weight, model.bn.bias, model.bn1d.weight, model.bn1d.bias]


def adam_first_step(p: torch.Tensor, g: torch.Tensor, lr: float = LR, eps: float = 1e-8) -> torch.Tensor:
    """Adam's first update written out: m_hat = g, v_hat = g^2."""
    b1, b2 = 0.9, 0.999
    m_hat = (1 - b1) * g / (1 - b1)
    v_hat = (1 - b2) * g * g / (1 - b2)
    return p - lr * m_hat / (v_hat.sqrt() + eps)


def ref_forward(model, x, params):
    """TinyNet with test-batch statistics (biased), affine taken from ``params``."""
    w, b, w1, b1 = params
    h = F.conv2d(x, model.conv.weight, model.conv.bias, padding=1)
    h = F.batch_norm(h, None, None, w, b, training=True)
    h = F.relu(h).mean((2, 3))
    h = F.batch_norm(F.linear(h, model.fc1.weight, model.fc1.bias), None, None, w1, b1, training=True)
    return F.linear(F.relu(h), model.fc2.weight, model.fc2.bias)


X = torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(0))


def test_tent_step_equals_hand_written_adam_step() -> None:
    model = tiny_net()
    tta = tta_norm.adapt(model, "tbn", method="tent", lr=LR)
    params = [p.detach().clone().requires_grad_(True) for p in bn_params(model)]
    ref_logits = ref_forward(model, X, params)
    grads = torch.autograd.grad(entropy(ref_logits).mean(0), params)
    logits = tta(X)
    torch.testing.assert_close(logits, ref_logits.detach())  # logits of the pass used for the update
    for p_new, p, g in zip(bn_params(tta.model), params, grads, strict=True):
        torch.testing.assert_close(p_new, adam_first_step(p.detach(), g))
    # the original model is untouched
    assert torch.equal(model.bn.weight, tiny_net().bn.weight)


def test_tent_only_trains_norm_affine() -> None:
    tta = tta_norm.adapt(tiny_net(), "tbn", method="tent")
    trainable = {n for n, p in tta.model.named_parameters() if p.requires_grad}
    assert trainable == {"bn.weight", "bn.bias", "bn1d.weight", "bn1d.bias"}
    conv_before = tta.model.conv.weight.clone()
    tta(X)
    assert torch.equal(tta.model.conv.weight, conv_before)


def test_eata_step_equals_hand_reference() -> None:
    model = tiny_net()
    e_margin = 0.4 * math.log(5)
    tta = tta_norm.adapt(model, "tbn", method="eata", lr=LR, e_margin=1.5, d_margin=0.05)
    params = [p.detach().clone().requires_grad_(True) for p in bn_params(model)]
    logits = ref_forward(model, X, params)
    ent = entropy(logits)
    keep = ent < 1.5
    assert 0 < keep.sum() < len(X), "the toy batch should exercise the filter"
    sel = ent[keep]
    loss = (sel * torch.exp(-(sel.detach() - 1.5))).mean()
    grads = torch.autograd.grad(loss, params)
    tta(X)
    for p_new, p, g in zip(bn_params(tta.model), params, grads, strict=True):
        torch.testing.assert_close(p_new, adam_first_step(p.detach(), g))
    probs = logits[keep].softmax(1).mean(0).detach()
    torch.testing.assert_close(tta.method.current_probs, probs)
    assert e_margin == pytest.approx(entropy_margin(5))


def test_eata_redundancy_filter_and_fisher() -> None:
    model = tiny_net()
    fisher_data = [X[:4], X[4:]]
    tta = tta_norm.adapt(model, "tbn", method="eata", e_margin=10.0, d_margin=2.0, fisher_data=fisher_data)
    fishers = tta.method.fishers
    assert set(fishers) == {"bn.weight", "bn.bias", "bn1d.weight", "bn1d.bias"}
    # Fisher = mean over batches of the squared gradient of the pseudo-label cross-entropy
    params = [p.detach().clone().requires_grad_(True) for p in bn_params(model)]
    acc = [torch.zeros_like(p) for p in params]
    for xb in fisher_data:
        lg = ref_forward(model, xb, params)
        gs = torch.autograd.grad(F.cross_entropy(lg, lg.argmax(1)), params)
        acc = [a + g**2 for a, g in zip(acc, gs, strict=True)]
    for (name, (f, anchor)), a, p in zip(fishers.items(), acc, params, strict=True):
        torch.testing.assert_close(f, a / 2, msg=name)
        torch.testing.assert_close(anchor, p.detach())
    tta(X)
    n_first = tta.method.num_samples_update
    assert n_first == len(X)  # d_margin=2: every sample is novel
    tta_strict = tta_norm.adapt(model, "tbn", method="eata", e_margin=10.0, d_margin=0.0)
    tta_strict(X)
    before = [p.clone() for p in bn_params(tta_strict.model)]
    tta_strict(X)  # |cos| < 0 never holds: nothing is novel, no update
    assert all(torch.equal(a, b) for a, b in zip(before, bn_params(tta_strict.model), strict=True))


def test_sar_step_equals_hand_reference() -> None:
    model = tiny_net()
    margin, rho = 1.5, 0.05
    tta = tta_norm.adapt(model, "tbn", method="sar", lr=LR, e_margin=margin, rho=rho)
    params = [p.detach().clone().requires_grad_(True) for p in bn_params(model)]
    logits = ref_forward(model, X, params)
    ent = entropy(logits)
    keep = ent < margin
    g1 = torch.autograd.grad(ent[keep].mean(), params)
    norm = torch.stack([g.norm() for g in g1]).norm()
    perturbed = [(p + rho * g / (norm + 1e-12)).detach().requires_grad_(True) for p, g in zip(params, g1, strict=True)]
    ent2 = entropy(ref_forward(model, X, perturbed))[keep]
    g2 = torch.autograd.grad(ent2[ent2 < margin].mean(), perturbed)
    out = tta(X)
    torch.testing.assert_close(out, logits.detach())
    for p_new, p, g in zip(bn_params(tta.model), params, g2, strict=True):
        torch.testing.assert_close(p_new, adam_first_step(p.detach(), g))
    assert tta.method.loss_ema == pytest.approx(float(ent2[ent2 < margin].mean().detach()))


def test_sar_model_recovery() -> None:
    tta = tta_norm.adapt(tiny_net(), "tbn", method="sar", e_margin=10.0, reset_constant=100.0)
    fresh = copy.deepcopy(tta.model.state_dict())
    tta(X)  # loss EMA < 100 -> recovery
    assert tta.num_resets == 1
    for k, v in tta.model.state_dict().items():
        assert torch.equal(v, fresh[k]), k
    assert tta.method.loss_ema is not None  # the EMA survives recovery, as in the reference


@pytest.mark.parametrize("method", [None, *tta_norm.methods()])
@pytest.mark.parametrize("preset", ["tbn", "ema", "medbn", "ttn"])
def test_reset_restores_outputs_bit_for_bit(preset: str, method: str | None) -> None:
    kwargs = {"e_margin": 10.0} if method in ("eata", "sar") else {}
    tta = tta_norm.adapt(tiny_net(), preset, method=method, **kwargs)
    first = tta(X)
    for seed in range(3):
        tta(torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(seed + 1)))
    changed = tta(X)
    tta.reset()
    again = tta(X)
    assert torch.equal(first, again)
    if method is not None or preset == "ema":
        assert not torch.equal(first, changed)


def test_episodic_and_reset_every() -> None:
    ep = tta_norm.adapt(tiny_net(), "tbn", method="tent", episodic=True)
    a = ep(X)
    ep(X * 2)
    assert torch.equal(ep(X), a)
    rd = tta_norm.adapt(tiny_net(), "tbn", method="tent", reset_every=2)
    outs = [rd(X) for _ in range(5)]
    assert torch.equal(outs[0], outs[2]) and torch.equal(outs[0], outs[4])
    assert not torch.equal(outs[0], outs[1])
    assert rd.num_resets == 2


def test_tent_under_no_grad_and_inference_mode() -> None:
    ref = tta_norm.adapt(tiny_net(), "tbn", method="tent")
    a1, a2 = ref(X), ref(X)
    for ctx in (torch.no_grad, torch.inference_mode):
        tta = tta_norm.adapt(tiny_net(), "tbn", method="tent")
        with ctx():
            b1, b2 = tta(X), tta(X)
        torch.testing.assert_close(b1, a1)
        torch.testing.assert_close(b2, a2)
