"""SAR as the official code runs it: recovery keeps the base optimiser, exact un-perturbation, base step always
taken, the official parameter selection."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import tta_norm
from tests.nets import tiny_net
from tta_norm.methods import SAR
from tta_norm.methods.sar import is_sar_top_layer

X = torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(0))
X2 = torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(1))


def params_of(tta):
    return [p.detach().clone() for p in tta.method.params]


def test_recovery_keeps_the_base_optimiser_state() -> None:
    recovered = tta_norm.adapt(tiny_net(), "tbn", "sar", e_margin=10.0, lr=0.01, reset_constant=100.0)
    manual = tta_norm.adapt(tiny_net(), "tbn", "sar", e_margin=10.0, lr=0.01, reset_constant=-1.0)
    initial = copy.deepcopy(manual.model.state_dict())
    recovered(X)
    manual(X)
    assert recovered.num_resets == 1 and recovered.num_adapted == 0  # a recovery restarts the reset_every count
    manual.model.load_state_dict(initial)  # a recovery of the model only, as the official SAM.load_state_dict
    recovered.method.reset_constant = -1.0
    recovered(X2)
    manual(X2)
    for a, b in zip(params_of(recovered), params_of(manual), strict=True):
        assert torch.equal(a, b)
    state = recovered.method.optimizer.state[recovered.method.params[0]]
    assert int(state["step"]) == 2  # Adam's step count went on through the recovery
    recovered.reset()  # an explicit reset forgets everything
    assert not recovered.method.optimizer.state


def test_unperturbing_copies_the_saved_parameters_back() -> None:
    tta = tta_norm.adapt(tiny_net(), "tbn", "sar", e_margin=10.0, optim={"lr": 0.0}, rho=0.37)
    before = params_of(tta)
    tta(X)
    for a, b in zip(params_of(tta), before, strict=True):
        assert torch.equal(a, b)  # lr 0: bit-identical, no theta + e - e rounding


def test_base_step_is_taken_when_no_sample_survives() -> None:
    tta = tta_norm.adapt(tiny_net(), "tbn", "sar", e_margin=10.0, optimizer="sgd", optim={"lr": 0.1, "momentum": 0.9})
    tta(X)
    bufs = [tta.method.optimizer.state[p]["momentum_buffer"].clone() for p in tta.method.params]
    before = params_of(tta)
    tta.method.e_margin = 0.0  # no sample is reliable: zero gradient, the momentum still moves the weights
    tta(X2)
    for p, old, buf in zip(params_of(tta), before, bufs, strict=True):
        torch.testing.assert_close(p, old - 0.1 * 0.9 * buf)
    assert any(not torch.equal(p, old) for p, old in zip(params_of(tta), before, strict=True))


def test_base_step_is_taken_when_no_sample_survives_the_second_filter() -> None:
    from tta_norm.methods.base import softmax_entropy
    from tta_norm.norm import keep_state

    opts = {"optimizer": "sgd", "optim": {"lr": 0.1, "momentum": 0.9}}
    tta = tta_norm.adapt(tiny_net(), "tbn", "sar", e_margin=10.0, rho=5.0, **opts)
    tta(X)
    probe = copy.deepcopy(tta)
    with torch.no_grad(), keep_state(probe.model):
        ent = softmax_entropy(probe.model(X2)).sort().values
    tta.method.e_margin = float(ent[0] + ent[1]) / 2  # one sample passes the first filter ...
    ema = tta.method.loss_ema
    bufs = [tta.method.optimizer.state[p]["momentum_buffer"].clone() for p in tta.method.params]
    before = params_of(tta)
    tta(X2)
    assert tta.method.loss_ema == ema  # ... none the second (rho 5 raises its entropy): NaN loss, EMA kept
    for p, old, buf in zip(params_of(tta), before, bufs, strict=True):
        torch.testing.assert_close(p, old - 0.1 * 0.9 * buf)


class LNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.LayerNorm(4) for _ in range(12))
        self.layer4 = nn.GroupNorm(2, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(self.layer4(x)))


def test_default_selection_is_the_official_one() -> None:
    names = {n.rpartition(".")[0] for n, _ in SAR(LNNet()).named_params}
    assert names == {f"blocks.{i}" for i in range(9)}
    every = {n.rpartition(".")[0] for n, _ in SAR(LNNet(), freeze_top=False).named_params}
    assert every == {f"blocks.{i}" for i in range(12)} | {"layer4", "norm"}
    assert not is_sar_top_layer("layer3.2.bn1") and is_sar_top_layer("layer4.0.bn1")
    assert len(tta_norm.adapt(tiny_net(), "tbn", "sar").method.params) == 4  # no top layer in a small net
    # the rule reads the bare network's names through the package's wrappers (load_model's input normalisation,
    # ImageNet-R/A's logit subset), where the final norm is ``model.model.norm``
    from tta_norm.models import LogitSubset, NormalizedModel

    wrapped = NormalizedModel(LogitSubset(LNNet(), range(2)))
    inner = {n.rpartition(".")[0] for n, _ in SAR(wrapped).named_params}
    assert inner == {f"model.model.blocks.{i}" for i in range(9)}


def test_a_rejected_batch_after_a_recovery_leaves_the_kept_optimiser_state_intact() -> None:
    def stream(reject: bool) -> list[torch.Tensor]:
        tta = tta_norm.adapt(tiny_net(), "ema", "sar", e_margin=10.0, lr=0.01, reset_constant=100.0)
        out = [tta(X)]  # a recovery: the base optimiser's state is kept for the next batch
        tta.method.reset_constant = -1.0  # no further recovery: the kept moments shape every later step
        if reject:  # takes the kept state, fails after its step (in-place moment updates), is rolled back

            def fail(*_: object) -> None:
                raise RuntimeError("failed after the step")

            handle = tta.method.optimizer.register_step_post_hook(fail)
            with pytest.raises(RuntimeError, match="after the step"):
                tta(X2)
            handle.remove()
        out += [tta(X2), tta(X), tta(X2)]
        return out

    for a, b in zip(stream(False), stream(True), strict=True):
        assert torch.equal(a, b)


class DeepLNNet(nn.Module):
    """ViT-Large's layout: 24 blocks and a final norm."""

    def __init__(self, depth: int = 24, nested: bool = False) -> None:
        super().__init__()
        blocks = nn.ModuleList(nn.LayerNorm(4) for _ in range(depth))
        self.stages = nn.ModuleList([nn.Module()]) if nested else None
        if nested:
            self.stages[0].blocks = blocks
        else:
            self.blocks = blocks
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        for b in self.stages[0].blocks if self.stages is not None else self.blocks:
            x = b(x)
        return self.head(self.norm(x))


def test_the_top_layer_rule_warns_where_it_does_not_fit_and_takes_a_callable() -> None:
    """The official rule names ViT-Base's blocks 9-11: on 24 blocks (ViT-L) or a ConvNeXt-like stage it leaves
    out middle blocks; that is said, and a caller's rule replaces it."""
    import warnings

    from tta_norm.methods.sar import SARTopLayerWarning, sar_top_layer_misfit

    assert sar_top_layer_misfit([f"blocks.{i}.norm1" for i in range(12)]) is None  # ViT-B/S/Ti: 12 blocks
    assert sar_top_layer_misfit(["layer1.0.bn1", "layer4.2.bn3"]) is None  # ResNets: no numbered blocks
    assert sar_top_layer_misfit([f"blocks.{i}" for i in range(24)]) == "blocks.0-23"
    assert sar_top_layer_misfit(["stages.2.blocks.26.norm", "stages.3.blocks.2"]) == (
        "stages.2.blocks.0-26, stages.3.blocks.0-2")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SAR(LNNet())  # the rule's own layout: silent
        tta_norm.adapt(tiny_net(), "tbn", "sar")
    for model in (DeepLNNet(), DeepLNNet(nested=True)):
        with pytest.warns(SARTopLayerWarning, match="blocks.9'?,? .*freeze_top"):
            names = {n.rpartition(".")[0] for n, _ in SAR(model).named_params}
        assert len(names) == 21  # the literal rule: blocks 9-11 and the final norm left out
    top = lambda name: name == "norm" or any(name == f"blocks.{i}" for i in (21, 22, 23))  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        chosen = tta_norm.adapt(DeepLNNet(), method="sar", freeze_top=top).method
    names = {n.rpartition(".")[0] for n, _ in chosen.named_params}
    assert names == {f"blocks.{i}" for i in range(21)}
