"""The norm converter registry: built-in converters keep each layer's function, unknown BN subclasses are refused."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

import tta_norm
from tests.norm.invariants import assert_invariants, randomize_batchnorms
from tta_norm.layers import convert_to_ghost_bn
from tta_norm.norm import AdaptiveNorm, AdaptiveNormAct, convert_batchnorms, find_norm_converter, registry
from tta_norm.presets import get_preset


@pytest.fixture(autouse=True)
def private_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registrations made by a test stay in that test."""
    monkeypatch.setattr(registry, "_CONVERTERS", dict(registry._CONVERTERS))
    monkeypatch.setattr(registry, "_lazy_done", set(registry._lazy_done))


class BatchNormAct(nn.BatchNorm2d):
    """A BatchNorm2d subclass whose forward adds dropout and an activation (the shape of timm's layer)."""

    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.drop = nn.Dropout(0.5)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


class QuietBatchNorm(nn.BatchNorm2d):
    """A subclass that keeps BatchNorm2d's forward (only adds an attribute)."""

    note = "quiet"


def conv_net(norm: type[nn.Module], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 6, 3), norm(6), nn.Conv2d(6, 4, 3), norm(4), nn.Flatten(), nn.Linear(64, 5))
    return randomize_batchnorms(net, seed)


def x_image(seed: int = 1, n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def shared_bn_net(seed: int = 0) -> nn.Module:
    """One BatchNorm2d applied after two convolutions, registered under two names (indices 1 and 3)."""
    torch.manual_seed(seed)
    bn = nn.BatchNorm2d(4)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), bn, nn.Conv2d(4, 4, 3), bn, nn.Flatten(), nn.Linear(64, 5))
    return randomize_batchnorms(net, seed)


CASES = {
    "BatchNorm1d-2D": (
        lambda: randomize_batchnorms(nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)), 0),
        lambda: torch.randn(8, 5, generator=torch.Generator().manual_seed(1)),
    ),
    "BatchNorm1d-3D": (
        lambda: randomize_batchnorms(nn.Sequential(nn.Conv1d(2, 6, 3), nn.BatchNorm1d(6), nn.Tanh(), nn.Flatten()), 0),
        lambda: torch.randn(4, 2, 9, generator=torch.Generator().manual_seed(1)),
    ),
    "BatchNorm2d": (lambda: conv_net(nn.BatchNorm2d), x_image),
    "BatchNorm3d": (
        lambda: randomize_batchnorms(nn.Sequential(nn.Conv3d(2, 4, 2), nn.BatchNorm3d(4), nn.Tanh(), nn.Flatten()), 0),
        lambda: torch.randn(3, 2, 4, 4, 4, generator=torch.Generator().manual_seed(1)),
    ),
    "SyncBatchNorm": (lambda: conv_net(nn.SyncBatchNorm), x_image),
    "one BatchNorm2d under two names": (shared_bn_net, x_image),
    "BatchNorm2d subclass keeping forward": (lambda: conv_net(QuietBatchNorm), x_image),
    # the test batch (4) fits in one ghost batch: train mode normalises with the whole batch's statistics
    "GhostBatchNorm2d": (lambda: convert_to_ghost_bn(conv_net(nn.BatchNorm2d), 8), x_image),
}


@pytest.mark.parametrize("case", list(CASES))
def test_builtin_converters_keep_source_and_train_outputs(case: str) -> None:
    build, data = CASES[case]
    assert_invariants(build(), data())


@pytest.mark.parametrize("sync", [False, True], ids=["BatchNormAct2d", "SyncBatchNormAct"])
def test_timm_norm_act_layers_keep_source_and_train_outputs(sync: bool) -> None:
    layers = pytest.importorskip("timm.layers")

    def norm(c: int) -> nn.Module:
        return layers.BatchNormAct2d(c, act_layer=nn.SiLU, drop_layer=nn.Dropout)

    net = conv_net(norm)
    if sync:
        net = layers.convert_sync_batchnorm(net)
        assert type(net[1]).__name__ == "SyncBatchNormAct"
    assert find_norm_converter(type(net[1])) is registry.adaptive_norm_act_from
    assert_invariants(net, x_image())
    layer = tta_norm.adapt(net, "source").model[1]
    assert type(layer) is AdaptiveNormAct and isinstance(layer.drop, nn.Dropout) and isinstance(layer.act, nn.SiLU)


def test_a_shared_layer_stays_one_adaptive_layer() -> None:
    tta = tta_norm.adapt(shared_bn_net(), "tbn", "tent")
    assert isinstance(tta.model[1], AdaptiveNorm) and tta.model[1] is tta.model[3]
    assert len(tta.method.params) == 2  # one weight and one bias, trained through both uses


def test_lookup_is_exact_type_then_mro() -> None:
    assert find_norm_converter(nn.BatchNorm2d) is registry.adaptive_norm_from
    assert find_norm_converter(QuietBatchNorm) is registry.adaptive_norm_from  # inherited: same forward
    custom = lambda bn, spec, name: AdaptiveNormAct.from_batchnorm(bn, spec, name=name)  # noqa: E731
    tta_norm.register_norm_converter(BatchNormAct, custom)
    assert find_norm_converter(BatchNormAct) is custom

    class Child(BatchNormAct):
        pass

    assert find_norm_converter(Child) is custom


def test_subclass_with_own_forward_is_refused_and_model_untouched() -> None:
    net = conv_net(BatchNormAct)
    before = copy.deepcopy(net.state_dict())
    kinds = [type(m) for m in net]
    with pytest.raises(TypeError, match=r"BatchNormAct.*overrides forward.*register_norm_converter"):
        tta_norm.adapt(net, "tbn", inplace=True)
    assert [type(m) for m in net] == kinds
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())


def test_registered_norm_act_converter_keeps_drop_and_activation() -> None:
    tta_norm.register_norm_converter(BatchNormAct, registry.adaptive_norm_act_from)
    net = conv_net(BatchNormAct)
    assert_invariants(net, x_image())  # dropout is off in both: adapt() puts the model in eval mode
    tta = tta_norm.adapt(net, "tbn")
    layer = tta.model[1]
    assert type(layer) is AdaptiveNormAct and isinstance(layer.drop, nn.Dropout) and isinstance(layer.act, nn.SiLU)
    assert [name for name, _ in tta.norm_layers()] == ["1", "3"]


def test_user_converter_for_a_class_that_is_not_a_batchnorm() -> None:
    class FrozenNorm(nn.Module):  # like torchvision's FrozenBatchNorm2d: buffers only, always eval statistics
        def __init__(self, c: int) -> None:
            super().__init__()
            g = torch.Generator().manual_seed(c)
            self.register_buffer("mean", torch.randn(c, generator=g))
            self.register_buffer("var", torch.rand(c, generator=g) + 0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            shape = (1, -1, 1, 1)
            return (x - self.mean.view(shape)) / torch.sqrt(self.var.view(shape) + 1e-5)

    def convert(layer: FrozenNorm, spec, name: str) -> AdaptiveNorm:
        return AdaptiveNorm(layer.mean.numel(), spec, affine=False, source_mean=layer.mean, source_var=layer.var,
                            name=name)  # fmt: skip

    tta_norm.register_norm_converter(FrozenNorm, convert)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), FrozenNorm(4), nn.Flatten())
    x = x_image()
    with torch.no_grad():
        torch.testing.assert_close(tta_norm.adapt(net, "source")(x), net(x))
        ref = nn.functional.batch_norm(net[0](x), None, None, training=True).flatten(1)
        torch.testing.assert_close(tta_norm.adapt(net, "tbn")(x), ref)


def test_converter_must_return_an_adaptive_layer() -> None:
    tta_norm.register_norm_converter(nn.BatchNorm2d, lambda bn, spec, name: nn.Identity())
    net = conv_net(nn.BatchNorm2d)
    with pytest.raises(TypeError, match=r"BatchNorm2d.*returned Identity.*AdaptiveNorm"):
        convert_batchnorms(net, get_preset("tbn").spec)
    assert isinstance(net[1], nn.BatchNorm2d) and isinstance(net[3], nn.BatchNorm2d)


def test_register_norm_converter_rejects_bad_arguments() -> None:
    with pytest.raises(TypeError, match="nn.Module subclass"):
        tta_norm.register_norm_converter("BatchNorm2d", registry.adaptive_norm_from)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="callable"):
        tta_norm.register_norm_converter(nn.BatchNorm2d, None)  # type: ignore[arg-type]
    assert find_norm_converter(nn.BatchNorm2d) is registry.adaptive_norm_from


def test_model_that_is_a_norm_layer_is_refused() -> None:
    with pytest.raises(ValueError, match=r"itself is a norm layer.*nn.Sequential"):
        convert_batchnorms(nn.BatchNorm2d(3), get_preset("tbn").spec)


def test_import_does_not_import_timm() -> None:
    code = "import sys, tta_norm, tta_norm.norm.registry; assert 'timm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    "other",
    [
        lambda: nn.InstanceNorm2d(4, affine=True, track_running_stats=True),
        lambda: __import__("tta_norm.layers", fromlist=["BatchGroupNorm"]).BatchGroupNorm(4, 2),
    ],
)
def test_norm_layers_with_running_statistics_left_unadapted_are_named_in_a_warning(other) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3), other(), nn.Flatten()).eval()
    with pytest.warns(tta_norm.UnadaptedNormWarning, match=r"1 norm layer\(s\) .*\(3\).*register_norm_converter"):
        tta_norm.adapt(model, "tbn")
    with pytest.warns(tta_norm.UnadaptedNormWarning):  # a gradient method on a model without BatchNorm, too
        tta_norm.adapt(nn.Sequential(nn.Conv2d(3, 4, 3), other(), nn.GroupNorm(2, 4)).eval(), "source", "tent")


def test_models_whose_norm_layers_are_all_adapted_or_stateless_give_no_warning() -> None:
    import warnings

    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.InstanceNorm2d(4), nn.GroupNorm(2, 4),
                          nn.Flatten(), nn.LayerNorm(144), nn.Linear(144, 3), nn.BatchNorm1d(3)).eval()  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error", tta_norm.UnadaptedNormWarning)
        for preset in ("source", "tbn", "medbn"):
            tta_norm.adapt(plain, preset)


def test_the_replacement_runs_the_replaced_layers_hooks() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2)).eval()
    randomize_batchnorms(model, seed=0)
    calls: list[str] = []
    pre = model[1].register_forward_pre_hook(lambda m, a: calls.append("pre"))
    model[1].register_forward_hook(lambda m, a, o: o.clamp(max=0.1))  # changes the output
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
        tta = tta_norm.adapt(model, "source")
        assert torch.equal(tta(x), ref) and calls == ["pre", "pre"]
        inplace = tta_norm.adapt(model, "source", inplace=True)
        pre.remove()  # the user's handle still removes the hook from the replacement
        inplace(x)
    assert calls == ["pre", "pre"]


def test_a_pruned_batchnorm_converts_with_its_pruned_weights() -> None:
    from torch.nn.utils import prune

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2)).eval()
    randomize_batchnorms(model, seed=0)
    prune.l1_unstructured(model[1], "weight", amount=0.5)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
        tta = tta_norm.adapt(model, "source", inplace=True)  # the pruning hook stays with the replaced layer
        torch.testing.assert_close(tta(x), ref, rtol=0, atol=0)
