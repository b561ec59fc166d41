"""TTN post-training: prior formula vs hand computation, [0, 1] constraint, fit, save/load, tent composition."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tta_norm
from tta_norm.fitting.ttn import (
    TTNConfig,
    fit_ttn,
    gradient_distance,
    load_ttn,
    mix_weight_vector,
    normalize_scores,
    shift_sensitivity_prior,
)

from .nets import tiny_data, tiny_net


def fixed_shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return (0.6 * x + 0.3).clamp(0, 1)


# ------------------------------------------------------------------------------------------- pure functions


def test_gradient_distance_cosine_by_hand():
    clean = torch.tensor([[1.0, 1.0, 0.0, 2.0], [0.0, 2.0, 0.0, 0.0]])
    shifted = torch.tensor([[0.0, 2.0, 0.0, -2.0], [1.0, 4.0, 0.0, 0.0]])
    d = gradient_distance(clean, shifted, "cosine")
    # channel 0: orthogonal -> 1; channel 1: (1,2) vs (2,4) parallel -> 0; channel 2: both zero -> 0;
    # channel 3: opposite -> 2
    torch.testing.assert_close(d, torch.tensor([1.0, 0.0, 0.0, 2.0]))


def test_gradient_distance_l2_by_hand():
    clean = torch.tensor([[3.0, 1.0, 0.0], [4.0, 0.0, 0.0]])
    shifted = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    d = gradient_distance(clean, shifted, "l2")
    # channel 0: |(3,4)| = 5, shifted 0 -> 5 / 5 = 1; channel 1: identical -> 0; channel 2: both zero -> 0
    torch.testing.assert_close(d, torch.tensor([1.0, 0.0, 0.0]))


def test_gradient_distance_one_zero_vector_is_one():
    d = gradient_distance(torch.zeros(3, 1), torch.ones(3, 1), "cosine")
    torch.testing.assert_close(d, torch.tensor([1.0]))


def test_normalize_scores_model_and_layer():
    scores = {"a": torch.tensor([0.5, 1.0]), "b": torch.tensor([1.5, 1.5])}
    m = normalize_scores(scores, "model")
    torch.testing.assert_close(m["a"], torch.tensor([0.0, 0.5]))
    torch.testing.assert_close(m["b"], torch.tensor([1.0, 1.0]))
    lay = normalize_scores(scores, "layer")
    torch.testing.assert_close(lay["a"], torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(lay["b"], torch.tensor([0.5, 0.5]))  # constant layer -> 0.5


def test_config_validation():
    with pytest.raises(ValueError, match="distance"):
        TTNConfig(distance="kl")
    with pytest.raises(ValueError, match="prior_batches"):
        TTNConfig(prior_batches=1)
    with pytest.raises(ValueError, match="shift op"):
        TTNConfig(ops=("jpeg",))


def test_fit_batch_sizes_are_groups_of_a_step():
    with pytest.raises(ValueError, match=r"^fit_batch_sizes has 64 > batch_size 8 "):
        TTNConfig(batch_size=8, fit_batch_sizes=(4, 64))
    with pytest.raises(ValueError, match=r"^batch_size 10 is not a multiple of fit batch size 4 "):
        TTNConfig(batch_size=10, fit_batch_sizes=(1, 4))
    assert TTNConfig().group_sizes == (1, 4, 16, 64) and TTNConfig().batch_size == 64  # the default fits
    assert TTNConfig(batch_size=8).group_sizes == (1, 4)  # the default sizes that divide the batch
    assert TTNConfig(batch_size=8, fit_batch_sizes=[2, 8]).group_sizes == (2, 8)
    net = tiny_net(0)
    x, y = tiny_data(8, seed=1)
    with pytest.raises(ValueError, match="fit_batch_sizes has 64 > batch_size 4"):
        fit_ttn(net, x, y, batch_size=4, fit_batch_sizes=(64,), progress=False)


def test_fit_refuses_data_without_a_step():
    net = tiny_net(0)
    x, y = tiny_data(8, seed=1)
    with pytest.raises(ValueError, match=r"^no source images to fit TTN on \(0 given"):  # was ZeroDivisionError
        fit_ttn(net, x[:0], y[:0], prior_batches=2, prior_batch_size=4, epochs=1, batch_size=4, progress=False)
    with pytest.raises(ValueError, match=r"^3 images make no step: fewer than batch_size 4"):
        fit_ttn(net, x[:3], y[:3], prior_batches=2, epochs=1, batch_size=4, fit_batch_sizes=(4,), progress=False)
    with pytest.raises(ValueError, match="^epochs must be >= 1"):
        TTNConfig(epochs=0)


@pytest.mark.parametrize(
    ("n", "sizes", "groups", "used"),
    [
        (20, (4, 8), {4, 8}, 20),  # the partial last batch of 4 is cut in groups of 4
        (20, (8,), {8}, 16),  # no size divides the partial batch of 4: it is left out
        (22, (2, 8), {2, 8}, 22),  # the partial batch of 6 is cut in groups of 2
    ],
)
def test_the_fit_normalises_groups_of_the_sizes_asked_for_only(n, sizes, groups, used):
    from tta_norm.fitting.ttn import fit_mix_weights, ttn_layers

    x, y = tiny_data(n, seed=1)
    net = tta_norm.adapt(tiny_net(0), "ttn").model
    prior = {name: torch.full_like(layer.mix_weight, 0.5) for name, layer in ttn_layers(net)}
    seen = []
    hook = net.conv1.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].shape[0]))
    cfg = TTNConfig(batch_size=8, fit_batch_sizes=sizes, epochs=3)
    fit_mix_weights(net, x, y, prior, config=cfg, shift=fixed_shift)
    hook.remove()
    assert set(seen) == groups and sum(seen) == 3 * used  # images per epoch


@pytest.mark.parametrize("name", ["lr", "lam", "clean_prob"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_config_refuses_a_non_finite_number(name, value):
    with pytest.raises(ValueError, match=f"^{name} must be a finite number, got"):
        TTNConfig(**{name: value})
    net = tiny_net(0)
    x, y = tiny_data(8, seed=1)
    with pytest.raises(ValueError, match=f"^{name} must be a finite number"):  # before the fit, which saved NaNs
        fit_ttn(net, x, y, prior_batches=2, prior_batch_size=4, epochs=1, batch_size=4, fit_batch_sizes=(4,),
                progress=False, **{name: value})  # fmt: skip


# ------------------------------------------------------------------------------------------------ the prior


def reference_prior(net, x, y, cfg: TTNConfig, mode: str) -> tuple[dict, dict]:
    """The prior computed by hand: autograd through the original BatchNorm model, numpy cosines."""
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed))
    grads = {"clean": [], "shift": []}
    for b in range(cfg.prior_batches):
        idx = perm[b * cfg.prior_batch_size : (b + 1) * cfg.prior_batch_size]
        for kind, xb in (("clean", x[idx]), ("shift", fixed_shift(x[idx], None))):
            ref = copy.deepcopy(net)
            ref.train(mode == "batch")  # train mode: batch statistics; eval mode: running (source) statistics
            loss = F.cross_entropy(ref(xb), y[idx])
            params = [ref.bn1.weight, ref.bn1.bias, ref.bn2.weight, ref.bn2.bias]
            grads[kind].append([g.numpy() for g in torch.autograd.grad(loss, params)])
    scores = {}
    for li, name in enumerate(("bn1", "bn2")):
        ds = []
        for pi in (2 * li, 2 * li + 1):
            gc = np.stack([g[pi] for g in grads["clean"]]).astype(np.float64)
            gs = np.stack([g[pi] for g in grads["shift"]]).astype(np.float64)
            nc, ns = np.linalg.norm(gc, axis=0), np.linalg.norm(gs, axis=0)
            dead = (nc == 0) & (ns == 0)  # a channel that never fires: distance 0 by convention
            cos = (gc * gs).sum(0) / np.where(dead, 1.0, nc * ns)
            ds.append(np.where(dead, 0.0, 1.0 - cos))
        scores[name] = 0.5 * (ds[0] + ds[1])
    allv = np.concatenate(list(scores.values()))
    prior = {k: (v - allv.min()) / (allv.max() - allv.min()) for k, v in scores.items()}
    return scores, prior


@pytest.mark.parametrize("mode", ["source", "batch"])
def test_prior_matches_hand_computation(mode):
    net = tiny_net(1)
    x, y = tiny_data(24, seed=2)
    cfg = TTNConfig(prior_batches=3, prior_batch_size=8, seed=5, prior_stats=mode)
    tta = tta_norm.adapt(net, "ttn")
    before = mix_weight_vector(tta.model).clone()
    prior = shift_sensitivity_prior(tta.model, x, y, config=cfg, shift=fixed_shift)
    ref_scores, ref_prior = reference_prior(net, x, y, cfg, mode)
    for name in ("bn1", "bn2"):
        np.testing.assert_allclose(prior.scores[name].numpy(), ref_scores[name], atol=1e-5)
        np.testing.assert_allclose(prior.prior[name].numpy(), ref_prior[name], atol=1e-5)
    assert torch.equal(mix_weight_vector(tta.model), before)  # restored
    assert all(p.grad is None for p in tta.model.parameters())


def test_prior_accepts_uint8_nhwc():
    net = tiny_net(0)
    x, y = tiny_data(16, seed=0)
    u8 = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    tta = tta_norm.adapt(net, "ttn")
    cfg = TTNConfig(prior_batches=2, prior_batch_size=8)
    p_u8 = shift_sensitivity_prior(tta.model, u8, y.numpy(), config=cfg, shift=fixed_shift)
    p_f = shift_sensitivity_prior(tta.model, torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255, y, config=cfg,
                                  shift=fixed_shift)  # fmt: skip
    for k in p_u8.prior:
        torch.testing.assert_close(p_u8.prior[k], p_f.prior[k])


# -------------------------------------------------------------------------------------------------- the fit


def test_alpha_stays_in_unit_interval():
    net = tiny_net(0)
    x, y = tiny_data(32, seed=1)
    res = fit_ttn(net, x, y, prior_batches=2, prior_batch_size=8, epochs=2, batch_size=8, fit_batch_sizes=(2, 8),
                  lr=5.0, lam=0.0, progress=False)  # fmt: skip
    a = torch.cat([v.flatten() for v in res.alpha.values()])
    assert a.min() >= 0.0 and a.max() <= 1.0
    assert ((a == 0.0) | (a == 1.0)).any(), "a huge step size must hit the bounds (projection, not wrap-around)"
    for name, v in res.alpha.items():
        torch.testing.assert_close(res.state_dict[f"{name}.mix_weight"], v)


def test_a_weight_on_the_boundary_still_gets_the_gradient_that_moves_it():
    """Projected gradient descent needs the gradient of the unclamped weight: at 0 (where the min-max prior
    puts a channel of every layer) ``clamp``'s own gradient is 0, and such a channel would never move."""
    net = tta_norm.adapt(tiny_net(0).double(), "ttn").model
    layer = next(m for m in net.modules() if hasattr(m, "mix_weight"))
    x, y = tiny_data(6, seed=2)
    x = x.double()
    with torch.no_grad():
        layer.mix_weight.copy_(torch.linspace(0.0, 1.0, layer.mix_weight.numel(), dtype=torch.float64))
    layer.mix_weight.requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(net(x), y), layer.mix_weight)
    with torch.no_grad():
        base, eps = layer.mix_weight.detach().clone(), 1e-7
        loss = F.cross_entropy(net(x), y).item()
        for c in range(base.numel()):  # one-sided into [0, 1] on the bounds, central inside
            steps = (eps,) if c == 0 else (-eps,) if c == base.numel() - 1 else (eps, -eps)
            values = []
            for step in steps:
                layer.mix_weight.copy_(base)
                layer.mix_weight[c] += step
                values.append(F.cross_entropy(net(x), y).item())
            slope = (values[0] - loss) / steps[0] if len(steps) == 1 else (values[0] - values[1]) / (2 * eps)
            assert grad[c].item() != 0.0
            # the value is the clamp, the gradient the identity: inside (0, 1) too, not twice the slope
            assert abs(grad[c].item() - slope) < 1e-4 * max(1.0, abs(slope)), (c, grad[c].item(), slope)


def _ce(model, x, y, group: int) -> float:
    with torch.no_grad():
        logits = torch.cat([model(x[i : i + group]) for i in range(0, len(x), group)])
    return float(F.cross_entropy(logits, y))


def trained_tiny_net(x: torch.Tensor, y: torch.Tensor, steps: int = 30) -> torch.nn.Module:
    """A TinyNet trained on (x, y) in train mode, so its running statistics are those of x."""
    net = tiny_net(3)
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    with torch.no_grad():
        for _ in range(20):  # settle the running statistics on the final weights
            net(x)
    return net.eval()


def test_fit_lowers_the_loss_and_freezes_everything_else():
    x, y = tiny_data(48, seed=4)
    net = trained_tiny_net(x, y)
    shifted = fixed_shift(x, None)  # the source statistics do not fit the shifted data
    start = tta_norm.adapt(net, "ttn")
    loss_before = _ce(start.model, shifted, y, 8)
    res = fit_ttn(net, x, y, prior_batches=2, prior_batch_size=8, epochs=4, batch_size=16, fit_batch_sizes=(8,),
                  lr=0.1, lam=0.0, init="preset", shift=fixed_shift, progress=False)  # fmt: skip
    fitted = tta_norm.adapt(net, "ttn", init_state=res.state_dict)
    loss_after = _ce(fitted.model, shifted, y, 8)
    assert loss_after < 0.7 * loss_before, (loss_before, loss_after)
    assert res.history[-1]["ce"] < res.history[0]["ce"]
    ref = start.model.state_dict()
    for k, v in res.state_dict.items():  # nothing but the mixing weights changed
        if not k.endswith("mix_weight"):
            assert torch.equal(v, ref[k]), k
    assert all(not p.requires_grad for p in start.model.parameters())


def test_prior_weight_pulls_alpha_to_the_prior():
    net = tiny_net(0)
    x, y = tiny_data(32, seed=1)
    kw = dict(prior_batches=2, prior_batch_size=8, epochs=2, batch_size=8, lr=0.1, init="preset", progress=False)
    far = fit_ttn(net, x, y, lam=0.0, **kw)
    near = fit_ttn(net, x, y, lam=1000.0, **kw)

    def dist(res):
        return sum(float((res.alpha[k] - res.prior.prior[k]).square().sum()) for k in res.alpha)

    assert dist(near) < dist(far)


# ------------------------------------------------------------------------------------- save / load / tent


def test_save_load_round_trip_and_reset(tmp_path):
    net = tiny_net(0)
    x, y = tiny_data(32, seed=1)
    res = fit_ttn(net, x, y, prior_batches=2, prior_batch_size=8, epochs=1, batch_size=8, lr=0.2, progress=False)
    path = res.save(tmp_path / "ttn.pt")
    payload = load_ttn(path)
    assert set(payload) == {"state_dict", "meta", "ttn"}
    tta = tta_norm.adapt(net, "ttn", init_state=path)
    for name, layer in tta.norm_layers():
        assert torch.equal(layer.mix_weight, res.alpha[name])
        assert torch.equal(payload["ttn"]["prior"][name], res.prior.prior[name])
    out = tta(x[:8])
    tta.reset()
    torch.testing.assert_close(tta(x[:8]), out)
    with pytest.raises(ValueError, match="init_state does not fit"):
        tta_norm.adapt(net, "tbn", init_state=path)


def test_ttn_composes_with_tent(tmp_path):
    net = tiny_net(0)
    x, y = tiny_data(32, seed=1)
    res = fit_ttn(net, x, y, prior_batches=2, prior_batch_size=8, epochs=1, batch_size=8, lr=0.2, progress=False)
    path = res.save(tmp_path / "ttn.pt")
    plain = tta_norm.adapt(net, "ttn", init_state=path)
    tent = tta_norm.adapt(net, "ttn", "tent", init_state=path, lr=0.05)
    first = tent(x[:8])
    torch.testing.assert_close(first, plain(x[:8]))  # TENT returns the logits before its update
    tent(x[8:16])
    plain_layers = dict(plain.norm_layers())
    changed = [n for n, layer in tent.norm_layers() if not torch.equal(layer.weight, plain_layers[n].weight)]
    assert changed, "TENT must update gamma"
    for name, layer in tent.norm_layers():
        assert torch.equal(layer.mix_weight, res.alpha[name]), "TENT must not touch TTN's a"
    assert not torch.allclose(tent(x[:8]), plain(x[:8]))
    tent.reset()
    torch.testing.assert_close(tent(x[:8]), plain(x[:8]))
