"""SaBN: K = 1 equals BN, heads fold into BN, training, the statistics bank, routing (stats, entropy, open set)."""

from __future__ import annotations

import pytest
import torch

import tta_norm
from tta_norm.fitting.augment import ShiftAugment
from tta_norm.fitting.sabn import (
    SaBNRouter,
    StatsBank,
    expand_heads,
    export_head,
    pooled,
    probe_statistics,
    symmetric_kl,
    train_sabn,
)

from .nets import tiny_data, tiny_net


def shifted(x: torch.Tensor) -> torch.Tensor:
    return (0.3 * x + 0.6).clamp(0, 1)


def test_symmetric_kl_by_hand():
    # N(0, 1) vs N(1, 2): (1/2 + 2 - 2 + 1 * (1 + 1/2)) / 2 = 1
    d = symmetric_kl(torch.tensor(0.0), torch.tensor(1.0), torch.tensor(1.0), torch.tensor(2.0), eps=0.0)
    torch.testing.assert_close(d, torch.tensor(1.0))
    assert float(symmetric_kl(torch.tensor(0.3), torch.tensor(2.0), torch.tensor(0.3), torch.tensor(2.0))) == 0.0


def test_sabn_with_one_domain_equals_batchnorm():
    net = tiny_net(0)
    x, _ = tiny_data(8)
    with torch.no_grad():
        ref = net(x)
        out = tta_norm.adapt(net, "sabn", num_domains=1)(x, domain=0)
    torch.testing.assert_close(out, ref)


def test_trained_single_domain_sabn_is_a_batchnorm_with_new_affine():
    net = tiny_net(0)
    x, y = tiny_data(24)
    res = train_sabn(net, x, y, domains=("clean",), epochs=2, batch_size=8, lr=0.05, bank_batches=1, progress=False)
    assert not any("domain_weight" in k for k in res.state_dict)  # K = 1: no heads, only the shared affine
    sabn = tta_norm.adapt(net, "sabn", num_domains=1, init_state=res.state_dict)
    bn = export_head(net, res.state_dict, 0)
    with torch.no_grad():
        torch.testing.assert_close(sabn(x, domain=0), bn(x))
        assert not torch.allclose(bn(x), net(x))  # the affine was trained


@pytest.mark.parametrize("train", ["affine", "all"])
def test_trained_heads_fold_into_batchnorm_and_differ(train, tmp_path):
    net = tiny_net(1)
    x, y = tiny_data(36)
    res = train_sabn(net, x, y, domains=("clean", "color", "noise"), epochs=2, batch_size=6, lr=0.05,
                     bank_batches=2, train=train, progress=False)  # fmt: skip
    if train == "all":  # the whole network was trained: its saved file says so, a bare state dict is refused
        with pytest.raises(ValueError, match="fitted on another model.*conv"):
            tta_norm.adapt(net, "sabn", num_domains=3, init_state=res.state_dict)
    init_state = res.save(tmp_path / "sabn.pt") if train == "all" else res.state_dict
    sabn = tta_norm.adapt(net, "sabn", num_domains=3, init_state=init_state)
    with torch.no_grad():
        outs = [sabn(x, domain=k) for k in range(3)]
        for k in range(3):
            torch.testing.assert_close(outs[k], export_head(net, res.state_dict, k)(x))
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])
    assert res.bank.num_domains == 3 and res.bank.names == ["clean", "color", "noise"]
    assert len(res.history) == 2 and "loss_noise" in res.history[0]


def test_train_only_heads_keeps_shared_affine():
    net = tiny_net(2)
    x, y = tiny_data(16)
    res = train_sabn(net, x, y, domains=("clean", "blur"), train="heads", epochs=1, batch_size=8, lr=0.1,
                     bank_batches=1, progress=False)  # fmt: skip
    assert torch.equal(res.state_dict["bn1.weight"], net.bn1.weight.detach())
    assert not torch.equal(res.state_dict["bn1.domain_weight"], torch.ones(2, 4))


def test_expand_heads_pads_identity():
    state = {"l.domain_weight": torch.full((2, 3), 2.0), "l.domain_bias": torch.full((2, 3), 0.5), "l.x": torch.ones(1)}
    out = expand_heads(state, 4)
    torch.testing.assert_close(out["l.domain_weight"][2:], torch.ones(2, 3))
    torch.testing.assert_close(out["l.domain_bias"][2:], torch.zeros(2, 3))
    assert torch.equal(out["l.domain_weight"][:2], state["l.domain_weight"])
    with pytest.raises(ValueError):
        expand_heads(state, 1)


def test_pooled_statistics_equal_statistics_of_the_pooled_batch():
    net = tiny_net(0)
    x, _ = tiny_data(16)
    model = tta_norm.adapt(net, "sabn", num_domains=2).model
    parts = pooled([probe_statistics(model, x[:8]), probe_statistics(model, x[8:])])
    whole = probe_statistics(model, x)
    for layer in whole:
        torch.testing.assert_close(parts[layer][0], whole[layer][0])
        torch.testing.assert_close(parts[layer][1], whole[layer][1], rtol=1e-4, atol=1e-6)


def two_domain_bank(model, x) -> StatsBank:
    s0 = pooled([probe_statistics(model, x[:8]), probe_statistics(model, x[8:16])])
    s1 = pooled([probe_statistics(model, shifted(x[:8])), probe_statistics(model, shifted(x[8:16]))])
    return StatsBank({k: torch.stack([s0[k][0], s1[k][0]]) for k in s0},
                     {k: torch.stack([s0[k][1], s1[k][1]]) for k in s0}, ["a", "b"])  # fmt: skip


def test_stats_routing_picks_the_right_head_on_a_two_domain_stream():
    net = tiny_net(0)
    x, _ = tiny_data(64, seed=3)
    tta = tta_norm.adapt(net, "sabn", num_domains=2)
    router = SaBNRouter(tta, two_domain_bank(tta.model, x[:16]), "stats")
    truth = [0, 0, 1, 1, 0, 1, 1, 0, 0, 1, 0, 1]  # held-out images, blocks and switches
    held = x[16:]
    for step, d in enumerate(truth):
        xb = held[(step * 4) % 48 : (step * 4) % 48 + 4]
        out = router(shifted(xb) if d else xb)
        assert out.shape == (4, 3)
        with torch.no_grad():
            torch.testing.assert_close(out, tta(shifted(xb) if d else xb, domain=d))
    assert router.routes == truth


def test_entropy_routing_picks_the_most_confident_head():
    net = tiny_net(0)
    x, _ = tiny_data(8)
    tta = tta_norm.adapt(net, "sabn", num_domains=3)
    with torch.no_grad():  # head 2 scales the last layer's features up: sharper, lower-entropy predictions
        tta.model.bn2.domain_weight[2].fill_(25.0)
    router = SaBNRouter(tta, None, "entropy")
    router(x)
    assert router.routes == [2]
    assert router.last_distances.shape == (3,)


def test_oracle_routing_needs_the_domain():
    net = tiny_net(0)
    x, _ = tiny_data(4)
    tta = tta_norm.adapt(net, "sabn", num_domains=2)
    router = SaBNRouter(tta, None, "oracle")
    with pytest.raises(ValueError, match="oracle"):
        router(x)
    torch.testing.assert_close(router(x, domain=1), tta(x, domain=1))
    for bad in (5, -1, 1.5, True):  # refused before anything is recorded
        with pytest.raises(ValueError, match=r"integer head index in 0\.\.1"):
            router(x, domain=bad)
    assert router.routes == [1]
    with pytest.raises(ValueError, match="needs a statistics bank"):
        SaBNRouter(tta, None, "stats")


def test_open_set_spawns_one_head_per_new_domain_and_adapts_it(tmp_path):
    net = tiny_net(0)
    x, y = tiny_data(64, seed=5)
    res = train_sabn(net, x, y, domains=("clean",), epochs=0, bank_batches=2, batch_size=8, progress=False)
    path = res.save(tmp_path / "sabn.pt")
    router = SaBNRouter.from_file(net, path, "open_set", max_new_domains=2, threshold=0.5, head_lr=0.5)
    assert router.capacity == 3 and router.num_known == 1
    ref = router.tta.model.bn1.domain_weight.detach().clone()
    stream = [0, 0, 1, 1, 1, 0, 1]
    for step, d in enumerate(stream):
        xb = x[step * 8 : step * 8 + 8]
        router(shifted(xb) if d else xb)
    assert router.routes == [0, 0, 1, 1, 1, 0, 1]
    assert router.active == 2 and router.bank.num_domains == 2
    w = router.tta.model.bn1.domain_weight.detach()
    assert not torch.equal(w[1], ref[1])  # the spawned head adapted online
    assert torch.equal(w[0], ref[0]) and torch.equal(w[2], ref[2])  # the others did not move
    router.reset()
    assert router.active == 1 and router.bank.num_domains == 1 and router.routes == []
    assert torch.equal(router.tta.model.bn1.domain_weight, ref)


def test_open_set_default_threshold_and_capacity_errors():
    net = tiny_net(0)
    x, _ = tiny_data(16)
    tta = tta_norm.adapt(net, "sabn", num_domains=3)
    bank = two_domain_bank(tta.model, x)
    router = SaBNRouter(tta, bank, "open_set", num_known=2)
    assert router.threshold == pytest.approx(0.5 * float(bank.pairwise()[0, 1]))
    with pytest.raises(ValueError, match="reserved heads"):
        SaBNRouter(tta_norm.adapt(net, "sabn", num_domains=2), bank, "open_set")


def test_shift_augment_domains_are_deterministic():
    x, _ = tiny_data(4)
    aug = ShiftAugment()
    for op in ("color", "blur", "noise"):
        a = aug.apply(x, op, torch.Generator().manual_seed(1))
        b = aug.apply(x, op, torch.Generator().manual_seed(1))
        assert torch.equal(a, b) and a.shape == x.shape and not torch.equal(a, x)
        assert a.min() >= 0 and a.max() <= 1


def test_calibrated_threshold_is_a_quantile_of_own_domain_distances():
    from tta_norm.fitting.sabn import calibrate_threshold, collect_bank

    net = tiny_net(0)
    x, _ = tiny_data(64, seed=7)
    model = tta_norm.adapt(net, "sabn", num_domains=2).model
    bank = collect_bank(model, x, ["clean", "noise"], batches=2, batch_size=16)
    t_hi = calibrate_threshold(model, bank, x, batch_size=8, batches=4, quantile=1.0)
    t_lo = calibrate_threshold(model, bank, x, batch_size=8, batches=4, quantile=0.0)
    assert 0.0 <= t_lo <= t_hi
    # well above the calibrated maximum, batches of a known domain do not spawn; far below, the first one does
    tta = tta_norm.adapt(net, "sabn", num_domains=3)
    router = SaBNRouter(tta, bank, "open_set", num_known=2, threshold=2 * t_hi)
    for i in range(4):
        router(x[i * 8 : i * 8 + 8])
    assert router.active == 2
    eager = SaBNRouter(tta, bank, "open_set", num_known=2, threshold=0.0)
    eager(x[:8])
    assert eager.active == 3 and eager.routes == [2]


@pytest.mark.parametrize("bad", [{"head_lr": float("nan")}, {"head_lr": -0.1}, {"bank_momentum": 1.5},
                                 {"bank_momentum": float("inf")}, {"threshold": float("nan")}, {"threshold": -1.0}])
def test_router_settings_are_checked_when_made(bad):
    """A NaN head learning rate or bank momentum was accepted and turned the heads or the bank to NaN later."""
    tta = tta_norm.adapt(tiny_net(0), "sabn", num_domains=2)
    with pytest.raises(ValueError, match="must be a finite number"):
        SaBNRouter(tta, None, "entropy", **bad)
