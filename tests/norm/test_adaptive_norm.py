"""AdaptiveNorm and every preset against hand-written references on small tensors."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tta_norm
from tta_norm.norm import AdaptiveNorm, NormSpec, convert_batchnorms, keep_state, with_domain, without_batch
from tta_norm.presets import get_preset


def make_bn(c: int = 3, seed: int = 0, cls: type = nn.BatchNorm2d) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    bn = cls(c)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
        bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(c, generator=g))
    return bn.eval()


def layer(preset: str | NormSpec, bn: nn.Module | None = None, **overrides) -> AdaptiveNorm:
    spec = preset if isinstance(preset, NormSpec) else get_preset(preset).spec
    if overrides:
        spec = spec.replace(**overrides)
    return AdaptiveNorm.from_batchnorm(bn if bn is not None else make_bn(), spec)


def ref_norm(x, mean, var, bn, eps=1e-5):
    """weight * (x - mean) / sqrt(var + eps) + bias with (C,) or (N, C) statistics."""
    shape = (-1, x.shape[1]) + (1,) * (x.dim() - 2)
    mean, var = mean.reshape(shape), var.reshape(shape)
    w, b = bn.weight.reshape(1, -1, *([1] * (x.dim() - 2))), bn.bias.reshape(1, -1, *([1] * (x.dim() - 2)))
    return w * (x - mean) / torch.sqrt(var + eps) + b


def rows(x):
    return x.transpose(0, 1).reshape(x.shape[1], -1)


X = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(3)) * 2 + 1


def test_source_equals_bn_eval() -> None:
    bn = make_bn()
    torch.testing.assert_close(layer("source", bn)(X), bn(X))


def test_tbn_equals_functional_batch_norm_training() -> None:
    bn = make_bn()
    out = layer("tbn", bn)(X)
    torch.testing.assert_close(out, F.batch_norm(X, None, None, bn.weight, bn.bias, training=True))
    r = rows(X)
    torch.testing.assert_close(out, ref_norm(X, r.mean(1), r.var(1, unbiased=False), bn))


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("shape", [(1, 3, 4, 4), (1, 3, 6), (1, 3, 2, 3, 2), (7, 3, 5, 5)])
def test_tbn_every_fast_path_equals_batch_norm_training(shape: tuple[int, ...], grad: bool) -> None:
    """Batch 1 (group-norm kernel), batches with autograd (fused training kernel) and without (fused moments)."""
    cls = {3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[len(shape)]
    bn = make_bn(cls=cls)
    norm = layer("tbn", bn)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(4)) * 2 + 1
    with torch.set_grad_enabled(grad):
        out = norm(x.requires_grad_(grad))
    ref = F.batch_norm(x.detach(), None, None, bn.weight, bn.bias, training=True)
    torch.testing.assert_close(out.detach(), ref)
    if grad:
        out.square().sum().backward()
        x2 = x.detach().requires_grad_(True)
        F.batch_norm(x2, None, None, bn.weight, bn.bias, training=True).square().sum().backward()
        torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)
        assert norm.weight.grad is not None


def test_alpha_limits_and_value() -> None:
    bn = make_bn()
    torch.testing.assert_close(layer("alpha", bn, alpha=1.0)(X), layer("tbn", bn)(X))
    torch.testing.assert_close(layer("alpha", bn, alpha=0.0)(X), layer("source", bn)(X))
    r = rows(X)
    a = 0.1
    mean = (1 - a) * bn.running_mean + a * r.mean(1)
    var = (1 - a) * bn.running_var + a * r.var(1, unbiased=False)
    torch.testing.assert_close(layer("alpha", bn)(X), ref_norm(X, mean, var, bn))


def test_prior_uses_pseudo_count() -> None:
    bn = make_bn()
    r = rows(X)
    a = 5 / (16 + 5)  # n = 5 samples, N = 16
    mean = (1 - a) * bn.running_mean + a * r.mean(1)
    var = (1 - a) * bn.running_var + a * r.var(1, unbiased=False)
    torch.testing.assert_close(layer("prior", bn)(X), ref_norm(X, mean, var, bn))
    # a prior given as weight on the source
    torch.testing.assert_close(layer("prior", bn, prior=0.7)(X), layer("alpha", bn, alpha=0.3)(X))


class TokenNet(nn.Module):
    """A BatchNorm1d over flattened tokens, as LeViT / EfficientViT-MSRA: the layer sees images x tokens rows."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.bn, self.head = nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)
        self.bn.running_mean.uniform_(-0.5, 0.5)
        self.bn.running_var.uniform_(0.5, 1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, T, 3)
        t = self.embed(x)
        return self.head(self.bn(t.flatten(0, 1)).view_as(t).mean(1))


@pytest.mark.parametrize("grad", [False, True], ids=["statistics", "with-tent"])
def test_prior_counts_images_not_the_rows_of_a_token_layer(grad: bool) -> None:
    x = torch.randn(4, 9, 3, generator=torch.Generator().manual_seed(1))  # 4 images of 9 tokens: 36 rows
    method = "tent" if grad else None
    from tta_norm.attacks.lp import deployed_forward, frozen_snapshot
    from tta_norm.attacks.malicious import unrolled_logits

    kw = {"lr": 1e-3} if grad else {}
    prior = tta_norm.adapt(TokenNet().eval(), "prior", method, **kw)
    alpha = tta_norm.adapt(TokenNet().eval(), "alpha", method, alpha=4 / (16 + 4), **kw)
    # the attackers' forwards (which call the adapted network directly) see the same mixing as the wrapper's
    torch.testing.assert_close(deployed_forward(prior)(x), deployed_forward(alpha)(x))
    torch.testing.assert_close(frozen_snapshot(prior, x)(x), frozen_snapshot(alpha, x)(x))
    torch.testing.assert_close(prior.differentiable_forward(x), alpha.differentiable_forward(x))
    if grad:
        torch.testing.assert_close(unrolled_logits(prior, x), unrolled_logits(alpha, x))
    torch.testing.assert_close(prior(x), alpha(x))


def test_unbiased_variance_by_name() -> None:
    bn = make_bn()
    r = rows(X)
    out = layer(NormSpec(mixing="test", unbiased=True), bn)(X)
    torch.testing.assert_close(out, ref_norm(X, r.mean(1), r.var(1, unbiased=True), bn))


def test_ema_keeps_state_across_batches_and_normalises_with_updated_stats() -> None:
    bn = make_bn()
    lay = layer("ema", bn)
    m, v = bn.running_mean.clone(), bn.running_var.clone()
    for seed in range(3):
        x = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(seed))
        r = rows(x)
        m = 0.95 * m + 0.05 * r.mean(1)
        v = 0.95 * v + 0.05 * r.var(1, unbiased=False)
        torch.testing.assert_close(lay(x), ref_norm(x, m, v, bn))
        torch.testing.assert_close(lay.ema_mean, m)
    lay.reset_state()
    torch.testing.assert_close(lay.ema_mean, bn.running_mean)


def test_medbn_hand_computation() -> None:
    bn = make_bn()
    r = rows(X)
    med = r.sort(dim=1).values[:, (r.shape[1] - 1) // 2]  # lower median of 80 values
    msd = ((r - med[:, None]) ** 2).mean(1)
    torch.testing.assert_close(layer("medbn", bn)(X), ref_norm(X, med, msd, bn))
    avg = r.quantile(0.5, dim=1)
    msd_avg = ((r - avg[:, None]) ** 2).mean(1)
    torch.testing.assert_close(layer("medbn", bn, median="average")(X), ref_norm(X, avg, msd_avg, bn))


def test_medbn_mad_hand_computation() -> None:
    bn = make_bn()
    r = rows(X)
    k = (r.shape[1] - 1) // 2
    med = r.sort(dim=1).values[:, k]
    mad = (r - med[:, None]).abs().sort(dim=1).values[:, k]
    torch.testing.assert_close(layer("medbn-mad", bn)(X), ref_norm(X, med, mad**2, bn))
    out = layer("medbn-mad", bn, estimator="median_mad_normal")(X)
    torch.testing.assert_close(out, ref_norm(X, med, (1.4826 * mad) ** 2, bn))


@pytest.mark.parametrize("eps", [1e-3, 0.05])
@pytest.mark.parametrize("graph", [False, True])
def test_iabn_thresholds_add_the_layers_epsilon(eps, graph) -> None:
    """NOTE's layer adds its own eps to the reference variance in the shrink thresholds; both paths added 1e-5
    whatever the BatchNorm's eps (a difference of 0.55 at eps 1e-3 and running variances of 1e-3)."""
    bn = make_bn()
    bn.eps = eps
    with torch.no_grad():
        bn.running_var.fill_(1e-3)
    x = (torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(1)) * 0.04 + bn.running_mean.view(1, -1, 1, 1))
    k, L = 4.0, 16
    mu_b, var_b = bn.running_mean, bn.running_var
    xi = x.reshape(4, 3, -1)
    mu_i, var_i = xi.mean(2), xi.var(2, unbiased=True)
    s_mu, s_var = torch.sqrt((var_b + eps) / L), (var_b + eps) * math.sqrt(2 / (L - 1))
    mu = mu_b + torch.sign(mu_i - mu_b) * torch.relu((mu_i - mu_b).abs() - k * s_mu)
    var = torch.relu(var_b + torch.sign(var_i - var_b) * torch.relu((var_i - var_b).abs() - k * s_var))
    out = layer("iabn", bn)(x.requires_grad_(graph))  # the compiled kernel without a graph, ATen with one
    torch.testing.assert_close(out.detach(), ref_norm(x.detach(), mu, var, bn, eps=eps), rtol=1e-4, atol=1e-4)


def test_iabn_hand_computation() -> None:
    bn = make_bn()
    k, eps, L = 4.0, 1e-5, 16
    mu_b, var_b = bn.running_mean, bn.running_var
    xi = X.reshape(5, 3, -1)
    mu_i, var_i = xi.mean(2), xi.var(2, unbiased=True)
    s_mu = torch.sqrt((var_b + eps) / L)
    s_var = (var_b + eps) * math.sqrt(2 / (L - 1))
    mu = mu_b + torch.sign(mu_i - mu_b) * torch.relu((mu_i - mu_b).abs() - k * s_mu)
    var = torch.relu(var_b + torch.sign(var_i - var_b) * torch.relu((var_i - var_b).abs() - k * s_var))
    torch.testing.assert_close(layer("iabn", bn)(X), ref_norm(X, mu, var, bn))
    # far-off instances use their own statistics
    shifted = X * 10 + 50
    out = layer("iabn", bn)(shifted)
    assert out.mean().abs() < layer("source", bn)(shifted).mean().abs()


def test_iew_hand_computation() -> None:
    bn = make_bn()
    a = 1 / 128
    xi = X.reshape(5, 3, -1)
    ex_m, ex_sq = xi.mean(2), (xi**2).mean(2)
    mu = a * ex_m + (1 - a) * bn.running_mean
    var = a * ex_sq + (1 - a) * (bn.running_var + bn.running_mean**2) - mu**2  # Summers & Dinneen's form
    torch.testing.assert_close(layer("iew", bn)(X), ref_norm(X, mu, var, bn), rtol=1e-4, atol=1e-4)


def test_ttn_channelwise_mixture() -> None:
    bn = make_bn()
    lay = layer("ttn", bn)
    assert lay.mix_weight.shape == (3,) and not lay.mix_weight.requires_grad
    with torch.no_grad():
        lay.mix_weight.copy_(torch.tensor([0.0, 0.3, 1.5]))  # clamped to [0, 1] in the forward
    a = torch.tensor([0.0, 0.3, 1.0])
    r = rows(X)
    mt, vt = r.mean(1), r.var(1, unbiased=False)
    mean = (1 - a) * bn.running_mean + a * mt
    var = (1 - a) * bn.running_var + a * vt + a * (1 - a) * (mt - bn.running_mean) ** 2
    torch.testing.assert_close(lay(X), ref_norm(X, mean, var, bn))


def test_sabn_heads() -> None:
    bn = make_bn()
    lay = layer("sabn", bn, num_domains=3)
    plain = bn(X)
    torch.testing.assert_close(lay(X), plain)  # no domain: shared affine only
    with torch.no_grad():
        lay.domain_weight.copy_(torch.tensor([[1.0] * 3, [2.0] * 3, [0.5, 1.0, 3.0]]))
        lay.domain_bias.copy_(torch.tensor([[0.0] * 3, [1.0] * 3, [-1.0, 0.0, 2.0]]))
    lay.domain = 2
    g, b = lay.domain_weight[2].view(1, 3, 1, 1), lay.domain_bias[2].view(1, 3, 1, 1)
    torch.testing.assert_close(lay(X), g * plain + b)
    lay.domain = torch.tensor([0, 1, 2, 1, 0])
    out = lay(X)
    for i, d in enumerate([0, 1, 2, 1, 0]):
        expected = lay.domain_weight[d].view(3, 1, 1) * plain[i] + lay.domain_bias[d].view(3, 1, 1)
        torch.testing.assert_close(out[i], expected)
    lay.domain = 5
    with pytest.raises(ValueError, match="out of range"):
        lay(X)
    k1 = layer("sabn", bn, num_domains=1)
    k1.domain = 0
    torch.testing.assert_close(k1(X), plain)


@pytest.mark.parametrize("name", tta_norm.presets())
def test_mode_independence_grad_modes_and_state_dict(name: str) -> None:
    bn = make_bn()
    lay = layer(name, bn)
    ref = lay(X)
    lay.reset_state()
    lay.train()
    torch.testing.assert_close(lay(X), ref)
    lay.reset_state()
    with torch.no_grad():
        torch.testing.assert_close(lay(X), ref)
    lay.reset_state()
    with torch.inference_mode():
        torch.testing.assert_close(lay(X), ref)
    lay.reset_state()
    buf = io.BytesIO()
    torch.save(lay.state_dict(), buf)
    buf.seek(0)
    other = layer(name, make_bn(seed=9))
    other.load_state_dict(torch.load(buf))
    torch.testing.assert_close(other(X), ref)


def test_gradient_flows_through_statistics() -> None:
    for name in ("tbn", "alpha", "ema", "medbn", "iabn", "ttn"):
        x = X.clone().requires_grad_(True)
        layer(name)(x).square().sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()
    # the batch statistics contribute: the gradient differs from the source-stats gradient
    x1, x2 = X.clone().requires_grad_(True), X.clone().requires_grad_(True)
    layer("alpha")(x1)[0].sum().backward()
    layer("source")(x2)[0].sum().backward()
    assert x1.grad[1:].abs().sum() > 0 and x2.grad[1:].abs().sum() == 0


def test_context_managers() -> None:
    model = nn.Sequential(make_bn())
    convert_batchnorms(model, get_preset("ema").spec)
    lay = model[0]
    before = lay.ema_mean.clone()
    with keep_state(model):
        out = model(X)
    assert torch.equal(lay.ema_mean, before)
    model(X)
    torch.testing.assert_close(out, layer("ema", make_bn())(X))
    assert not torch.equal(lay.ema_mean, before)
    state = lay.ema_mean.clone()
    with without_batch(model):
        frozen = model(X * 100)
    assert torch.equal(lay.ema_mean, state)
    torch.testing.assert_close(frozen, ref_norm(X * 100, lay.ema_mean, lay.ema_var, make_bn()))
    model = nn.Sequential(make_bn())
    convert_batchnorms(model, get_preset("sabn").spec)
    with with_domain(model, 1):
        assert model[0].domain == 1
    assert model[0].domain is None


def test_non_finite_batch_stats_never_enter_ema_state() -> None:
    lay = layer("ema")
    x = X.clone()
    x[0, 1, 0, 0] = float("nan")
    lay(x)
    assert torch.isfinite(lay.ema_mean).all() and torch.isfinite(lay.ema_var).all()
    assert lay.ema_mean[1] == make_bn().running_mean[1]  # channel 1 kept its old value


def test_bn1d_and_bn3d_and_syncbn() -> None:
    bn1 = make_bn(cls=nn.BatchNorm1d)
    x2 = torch.randn(6, 3)
    torch.testing.assert_close(layer("tbn", bn1)(x2), F.batch_norm(x2, None, None, bn1.weight, bn1.bias, True))
    x3 = torch.randn(6, 3, 5)
    torch.testing.assert_close(layer("source", bn1)(x3), bn1(x3))
    bn3 = make_bn(cls=nn.BatchNorm3d)
    x5 = torch.randn(2, 3, 2, 3, 3)
    torch.testing.assert_close(layer("tbn", bn3)(x5), F.batch_norm(x5, None, None, bn3.weight, bn3.bias, True))
    sync = nn.SyncBatchNorm(3)
    sync.load_state_dict(make_bn().state_dict())
    model = nn.Sequential(sync)
    assert convert_batchnorms(model, get_preset("source").spec) == ["0"]
    torch.testing.assert_close(model(X), make_bn()(X))
    with pytest.raises(ValueError, match="4-D"):
        layer("tbn")(x2)


def test_layer_errors() -> None:
    lay = layer("tbn")
    with pytest.raises(ValueError, match="expects 3 channels"):
        lay(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match="empty batch"):
        lay(torch.randn(0, 3, 3, 3))
    with pytest.raises(ValueError, match="one value per channel"):
        lay(torch.randn(1, 3, 1, 1))
    layer("alpha")(torch.randn(1, 3, 1, 1))  # a source prior makes batch 1 defined
    with pytest.raises(ValueError, match="no running statistics"):
        AdaptiveNorm.from_batchnorm(nn.BatchNorm2d(3, track_running_stats=False), get_preset("alpha").spec)
    AdaptiveNorm.from_batchnorm(nn.BatchNorm2d(3, track_running_stats=False), get_preset("tbn").spec)
    with pytest.raises(ValueError, match="no BatchNorm"):
        convert_batchnorms(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)), NormSpec())


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="exactly one of"):
        NormSpec(mixing="linear")
    with pytest.raises(ValueError, match="exactly one of"):
        NormSpec(mixing="linear", alpha=0.1, prior=0.9)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        NormSpec(mixing="linear", alpha=1.5)
    with pytest.raises(ValueError, match="only apply"):
        NormSpec(mixing="test", alpha=0.1)
    with pytest.raises(ValueError, match="unknown estimator"):
        NormSpec(estimator="trimmed")
    with pytest.raises(TypeError, match="unknown NormSpec field"):
        NormSpec().replace(alpah=0.1)
    assert get_preset("prior").spec.replace(alpha=0.3).pseudo_count is None


def test_ema_in_place_path_equals_functional_path() -> None:
    """Without autograd the EMA layer updates its buffers in place; with autograd it goes through the
    differentiable functional path. Both give the same outputs and states."""
    a, b = layer("ema"), layer("ema")
    for seed in range(3):
        x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(seed)) * (seed + 1)
        with torch.no_grad():
            out_a = a(x)
        out_b = b(x.clone().requires_grad_(True))
        torch.testing.assert_close(out_a, out_b.detach())
        torch.testing.assert_close(a.ema_mean, b.ema_mean)
        torch.testing.assert_close(a.ema_var, b.ema_var)
    bad = X.clone()
    bad[:, 2] = float("inf")
    before = a.ema_mean.clone(), a.ema_var.clone()
    with torch.no_grad():
        a(bad)
    assert torch.isfinite(a.ema_mean).all() and a.ema_mean[2] == before[0][2] and a.ema_var[2] == before[1][2]


@pytest.mark.parametrize("preset", ["tbn", "medbn", "ema", "alpha", "iabn"])
def test_reduced_precision_activations_use_float_statistics(preset):
    """Under bfloat16 autocast a layer with float32 statistics estimates, mixes and normalises in float32 and
    returns bfloat16, as BatchNorm's mixed-dtype path does (it failed: "mixed dtype", or lerp of two dtypes)."""
    bn = make_bn(4, seed=3)
    x = 3 + 2 * torch.randn(16, 4, 5, 5, generator=torch.Generator().manual_seed(4))
    full, half = layer(preset, bn), layer(preset, bn)
    low = x.bfloat16()
    with torch.no_grad():
        expected = full(low.float())
        got = half(low)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=1e-2, atol=1e-2)  # the output's bfloat16 rounding
    assert half.source_mean.dtype == torch.float32
    for name, buffer in full.named_buffers():
        torch.testing.assert_close(dict(half.named_buffers())[name], buffer, rtol=1e-6, atol=1e-6)  # (EMA state)
    if preset == "tbn":  # the model's own layer in train mode, under autocast
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
            reference = copy.deepcopy(bn).train()(low)
        torch.testing.assert_close(got.float(), reference.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("preset", ["tbn", "ema", "medbn", "source"])
def test_channels_last_inputs_give_the_contiguous_results_in_their_format(preset):
    """A channels_last activation (the compiled kernel takes only contiguous ones) is normalised like its
    contiguous copy and stays channels_last for the next convolution."""
    bn = make_bn(4, seed=5)
    x = 1 + 2 * torch.randn(6, 4, 5, 7, generator=torch.Generator().manual_seed(6))
    last = x.to(memory_format=torch.channels_last)
    a, b = layer(preset, bn), layer(preset, bn)
    with torch.no_grad():
        expected, got = a(x), b(last)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for (name, buffer), other in zip(a.named_buffers(), b.buffers(), strict=True):
        torch.testing.assert_close(other, buffer, rtol=1e-6, atol=1e-6, msg=name)
    if preset == "tbn":
        with torch.no_grad():
            torch.testing.assert_close(got, copy.deepcopy(bn).train()(last), rtol=1e-5, atol=1e-5)


def test_a_zero_eps_is_refused_where_the_batch_enters_the_statistics():
    """torch's BatchNorm refuses eps=0 in training; the tbn layer ran and divided a constant channel by 0."""
    bn = make_bn(3)
    bn.eps = 0.0
    with pytest.raises(ValueError, match="eps must be > 0"):
        layer("tbn", bn)
    ones = torch.ones(4, 3, 2, 2)
    with torch.no_grad():  # the source statistics keep torch's eval semantics, where eps=0 is allowed
        torch.testing.assert_close(layer("source", bn)(ones), bn.eval()(ones))
    assert layer("tbn", bn, eps=1e-5).eps == 1e-5
