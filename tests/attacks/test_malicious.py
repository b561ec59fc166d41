"""The DIA-style malicious-sample attack: objectives by hand, budget, state after the attack, medbn gradients."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import tta_norm
from tta_norm.attacks import (
    MaliciousAttack,
    attack_batch,
    attack_loss,
    craft_malicious,
    init_malicious,
    project_linf,
    unrolled_logits,
)
from tta_norm.norm import keep_state

from .nets import batch, conv_bn_net, pool_bn_net

FAST = {"steps": 40, "step_size": 0.05}


def _state(tta):
    out = {k: v.detach().clone() for k, v in tta.model.state_dict().items()}
    if tta.method is not None:
        for i, st in tta.method.optimizer.state_dict()["state"].items():
            for k, v in st.items():
                out[f"opt.{i}.{k}"] = torch.as_tensor(v).clone()
    return out


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _own_labels(preset, x, seed=0, net=pool_bn_net):
    """Labels = the no-attack predictions of the adapted model: the target is never already at (y+1) mod C."""
    with torch.no_grad():
        return tta_norm.adapt(net(seed), preset)(x).argmax(1)


# ---------------------------------------------------------------------------------------------------- settings
def test_count_and_validation():
    assert MaliciousAttack(fraction=0.1).count(200) == 20
    assert MaliciousAttack(fraction=0.05).count(200) == 10
    assert MaliciousAttack(num_malicious=3).count(8) == 3
    assert MaliciousAttack(fraction=0.0).count(8) == 0
    with pytest.raises(ValueError, match="exactly one"):
        MaliciousAttack()
    with pytest.raises(ValueError, match="exactly one"):
        MaliciousAttack(num_malicious=2, fraction=0.1)
    with pytest.raises(ValueError, match="benign"):
        MaliciousAttack(num_malicious=8).count(8)
    with pytest.raises(ValueError, match="target_index"):
        MaliciousAttack(num_malicious=6, target_index=3).count(8)
    with pytest.raises(ValueError, match="objective"):
        MaliciousAttack(num_malicious=1, objective="nope")
    with pytest.raises(ValueError, match="eps"):
        MaliciousAttack(num_malicious=1, eps=2.0)


def test_bad_input_errors():
    tta = tta_norm.adapt(pool_bn_net(), "tbn")
    x, y = batch(8)
    attack = MaliciousAttack(num_malicious=2, steps=1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        attack_batch(tta, x * 255, y, attack)
    with pytest.raises(ValueError, match="labels"):
        attack_batch(tta, x, y[:3], attack)
    with pytest.raises(TypeError, match="TTAModel"):
        attack_batch(pool_bn_net(), x, y, attack)
    with pytest.raises(ValueError, match="mode"):
        attack_batch(tta, x, y, attack, mode="sometimes")


@pytest.mark.parametrize(
    "fields",
    [{"step_size": float("nan")}, {"clamp_ce": float("inf")}, {"stealth_weight": float("nan")}, {"steps": 2.5},
     {"num_malicious": 2.5}, {"target_index": 1.0}, {"step_size": "0.1"}],
)  # fmt: skip
def test_attack_settings_are_checked_when_made(fields):
    """NaN step sizes, fractional step and sample counts were accepted, and failed (or ran) later."""
    with pytest.raises(ValueError, match="must be"):
        MaliciousAttack(**{"num_malicious": 2, **fields})


def test_fractions_round_half_up_as_written():
    """0.29 of 50 is 14.5, which rounds to 15; the float product 14.4999... gave 14 (23 such cells up to 400)."""
    from tta_norm.attacks.malicious import malicious_count

    assert malicious_count(0.29, 50) == 15 and malicious_count(0.35, 90) == 32 and malicious_count(0.125, 4) == 1
    for batch_size in range(2, 401):
        for percent in range(1, 100):
            exact = percent * batch_size  # the count times 100
            assert malicious_count(percent / 100, batch_size) == (exact + 50) // 100


@pytest.mark.parametrize("method", [None, "tent"])
def test_a_refused_batch_leaves_the_deployed_model_as_it_was(method):
    """Labels outside the classes, NaN pixels and an update the unrolled attacker cannot write out failed after
    the deployed model had adapted on the clean batch (a targeted attack even wrapped a bad label into a target)."""
    tta = tta_norm.adapt(pool_bn_net(), "tbn", method)
    x, y = batch(8)
    before = _state(tta)
    classes = tta(x).shape[1]
    tta = tta_norm.adapt(pool_bn_net(), "tbn", method)
    for objective in ("targeted", "indiscriminate"):
        attack = MaliciousAttack(num_malicious=2, steps=1, objective=objective)
        for labels, match in ((y.clone().fill_(classes), "not a class"), (y - 1 - y.max(), ">= 0")):
            with pytest.raises(ValueError, match=match):
                attack_batch(tta, x, labels, attack)
            _assert_same_state(_state(tta), before)
            assert tta.num_batches == tta.num_adapted == 0
        with pytest.raises(ValueError, match="NaN"):
            attack_batch(tta, x.clone().index_fill_(0, torch.tensor([0]), float("nan")), y, attack)
    if method is not None:
        tta.method.steps = 2
        with pytest.raises(ValueError, match="unrolled.*2 steps"):
            attack_batch(tta, x, y, MaliciousAttack(num_malicious=2, steps=1, attacker="unrolled"))
        _assert_same_state(_state(tta), before)


@pytest.mark.parametrize(
    ("optimizer", "optim", "steps", "problem"),
    [("adam", {"amsgrad": True}, 1, "amsgrad"), ("sgd", {}, 3, "3 steps")],
)  # fmt: skip
def test_the_unrolled_attacker_refuses_updates_it_does_not_write_out(optimizer, optim, steps, problem):
    """AMSGrad and several TENT steps were unrolled as one plain step: the attacked logits were off by 0.1-0.2."""
    tta = tta_norm.adapt(conv_bn_net(), "tbn", "tent", optimizer=optimizer, lr=0.05, optim=optim, steps=steps)
    with pytest.raises(ValueError, match=f"unrolled.*{problem}.*surrogate"):
        unrolled_logits(tta, batch(10, seed=2)[0])


# ---------------------------------------------------------------------------------------------- objectives
def test_objectives_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 9.0, 0.0], [1.0, 1.0, 1.0], [5.0, 0.0, 0.0]])
    y = torch.tensor([0, 0, 2, 1])  # the last sample is malicious (num_benign = 3)
    ce = [-F.log_softmax(logits[i], 0)[y[i]] for i in range(3)]
    ind = attack_loss(logits, y, 3, MaliciousAttack(num_malicious=1, objective="indiscriminate"))
    expect = -(ce[0] + min(float(ce[1]), 5.0) + ce[2])  # CE of sample 1 is ~9, clamped to 5
    assert float(ce[1]) > 5
    assert ind.item() == pytest.approx(float(expect), rel=1e-6)
    tgt = attack_loss(logits, y, 3, MaliciousAttack(num_malicious=1))
    assert tgt.item() == pytest.approx(float(-F.log_softmax(logits[0], 0)[1]), rel=1e-6)  # label (0 + 1) mod 3
    keep = torch.tensor([0, 1, 2])
    st = attack_loss(logits, y, 3, MaliciousAttack(num_malicious=1, objective="stealthy", stealth_weight=0.5), keep)
    others = (-F.log_softmax(logits[1], 0)[1] - F.log_softmax(logits[2], 0)[2]) / 2
    assert st.item() == pytest.approx(float(tgt + 0.5 * others), rel=1e-6)


# -------------------------------------------------------------------------------------------------- budget
def test_projection_by_hand():
    ref = torch.tensor([0.0, 0.5, 0.98, 0.3])
    adv = torch.tensor([-0.2, 0.9, 1.5, 0.31])
    assert torch.equal(project_linf(adv, ref, 0.1), torch.tensor([0.0, 0.6, 1.0, 0.31]))
    assert torch.equal(project_linf(adv, ref, 1.0), torch.tensor([0.0, 0.9, 1.0, 0.31]))


@pytest.mark.parametrize("init", ["grey", "random", "clean"])
def test_pgd_respects_budget_and_range(init):
    x, y = batch(10, seed=3)
    eps = 8 / 255
    attack = MaliciousAttack(num_malicious=3, eps=eps, steps=8, step_size=2 / 255, init=init)
    g = torch.Generator().manual_seed(0)
    start = init_malicious(x[7:], attack, g)
    assert (start - x[7:]).abs().max() <= eps + 1e-6
    if init == "grey":  # grey 127.5/255 projected into the ball around the attacker's images
        assert torch.allclose(start, project_linf(torch.full_like(start, 127.5 / 255), x[7:], eps))
    out = attack_batch(tta_norm.adapt(conv_bn_net(), "tbn"), x, y, attack, generator=torch.Generator().manual_seed(0))
    assert (out.x_malicious - x[7:]).abs().max() <= eps + 1e-6
    assert out.x_malicious.min() >= 0 and out.x_malicious.max() <= 1
    assert out.linf <= eps + 1e-6


def test_unbounded_grey_start_and_random_init_seeded():
    x, _ = batch(6)
    a = MaliciousAttack(num_malicious=2, init="grey")
    assert torch.all(init_malicious(x[4:], a) == 127.5 / 255)
    r = MaliciousAttack(num_malicious=2, init="random", eps=0.1)
    s1 = init_malicious(x[4:], r, torch.Generator().manual_seed(5))
    s2 = init_malicious(x[4:], r, torch.Generator().manual_seed(5))
    assert torch.equal(s1, s2) and not torch.equal(s1, x[4:])


# ----------------------------------------------------------------------------------- success: tbn vs source
def _success_count(preset: str, method: str | None = None, batches: int = 8) -> tuple[int, float, float]:
    hits, err_clean, err_att = 0, 0.0, 0.0
    for s in range(batches):
        x, _ = batch(12, seed=s)
        y = _own_labels("tbn", x)
        tta = tta_norm.adapt(pool_bn_net(), preset, method)
        out = attack_batch(tta, x, y, MaliciousAttack(num_malicious=3, **FAST))
        assert out.target_clean_hit is False or preset == "source"
        hits += int(out.target_success)
        ind = attack_batch(
            tta_norm.adapt(pool_bn_net(), preset, method), x, y,
            MaliciousAttack(num_malicious=3, objective="indiscriminate", **FAST),
        )  # fmt: skip
        err_clean += ind.benign_error_clean
        err_att += ind.benign_error_attacked
    return hits, err_clean, err_att


def test_malicious_samples_move_tbn_predictions():
    hits, err_clean, err_att = _success_count("tbn")
    assert hits > 0
    assert err_clean == 0.0  # labels are the no-attack predictions
    assert err_att > 0.0


def test_malicious_samples_cannot_move_source_predictions():
    hits = 0
    for s in range(4):
        x, _ = batch(12, seed=s)
        y = _own_labels("source", x)
        attack = MaliciousAttack(num_malicious=3, steps=20, step_size=0.05)
        out = attack_batch(tta_norm.adapt(pool_bn_net(), "source"), x, y, attack)
        assert out.target_success is False and out.changed == 0.0
        assert torch.equal(out.clean_logits[:9], out.attacked_logits[:9])  # the statistics never see them
        hits += int(out.target_success)
    assert hits == 0


def test_tent_victim_is_attacked_too():
    hits, _, err_att = _success_count("tbn", "tent", batches=3)
    assert hits > 0 and err_att > 0


# ------------------------------------------------------------------------------- state after the attack
@pytest.mark.parametrize("attacker", ["surrogate", "unrolled"])
@pytest.mark.parametrize("preset,method", [("tbn", None), ("ema", None), ("tbn", "tent"), ("medbn", "tent")])
def test_craft_leaves_state_untouched(preset, method, attacker):
    tta = tta_norm.adapt(conv_bn_net(), preset, method)
    x, y = batch(10)
    tta(batch(10, seed=9)[0])  # some history (EMA, Adam moments)
    before = _state(tta)
    counters = (tta.num_batches, tta.num_adapted)
    flags = [p.requires_grad for p in tta.model.parameters()]
    craft_malicious(tta, x, y, MaliciousAttack(num_malicious=3, steps=3, step_size=0.05, attacker=attacker))
    _assert_same_state(before, _state(tta))
    assert [p.requires_grad for p in tta.model.parameters()] == flags  # the surrogate's constants are a copy
    assert (tta.num_batches, tta.num_adapted) == counters
    assert all(p.grad is None for p in tta.model.parameters())


@pytest.mark.parametrize("preset,method", [("tbn", "tent"), ("ema", None), ("medbn", "tent")])
def test_instant_mode_state_is_the_clean_adaptation(preset, method):
    x0, _ = batch(10, seed=7)
    x, y = batch(10, seed=1)
    tta = tta_norm.adapt(conv_bn_net(), preset, method)
    tta(x0)
    reference = copy.deepcopy(tta)
    with torch.enable_grad():
        expected = reference(x).detach()  # the deployed model adapts on the clean batch only
    out = attack_batch(tta, x, y, MaliciousAttack(num_malicious=3, steps=5, step_size=0.05, victim="adapting"))
    _assert_same_state(_state(reference), _state(tta))
    assert tta.num_batches == reference.num_batches
    assert torch.equal(out.clean_logits, expected)


@pytest.mark.parametrize("preset,method", [("tbn", "tent"), ("ema", None), ("medbn", "eata")])
def test_cumulative_mode_carries_the_poisoned_state(preset, method):
    x0, _ = batch(10, seed=7)
    x, y = batch(10, seed=1)
    kwargs = {"e_margin": 10.0, "d_margin": 1.0} if method == "eata" else {}  # EATA updates on every sample
    tta = tta_norm.adapt(conv_bn_net(), preset, method, **kwargs)
    tta(x0)
    pre = copy.deepcopy(tta)
    out = attack_batch(tta, x, y, MaliciousAttack(num_malicious=3, steps=5, step_size=0.05), mode="cumulative")
    poisoned = torch.cat([x[:7], out.x_malicious])
    with torch.enable_grad():
        pre(poisoned)  # the victim's step, replayed from the pre-batch state
    _assert_same_state(_state(pre), _state(tta))
    assert tta.num_batches == pre.num_batches and tta.num_adapted == pre.num_adapted
    if method == "eata":
        assert (tta.method.current_probs is None) == (pre.method.current_probs is None)
    # and the clean-adapted state would have been different
    ref = tta_norm.adapt(conv_bn_net(), preset, method, **kwargs)
    ref(x0)
    with torch.enable_grad():
        ref(x)
    assert any(not torch.equal(a, b) for a, b in zip(_state(ref).values(), _state(pre).values(), strict=True))


def test_episodic_victim_is_attacked_from_the_reset_state():
    x0, _ = batch(10, seed=7)
    x, _ = batch(10, seed=1)
    y = _own_labels("tbn", x, net=conv_bn_net)
    tta = tta_norm.adapt(conv_bn_net(), "tbn", "tent", episodic=True)
    tta(x0)
    out = attack_batch(tta, x, y, MaliciousAttack(num_malicious=3, steps=5, step_size=0.05, victim="adapting"))
    fresh = tta_norm.adapt(conv_bn_net(), "tbn", "tent")
    with torch.enable_grad():
        expect = fresh(torch.cat([x[:7], out.x_malicious]))
    assert torch.allclose(out.attacked_logits, expect, atol=1e-6)


# ------------------------------------------------------------------------------------------ medbn gradients
def test_gradients_flow_through_the_median_without_nan():
    tta = tta_norm.adapt(conv_bn_net(), "medbn")
    x, y = batch(9)
    x_mal = torch.full((3, 3, 4, 4), 127.5 / 255, requires_grad=True)
    with keep_state(tta.model), torch.enable_grad():
        logits = tta.model(torch.cat([x[:6], x_mal]))
        loss = attack_loss(logits, y, 6, MaliciousAttack(num_malicious=3, objective="indiscriminate"))
        (g,) = torch.autograd.grad(loss, [x_mal])
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    out = attack_batch(tta, x, y, MaliciousAttack(num_malicious=3, objective="indiscriminate", **FAST))
    assert torch.isfinite(out.x_malicious).all()
    assert not torch.all(out.x_malicious == 127.5 / 255)  # the PGD moved them


def test_median_subgradient_selects_one_element_by_hand():
    """A single MedBN layer: the median's gradient goes to the selected (lower-median) element only."""
    from tta_norm.norm import NormSpec, layer_statistics
    from tta_norm.stats.estimators import Stats

    v = torch.tensor([[0.3], [0.9], [0.1], [0.5]], requires_grad=True)  # (N=4, C=1): lower median 0.3
    spec = NormSpec(estimator="median_msd")
    stats, _ = layer_statistics(v, spec, Stats(torch.zeros(1), torch.ones(1)))
    (g,) = torch.autograd.grad(stats.mean.sum(), [v])
    assert torch.equal(g.flatten(), torch.tensor([1.0, 0.0, 0.0, 0.0]))
    assert stats.mean.item() == pytest.approx(0.3)


# --------------------------------------------------------------------------------- through the update step
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_unrolled_step_matches_the_real_update(optimizer):
    x, _ = batch(10, seed=2)
    optim = {"momentum": 0.9} if optimizer == "sgd" else {"betas": (0.9, 0.999)}
    tta = tta_norm.adapt(conv_bn_net(), "tbn", "tent", optimizer=optimizer, lr=0.05, optim=optim)
    with torch.enable_grad():
        tta(batch(10, seed=4)[0])  # non-empty optimiser state (momentum buffer / Adam moments)
    with keep_state(tta.model), torch.enable_grad():
        predicted = unrolled_logits(tta, x).detach()
    with torch.enable_grad():
        tta(x)
    with torch.no_grad():
        actual = tta.model(x)
    assert torch.allclose(predicted, actual, atol=1e-5)


@pytest.mark.parametrize("preset", ["ema", "tbn", "medbn"])
def test_unrolled_logits_leave_the_victims_state_alone(preset):
    tta = tta_norm.adapt(conv_bn_net(), preset, "tent", lr=0.05)
    with torch.enable_grad():
        tta(batch(10, seed=4)[0])
    before = copy.deepcopy(tta.model.state_dict())
    with torch.enable_grad():
        unrolled_logits(tta, batch(10, seed=2)[0])
    after = tta.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_unrolled_sgd_gradient_reaches_the_input():
    x, y = batch(10, seed=2)
    tta = tta_norm.adapt(conv_bn_net(), "tbn", "tent", optimizer="sgd", lr=0.5)
    xi = x.clone().requires_grad_(True)
    with keep_state(tta.model), torch.enable_grad():
        pre = torch.autograd.grad(tta.model(xi)[0, 1], [xi])[0]
        post = torch.autograd.grad(unrolled_logits(tta, xi)[0, 1], [xi])[0]
    assert torch.isfinite(post).all() and not torch.allclose(pre, post)


def test_updated_prediction_attack_runs_and_reports():
    x, _ = batch(12, seed=1)
    y = _own_labels("tbn", x)
    tta = tta_norm.adapt(pool_bn_net(), "tbn", "tent", optimizer="sgd", lr=0.1)
    attack = MaliciousAttack.from_protocol("unrolled", num_malicious=3, steps=8, step_size=0.05)
    start = MaliciousAttack.from_protocol("unrolled", num_malicious=3, steps=0)
    loss0 = craft_malicious(tta, x, y, start).loss
    loss = craft_malicious(tta, x, y, attack).loss
    assert loss < loss0  # PGD through the unrolled step lowers the post-update target loss
    out = attack_batch(tta, x, y, attack)
    victim = tta_norm.adapt(pool_bn_net(), "tbn", "tent", optimizer="sgd", lr=0.1)
    with torch.enable_grad():
        victim(torch.cat([x[:9], out.x_malicious]))
    with torch.no_grad():
        assert torch.allclose(out.attacked_logits, victim.model(torch.cat([x[:9], out.x_malicious])), atol=1e-6)


def test_zero_malicious_is_no_attack():
    x, y = batch(8)
    out = attack_batch(tta_norm.adapt(conv_bn_net(), "tbn"), x, y, MaliciousAttack(fraction=0.0))
    assert out.num_malicious == 0 and out.benign_error_clean == out.benign_error_attacked
    assert torch.equal(out.clean_logits, out.attacked_logits)


# ------------------------------------------------------------------------------------------ protocols
VICTIM_ATTACKER = [(v, a) for v in ("updated", "adapting") for a in ("surrogate", "unrolled")]


@pytest.mark.parametrize("victim,attacker", VICTIM_ATTACKER)
@pytest.mark.parametrize("mode", ["instant", "cumulative"])
@pytest.mark.parametrize("preset,method", [("tbn", None), ("ema", None), ("tbn", "tent"), ("medbn", "tent")])
def test_zero_malicious_changes_nothing_in_every_mode(victim, attacker, mode, preset, method):
    x, y = batch(10, seed=4)
    tta = tta_norm.adapt(conv_bn_net(), preset, method, optimizer="sgd", lr=0.5) if method else tta_norm.adapt(
        conv_bn_net(), preset
    )
    tta(batch(10, seed=9)[0])  # some history
    attack = MaliciousAttack(fraction=0.0, victim=victim, attacker=attacker, steps=3)
    out = attack_batch(tta, x, y, attack, mode=mode)
    assert out.changed == 0.0 and out.benign_error_attacked == out.benign_error_clean
    assert torch.equal(out.clean_logits, out.attacked_logits)


def test_updated_victim_predicts_again_after_its_step():
    x, y = batch(10, seed=1)
    tta = tta_norm.adapt(conv_bn_net(), "tbn", "tent", optimizer="sgd", lr=0.5)
    reference = copy.deepcopy(tta)
    out = attack_batch(tta, x, y, MaliciousAttack.from_protocol("dia", num_malicious=3, steps=4, step_size=0.05))
    with torch.enable_grad():
        adapting = reference(torch.cat([x[:7], out.x_malicious]))
    with torch.no_grad():
        updated = reference.model(torch.cat([x[:7], out.x_malicious]))
    assert torch.allclose(out.attacked_logits, updated, atol=1e-6)
    assert not torch.allclose(out.attacked_logits, adapting, atol=1e-4)  # the step changed the prediction


def test_protocol_fixes_its_fields():
    dia = MaliciousAttack.from_protocol("dia", num_malicious=2)
    assert (dia.victim, dia.attacker, dia.keep_best) == ("updated", "surrogate", False)
    assert MaliciousAttack(num_malicious=2) == dia  # the published protocol is the default
    with pytest.raises(ValueError, match="fixes"):
        MaliciousAttack.from_protocol("dia", num_malicious=2, attacker="unrolled")
    with pytest.raises(ValueError, match="unknown attack protocol"):
        MaliciousAttack.from_protocol("dai", num_malicious=2)
    with pytest.raises(ValueError, match="victim"):
        MaliciousAttack(num_malicious=2, victim="later")


@pytest.mark.parametrize("method", [None, "tent"])
def test_targeted_attack_stops_at_the_first_success(method):
    stopped = []
    for s in range(6):
        x, _ = batch(12, seed=s)
        y = _own_labels("tbn", x)
        kwargs = {"optimizer": "sgd", "lr": 0.5} if method else {}
        early = attack_batch(tta_norm.adapt(pool_bn_net(), "tbn", method, **kwargs), x, y,
                             MaliciousAttack(num_malicious=3, **FAST))
        budget = attack_batch(tta_norm.adapt(pool_bn_net(), "tbn", method, **kwargs), x, y,
                              MaliciousAttack(num_malicious=3, stop_on_success=False, **FAST))
        assert budget.steps == FAST["steps"]
        if early.target_success:
            stopped.append(early.steps)
        else:  # never stopped: the same PGD path as the full budget, to the same last iterate
            assert early.steps == FAST["steps"] and not budget.target_success
            assert torch.equal(early.x_malicious, budget.x_malicious)
    assert stopped and max(stopped) < FAST["steps"]  # some attacks succeeded, each before the budget ran out
