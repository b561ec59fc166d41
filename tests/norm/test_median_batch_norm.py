"""MedBN's layer with its closed-form backward (input gradients of attacks) against autograd through the
textbook formula, and where the adaptive layer uses it."""

from __future__ import annotations

import pytest
import torch

import tta_norm
from tests.attacks.nets import conv_bn_net
from tta_norm.norm import NormSpec
from tta_norm.norm.adaptive import AdaptiveNorm
from tta_norm.norm.functional import median_batch_norm, normalize
from tta_norm.stats.estimators import batch_median_msd, channel_rows, subgradient_positions


def textbook_medbn(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float):
    """MedBN's formula written out (the official MedNorm's arithmetic): over the (C, N*S) rows, the lower
    median m (torch.median) and s2 = sum((row - m)^2) / count; weight * (x - m) / sqrt(s2 + eps) + bias."""
    c = x.shape[1]
    rows = x.transpose(0, 1).contiguous().view(c, -1)
    m = rows.median(dim=1).values
    s2 = ((rows - m[:, None]) ** 2).sum(dim=1) / rows.shape[1]
    out = (rows - m[:, None]) / torch.sqrt(s2[:, None] + eps)
    if weight is not None:
        out = weight[:, None] * out
    if bias is not None:
        out = out + bias[:, None]
    return out.view(c, x.shape[0], *x.shape[2:]).transpose(0, 1)


def _inputs(shape, ties: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    if ties:
        x = x.relu()  # more than half exact zeros per channel: the median is a tie
    weight = torch.rand(shape[1], generator=g, dtype=torch.float64) + 0.5
    bias = torch.randn(shape[1], generator=g, dtype=torch.float64)
    grad_out = torch.randn(*shape, generator=g, dtype=torch.float64)
    return x, weight, bias, grad_out


@pytest.mark.parametrize("shape", [(6, 3, 4, 5), (7, 2), (3, 2, 2, 3, 2)])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("affine", [True, False])
def test_closed_form_backward_equals_autograd_through_the_formula(shape, ties, affine):
    x, weight, bias, grad_out = _inputs(shape, ties)
    if not affine:
        weight = bias = None
    ours = [t.clone().requires_grad_(True) for t in (x, weight, bias) if t is not None]
    ref = [t.clone().requires_grad_(True) for t in (x, weight, bias) if t is not None]
    out = median_batch_norm(*(ours + [None] * (3 - len(ours)))[:3], 1e-5)
    expected = textbook_medbn(*(ref + [None] * (3 - len(ref)))[:3], 1e-5)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    got = torch.autograd.grad(out, ours, grad_out)
    want = torch.autograd.grad(expected, ref, grad_out)
    assert got[0].abs().max() > 0
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_median_gradient_goes_to_the_element_torch_median_picks():
    x, weight, bias, _ = _inputs((6, 3, 4, 5), ties=True)
    a = x.clone().requires_grad_(True)
    # a loss that depends on the location only through sum(out * k) for a constant k per channel isolates the
    # median's term: compare the full gradient with the textbook one, whose tie rule is torch.median's
    k = torch.arange(1.0, 4.0, dtype=torch.float64).view(1, 3, 1, 1)
    (g_ours,) = torch.autograd.grad((median_batch_norm(a, weight, bias, 1e-5) * k).sum(), a)
    b = x.clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad((textbook_medbn(b, weight, bias, 1e-5) * k).sum(), b)
    torch.testing.assert_close(g_ours, g_ref, rtol=0, atol=1e-10)
    rows = channel_rows(x)
    first_zero = (rows == 0).to(torch.uint8).argmax(1)
    chosen = subgradient_positions(rows, rows.median(dim=1).values).squeeze(1)
    assert not torch.equal(chosen, first_zero), "the case must be a real tie with another element chosen"


def test_forward_is_the_statistics_only_arithmetic():
    x, weight, bias, _ = _inputs((8, 4, 3, 3), ties=False)
    x = x.float()
    weight, bias = weight.float(), bias.float()
    with torch.no_grad():
        expected = normalize(x, batch_median_msd(x), weight, bias, 1e-5)
    out = median_batch_norm(x.clone().requires_grad_(True), weight, bias, 1e-5)
    assert torch.equal(out.detach(), expected)


def test_second_derivative_is_refused():
    x, weight, bias, _ = _inputs((4, 2, 3, 3), ties=False)
    a = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(median_batch_norm(a, weight, bias, 1e-5).square().sum(), a, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(g.sum(), a)


def test_subgradient_positions_refuses_a_value_outside_its_row():
    rows = torch.tensor([[1.0, 2.0, 3.0], [4.0, 4.0, 5.0]])
    assert subgradient_positions(rows, torch.tensor([2.0, 4.0]), lower_median=False).flatten().tolist() == [1, 0]
    with pytest.raises(ValueError, match="not an element"):
        subgradient_positions(rows, torch.tensor([2.5, 4.0]))


def _grad_fn_name(layer: AdaptiveNorm, x: torch.Tensor) -> str:
    with torch.enable_grad():
        return type(layer(x).grad_fn).__name__


def test_the_layer_uses_it_for_input_gradients_only():
    layer = AdaptiveNorm(3, NormSpec(estimator="median_msd", mixing="test")).requires_grad_(False)
    x = torch.randn(4, 3, 5, 5)
    assert _grad_fn_name(layer, x.clone().requires_grad_(True)) == "_MedianBatchNormBackward"
    # an adapting affine keeps the reference arithmetic (MedBN + TENT follows the official code)
    assert _grad_fn_name(layer.requires_grad_(True), x) != "_MedianBatchNormBackward"
    average = AdaptiveNorm(3, NormSpec(estimator="median_msd", mixing="test", median="average")).requires_grad_(False)
    assert _grad_fn_name(average, x.clone().requires_grad_(True)) != "_MedianBatchNormBackward"


def _timm(name: str):
    timm = pytest.importorskip("timm")
    return timm.create_model(name, pretrained=False, num_classes=5).eval()


@pytest.mark.parametrize(
    "build,size",
    [(conv_bn_net, 4), (lambda: _timm("mobilenetv3_small_100"), 32), (lambda: _timm("resnet18d"), 32)],
    ids=["conv_bn_net", "mobilenetv3_small_100", "resnet18d"],
)
def test_medbn_model_input_gradient_matches_the_textbook_layers(build, size):
    """A whole medbn network in float64 (the timm ones with BatchNormAct2d layers): the closed-form path against
    the reference arithmetic."""
    torch.manual_seed(0)
    tta = tta_norm.adapt(build().double(), "medbn")
    assert not any(p.requires_grad for p in tta.model.parameters())  # statistics only: the closed-form path
    x = torch.rand(8, 3, size, size, dtype=torch.float64)
    a = x.clone().requires_grad_(True)
    with torch.enable_grad():
        (g_fast,) = torch.autograd.grad(tta.differentiable_forward(a).logsumexp(1).sum(), a)
        tta.model.requires_grad_(True)  # an adapting affine: the reference arithmetic
        b = x.clone().requires_grad_(True)
        (g_ref,) = torch.autograd.grad(tta.differentiable_forward(b).logsumexp(1).sum(), b)
    assert g_fast.abs().max() > 0
    torch.testing.assert_close(g_fast, g_ref, rtol=1e-8, atol=1e-10)
