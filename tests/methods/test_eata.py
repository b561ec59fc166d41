"""EATA as its authors run it: class-count defaults, official arithmetic, Fisher computed once and reused."""

from __future__ import annotations

import math

import pytest
import torch

import tta_norm
from tests.nets import tiny_net
from tta_norm.methods import eata_defaults
from tta_norm.methods import fisher as fisher_mod

X = torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    ("classes", "d_margin", "alpha"),
    [(2, 0.4, 1.0), (10, 0.4, 1.0), (11, 0.1, 1.0), (100, 0.1, 1.0), (1000, 0.05, 2000.0)],
)
def test_defaults_follow_the_class_count(classes: int, d_margin: float, alpha: float) -> None:
    assert eata_defaults(classes) == {"d_margin": d_margin, "fisher_alpha": alpha}


def test_cifar10_stream_batches_after_the_first_update(resnet20, cifar_stream) -> None:
    x, _, _ = cifar_stream
    tta = tta_norm.adapt(resnet20, "tbn", "eata")
    explicit = tta_norm.adapt(resnet20, "tbn", "eata", d_margin=0.05)
    counts, counts_explicit = [], []
    for xb in x.split(100):
        tta(xb)
        explicit(xb)
        counts.append(tta.method.last_num_selected)
        counts_explicit.append(explicit.method.last_num_selected)
    assert all(c > 0 for c in counts[1:]), counts  # d_margin 0.4 for 10 classes
    assert explicit.method.d_margin == 0.05 and sum(counts_explicit[1:]) < sum(counts[1:])


def test_weights_and_regulariser_use_the_official_arithmetic() -> None:
    model = tiny_net()
    x = 3 * torch.randn(64, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    fishers = {"bn.weight": (torch.rand(4), torch.zeros(4)), "bn.bias": (torch.rand(4), torch.ones(4))}
    tta = tta_norm.adapt(model, "tbn", "eata", e_margin=1.5, d_margin=1.0, fishers=fishers, fisher_alpha=3.0, lr=0.0)
    logits = tta.model(x)
    ent = -(logits.softmax(1) * logits.log_softmax(1)).sum(1)
    sel = ent[torch.where(ent < 1.5)]
    weights = 1 / torch.exp(sel.detach() - 1.5)
    assert len(sel) > 10 and not torch.equal(weights, torch.exp(1.5 - sel.detach()))  # the inputs tell them apart
    expected = sel.mul(weights).mean(0)
    ewc = 0
    for name, p in tta.method.named_params:
        if name in fishers:
            ewc += 3.0 * (fishers[name][0] * (p - fishers[name][1]) ** 2).sum()
    expected = expected + ewc
    grads = torch.autograd.grad(expected, tta.method.params)
    tta.method.optimizer.zero_grad(set_to_none=True)
    captured = {}
    step = tta.method.optimizer.step

    def spy(*a, **k):
        captured["grads"] = [p.grad.clone() for p in tta.method.params]
        return step(*a, **k)

    tta.method.optimizer.step = spy
    tta(x)
    for g, ref in zip(captured["grads"], grads, strict=True):
        assert torch.equal(g, ref)
    assert tta.method.uses_fisher


def test_fisher_is_computed_once_per_model_and_reused(resnet20, cifar_stream) -> None:
    _, _, clean = cifar_stream
    images = clean[:96]
    fisher_mod.clear_fisher_cache()
    calls = []
    real = fisher_mod.compute_fishers

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    fisher_mod.compute_fishers = counting
    try:
        first = tta_norm.adapt(resnet20, "tbn", "eata", fisher_images=images)
        second = tta_norm.adapt(resnet20, "tbn", "eata", fisher_images=images)
        other = tta_norm.adapt(resnet20, "medbn", "eata", fisher_images=images)  # other statistics: other Fisher
    finally:
        fisher_mod.compute_fishers = real
    assert len(calls) == 2 and fisher_mod.cache_stats == {"hits": 1, "misses": 2}
    for name, (f, anchor) in first.method.fishers.items():
        assert torch.equal(f, second.method.fishers[name][0]) and torch.equal(anchor, second.method.fishers[name][1])
        assert f.data_ptr() != second.method.fishers[name][0].data_ptr()  # copies: one cell cannot alter another
    assert not all(torch.equal(f, other.method.fishers[n][0]) for n, (f, _) in first.method.fishers.items())
    # batches of 64 as the official code: 96 images = one batch of 64 and one of 32
    direct = real(first.model, [images[:64], images[64:]], first.method.named_params)
    for name, (f, _) in direct.items():
        torch.testing.assert_close(first.method.fishers[name][0], f)
    fisher_mod.clear_fisher_cache()


def test_one_fisher_source_only() -> None:
    with pytest.raises(ValueError, match="one source of Fisher weights"):
        tta_norm.adapt(tiny_net(), "tbn", "eata", fisher_images=X, fisher_data=[X])
    assert math.isclose(eata_defaults(10)["d_margin"], 0.4)


def test_bad_fisher_sources_are_refused_before_adapting() -> None:
    images = torch.rand(6, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    with_nan = images.clone()
    with_nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        tta_norm.adapt(tiny_net(), "tbn", "eata", fisher_images=with_nan)
    with pytest.raises(ValueError, match="floating-point"):
        tta_norm.adapt(tiny_net(), "tbn", "eata", fisher_images=(images * 255).to(torch.uint8))
    good = tta_norm.adapt(tiny_net(), "tbn", "eata", fisher_images=images).method.fishers
    name, (fisher, anchor) = next(iter(good.items()))
    cases = [
        ({**good, name: (fisher[:1], anchor)}, "shape"),
        ({**good, "nope.weight": (fisher, anchor)}, "not an adapted parameter"),
        ({**good, name: (fisher + float("inf"), anchor)}, "NaN or Inf"),
    ]
    for bad, match in cases:
        with pytest.raises(ValueError, match=match):
            tta_norm.adapt(tiny_net(), "tbn", "eata", fishers=bad)
    nan_logits = [images * float("nan")]  # fisher_data is checked through the weights it gives
    with pytest.raises(ValueError, match="NaN or Inf"):
        tta_norm.adapt(tiny_net(), "tbn", "eata", fisher_data=nan_logits)


def test_fisher_images_are_fed_like_a_test_batch() -> None:
    """float64 images on a float32 model are cast as test batches are; a bfloat16 network whose norm layers
    stay float32 takes bfloat16 images (their cache key reads any dtype)."""
    images = torch.rand(6, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    fisher_mod.clear_fisher_cache()
    as_float = tta_norm.adapt(tiny_net(), "tbn", "eata", fisher_images=images).method.fishers
    as_double = tta_norm.adapt(tiny_net(), "tbn", "eata", fisher_images=images.double()).method.fishers
    for name, (f, anchor) in as_float.items():
        assert torch.equal(as_double[name][0], f) and torch.equal(as_double[name][1], anchor)
    net = tiny_net().to(torch.bfloat16)
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.float()
    mixed = tta_norm.adapt(net, "tbn", "eata", fisher_images=images.to(torch.bfloat16)).method.fishers
    assert all(f.dtype == torch.float32 and bool(torch.isfinite(f).all()) for f, _ in mixed.values())
