"""The public wrapper: adapt(), presets(), reset(), bad input, batch size 1, determinism, real architectures."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torchvision
from torch import nn

import tta_norm
from tests.nets import randomize_bn, resnet20, tiny_net
from tta_norm.methods.base import softmax_entropy
from tta_norm.norm import AdaptiveNorm
from tta_norm.presets import UnfittedTTNWarning

X = torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(0))


def test_presets_lists_the_documented_names() -> None:
    assert set(tta_norm.presets()) >= {
        "source", "tbn", "alpha", "prior", "ema", "medbn", "medbn-mad", "iabn", "iew", "ttn", "sabn"
    }
    for name in tta_norm.presets():
        p = tta_norm.get_preset(name)
        assert p.summary and p.citation and p.batch_size_one


def test_adapt_copies_unless_inplace() -> None:
    model = tiny_net()
    state = copy.deepcopy(model.state_dict())
    tta = tta_norm.adapt(model, "ema", method="tent")
    tta(X)
    assert all(isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d) for m in (model.bn, model.bn1d))
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
    tta_in = tta_norm.adapt(model, "tbn", inplace=True)
    assert tta_in.model is model and isinstance(model.bn, AdaptiveNorm)


@pytest.mark.parametrize(
    "bad",
    [{"reset_every": 0}, {"window": 0}, {"on_bad_batch": "ignore"}, {"method": "tent", "lrr": 1e-3},
     {"method": "tent", "lr": -1.0}, {"method": "tent", "steps": 0}, {"init_state": {"bn.x": torch.zeros(1)}}],
)  # fmt: skip
def test_a_refused_inplace_adapt_leaves_the_model_as_it_was(bad: dict) -> None:
    model = tiny_net().train()
    kinds = [type(m) for m in model.modules()]
    state = copy.deepcopy(model.state_dict())
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises((ValueError, TypeError)) as err:
        tta_norm.adapt(model, "ema", inplace=True, **bad)
    assert "\n" not in str(err.value)  # one line
    assert [type(m) for m in model.modules()] == kinds and model.training
    assert [p.requires_grad for p in model.parameters()] == flags
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_a_refused_inplace_adapt_undoes_a_loaded_init_state(tmp_path) -> None:
    donor = tta_norm.adapt(tiny_net(), "ema")  # a valid adapted state: other affine and EMA values
    donor(X)
    for _, layer in donor.norm_layers():
        layer.weight.data.add_(1.0)
    model = tiny_net().train()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="window"):
        tta_norm.adapt(model, "ema", inplace=True, init_state=donor.model.state_dict(), window=0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    torch.save({"state_dict": 5}, tmp_path / "bad.pt")
    for bad in (torch.zeros(3), [1, 2], tmp_path / "bad.pt", {"state_dict": 5}):
        with pytest.raises(ValueError, match="init_state must be a state dict"):
            tta_norm.adapt(model, "ema", init_state=bad)


def test_source_preset_equals_eval_model_and_spec_overrides() -> None:
    model = tiny_net()
    torch.testing.assert_close(tta_norm.adapt(model, "source")(X), model(X))
    a1 = tta_norm.adapt(model, "alpha", alpha=1.0)(X)
    torch.testing.assert_close(a1, tta_norm.adapt(model, "tbn")(X))
    spec = tta_norm.NormSpec(mixing="linear", alpha=0.0)
    torch.testing.assert_close(tta_norm.adapt(model, spec)(X), model(X))


def test_unknown_names_and_kwargs() -> None:
    model = tiny_net()
    with pytest.raises(KeyError, match="unknown preset 'nope'.*tbn"):
        tta_norm.adapt(model, "nope")
    with pytest.raises(KeyError, match="unknown method"):
        tta_norm.adapt(model, "tbn", method="cotta-typo")
    with pytest.raises(TypeError, match="no method was given"):
        tta_norm.adapt(model, "tbn", lr=1e-3)
    with pytest.raises(TypeError, match="method 'tent'"):
        tta_norm.adapt(model, "tbn", method="tent", lrr=1e-3)
    with pytest.raises(TypeError, match="nn.Module"):
        tta_norm.adapt("resnet", "tbn")


def test_bad_input_errors() -> None:
    tta = tta_norm.adapt(tiny_net(), "tbn")
    with pytest.raises(TypeError, match="x.float\\(\\) / 255"):
        tta((X * 255).to(torch.uint8))
    with pytest.raises(ValueError, match="empty batch"):
        tta(X[:0])
    with pytest.raises(ValueError, match="channel"):
        tta(torch.randn(8, 4, 6, 6))
    with pytest.raises(ValueError, match="no BatchNorm layer.*LayerNorm"):
        tta_norm.adapt(nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3)), "tbn")


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("lazy", [nn.LazyBatchNorm2d, nn.LazyConv2d])
def test_lazy_modules_are_refused_until_initialised(lazy, inplace) -> None:
    """Uninitialised lazy modules made adapt() fail inside torch with an UninitializedParameter traceback."""
    middle = lazy() if lazy is nn.LazyBatchNorm2d else lazy(4, 1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), middle, nn.Flatten(), nn.Linear(64, 10)).eval()
    with pytest.raises(ValueError, match="uninitialised lazy modules.*run one forward"):
        tta_norm.adapt(model, "tbn", inplace=inplace)
    assert isinstance(model[2], lazy) and isinstance(model[1], nn.BatchNorm2d)  # the model is as it was
    model(torch.randn(2, 3, 6, 6))
    tta_norm.adapt(model, "tbn", method="tent")(torch.randn(4, 3, 6, 6))


@pytest.mark.parametrize("method", [None, "tent"])
def test_nan_batch_raises_or_skips_without_touching_state(method: str | None) -> None:
    bad = X.clone()
    bad[2, 0, 1, 1] = float("nan")
    tta = tta_norm.adapt(tiny_net(), "ema", method=method)
    tta(X)
    state = copy.deepcopy(tta.model.state_dict())
    opt = copy.deepcopy(tta.method.optimizer.state_dict()) if method else None
    with pytest.raises(ValueError, match="NaN or Inf"):
        tta(bad)
    assert tta.num_batches == 1  # a refused call is not counted
    skip = tta_norm.adapt(tiny_net(), "ema", method=method, on_bad_batch="skip")
    skip(X)
    out = skip(bad)
    bad_inf = X.clone()
    bad_inf[0, 0, 0, 0] = float("inf")
    skip(bad_inf)
    assert skip.skipped_batches == 2 and skip.num_batches == 3
    assert torch.isfinite(out[[0, 1, 3]]).all()  # the clean samples still get predictions
    for k, v in skip.model.state_dict().items():
        assert torch.equal(v, state[k]), k
    for k, v in tta.model.state_dict().items():
        assert torch.equal(v, state[k]), k
    if method:
        assert str(skip.method.optimizer.state_dict()["state"]) == str(opt["state"])


def test_a_bundled_model_refuses_images_of_another_channel_count() -> None:
    from tta_norm.models import cifar_resnet

    tta = tta_norm.adapt(cifar_resnet(20), "tbn")
    with pytest.raises(ValueError, match=r"expected images of shape \(N, 3, H, W\)"):
        tta(torch.rand(2, 1, 32, 32))  # a grey image would broadcast to three channels
    assert (tta.num_batches, tta.num_adapted) == (0, 0)


def test_inputs_take_the_model_dtype_and_unusable_devices_are_named() -> None:
    tta = tta_norm.adapt(tiny_net(), "tbn")
    torch.testing.assert_close(tta(X.double()), tta(X), rtol=0, atol=0)  # float64 images, float32 model
    with pytest.raises(ValueError, match="meta tensor"):
        tta(torch.empty(X.shape, device="meta"))
    # a bfloat16 network that keeps its BatchNorm in float32: bfloat16 images stay as they are (the model has
    # parameters of their dtype), float64 ones take the model's most common dtype
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 3)).to(torch.bfloat16)
    net[1].float()
    x = torch.rand(2, 3, 6, 6)
    source = tta_norm.adapt(net, "source")
    assert source(x.bfloat16()).dtype == source(x.double()).dtype == torch.bfloat16
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA device"):
            tta_norm.adapt(tiny_net(), "tbn", device="cuda")
    with pytest.raises(ValueError, match="unknown device"):
        tta_norm.adapt(tiny_net(), "tbn", device="bogus")


def test_batch_size_one_per_preset() -> None:
    """TinyNet ends in a BatchNorm1d: one value per channel at batch size 1."""
    x1 = X[:1]
    for name in tta_norm.presets():
        tta = tta_norm.adapt(tiny_net(), name)
        if name in ("tbn", "medbn", "medbn-mad"):
            with pytest.raises(ValueError, match="window=W"):
                tta(x1)
            windowed = tta_norm.adapt(tiny_net(), name, window=4)
            outs = [windowed(X[i : i + 1]) for i in range(6)]
            assert all(o.shape == (1, 5) and torch.isfinite(o).all() for o in outs[1:])
            # from the 4th sample on, each prediction equals the last row of the 4-sample window batch
            ref = tta_norm.adapt(tiny_net(), name)(X[2:6])
            torch.testing.assert_close(outs[5], ref[-1:])
        else:
            out = tta(x1)
            assert out.shape == (1, 5) and torch.isfinite(out).all(), name


def test_a_window_steps_a_gradient_method_once_per_w_samples() -> None:
    """Marsden & Doebler's sliding window (``TTAMethod.forward``): a step when the window holds W samples it
    has not stepped on, the samples in between predicted from the window without a step."""
    W, lr = 4, 0.1
    stream = torch.randn(10, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    tta = tta_norm.adapt(tiny_net(), "tbn", "tent", window=W, optimizer="sgd", optim={"lr": lr, "momentum": 0.0})
    ref = tta_norm.adapt(tiny_net(), "tbn")  # the same network, stepped by hand
    names = [n for n, _ in tta.method.named_params]
    steps = 0
    for i in range(len(stream)):
        out = tta(stream[i : i + 1])
        window = stream[max(0, i - W + 1) : i + 1]
        if i == 0:
            continue  # a single sample: predicted with the current state
        logits = ref(window)
        torch.testing.assert_close(out, logits[-1:], msg=f"sample {i}")
        if (i + 1) % W == 0:  # samples 4 and 8: a full window of new samples
            steps += 1
            ref.model.requires_grad_(False)
            for name in names:
                ref.model.get_parameter(name).requires_grad_(True)
            loss = softmax_entropy(ref.model(window)).mean()
            grads = torch.autograd.grad(loss, [ref.model.get_parameter(n) for n in names])
            with torch.no_grad():
                for name, g in zip(names, grads, strict=True):
                    ref.model.get_parameter(name).sub_(lr * g)
        for name in names:
            torch.testing.assert_close(tta.model.get_parameter(name), ref.model.get_parameter(name), msg=name)
    assert steps == 2


def test_a_reset_keeps_the_window() -> None:
    """The window holds test inputs: ``episodic`` at batch size 1 still normalises with the last W samples."""
    stream = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    episodic = tta_norm.adapt(tiny_net(), "tbn", window=4, episodic=True)
    outs = [episodic(stream[i : i + 1]) for i in range(6)]
    assert episodic.num_resets == 6 and episodic.num_adapted == 1
    torch.testing.assert_close(outs[5], tta_norm.adapt(tiny_net(), "tbn")(stream[2:6])[-1:])
    episodic.reset()
    assert episodic.state()["window"].shape[0] == 3


def test_the_window_keeps_copies_of_the_inputs() -> None:
    """A caller that refills one input buffer in place must not rewrite the samples the window holds."""
    stream = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    reference = tta_norm.adapt(tiny_net(), "tbn", window=4)
    expected = [reference(stream[i : i + 1].clone()) for i in range(4)]
    reused = tta_norm.adapt(tiny_net(), "tbn", window=4)
    buffer = torch.empty(1, 3, 8, 8)
    for i in range(4):
        buffer.copy_(stream[i : i + 1])
        torch.testing.assert_close(reused(buffer), expected[i], rtol=0, atol=0)


def test_gradients_left_on_the_parameters_do_not_enter_the_next_step() -> None:
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(8))
    for method in ("tent", "eata"):
        clean = tta_norm.adapt(tiny_net(), "tbn", method=method, optimizer="sgd", lr=0.1)
        dirty = tta_norm.adapt(tiny_net(), "tbn", method=method, optimizer="sgd", lr=0.1)
        dirty.differentiable_forward(x).sum().backward()  # leaves .grad on the trainable norm parameters
        torch.testing.assert_close(dirty(x), clean(x), rtol=0, atol=0)
        torch.testing.assert_close(dirty(x), clean(x), rtol=0, atol=0)


class _TupleOut(nn.Module):
    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.net, self.head = tiny_net(), head

    def forward(self, x: torch.Tensor):
        return self.head(self.net(x))


@pytest.mark.parametrize("method", [None, "tent", "eata", "sar"])
def test_outputs_that_are_not_logits_are_one_line_errors(method: str | None) -> None:
    cases = [nn.Identity(), nn.Linear(5, 1), nn.Unflatten(1, (1, 5))] if method else []
    for head in [*cases, _Pair()]:
        tta = tta_norm.adapt(_TupleOut(head), "tbn", method)
        before = copy.deepcopy(tta.state())
        if isinstance(head, nn.Identity):
            assert tta(X).shape == (8, 5)  # (the plain case works)
            continue
        with pytest.raises((TypeError, ValueError), match="logits") as err:
            tta(X)
        assert "\n" not in str(err.value)
        assert all(torch.equal(v, before["model"][k]) for k, v in tta.state()["model"].items())


class _Pair(nn.Module):
    def forward(self, z: torch.Tensor):
        return z, z.sum()


def test_adapting_an_adapted_model_says_so() -> None:
    adapted = tta_norm.adapt(tiny_net(), "tbn")
    for wrapped in (adapted, nn.Sequential(adapted)):
        with pytest.raises(ValueError, match="already adapted"):
            tta_norm.adapt(wrapped, method="tent")
    model = tiny_net()  # converted in place: it holds the first wrapper's layers, spec and adapted state
    first = tta_norm.adapt(model, "ema", inplace=True)
    first(X)
    state = {k: v.clone() for k, v in first.state_dict().items()}
    for preset, method in (("source", None), (None, "tent"), ("tbn", None)):
        with pytest.raises(ValueError, match="already adapted"):  # ("source" ran the ema layers and adapted them)
            tta_norm.adapt(model, preset, method)
    assert all(torch.equal(v, first.state_dict()[k]) for k, v in state.items())


def test_spatial_batch_one_is_defined_for_tbn() -> None:
    model = resnet20()
    out = tta_norm.adapt(model, "tbn")(torch.rand(1, 3, 32, 32))
    assert torch.isfinite(out).all()


def test_determinism_same_inputs_same_outputs() -> None:
    outs = []
    for _ in range(2):
        tta = tta_norm.adapt(tiny_net(), "ema", method="sar", e_margin=10.0)
        outs.append(torch.stack([tta(X * (i + 1)) for i in range(3)]))
    assert torch.equal(outs[0], outs[1])


def test_domain_argument_reaches_sabn_heads() -> None:
    tta = tta_norm.adapt(tiny_net(), "sabn", num_domains=3)
    base = tta(X)
    with torch.no_grad():
        for _, lay in tta.norm_layers():
            lay.domain_bias[1].fill_(0.5)
    assert torch.equal(tta(X, domain=0), base)
    assert not torch.equal(tta(X, domain=1), base)
    per_sample = tta(X, domain=torch.tensor([0, 1] * 4))
    torch.testing.assert_close(per_sample[0::2], base[0::2])


def test_cli_lists_presets(capsys: pytest.CaptureFixture[str]) -> None:
    from tta_norm.cli import main

    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "medbn" in out and "tent" in out
    assert main([]) == 0


@pytest.mark.parametrize("preset", tta_norm.presets())
def test_every_preset_on_cifar_resnet20(preset: str) -> None:
    model = resnet20()
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tta = tta_norm.adapt(model, preset)
    assert len(tta.norm_layers()) == 19
    out = tta(x, domain=1 if preset == "sabn" else None)
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    if preset == "source":
        torch.testing.assert_close(out, model(x))
    tta.reset()
    assert torch.equal(tta(x, domain=1 if preset == "sabn" else None), out)


@pytest.mark.parametrize("preset", tta_norm.presets())
def test_every_preset_on_torchvision_resnet18(preset: str) -> None:
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.resnet18(num_classes=10))
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    tta = tta_norm.adapt(model, preset, method="tent" if preset in ("tbn", "medbn") else None)
    out = tta(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    if preset == "source":
        torch.testing.assert_close(out, model(x))


def test_init_state_is_loaded_and_is_what_reset_returns_to(tmp_path) -> None:
    model = tiny_net()
    fitted = tta_norm.adapt(model, "ttn")
    with torch.no_grad():
        for _, lay in fitted.norm_layers():
            lay.mix_weight.fill_(0.8)
    path = tmp_path / "ttn.pt"
    torch.save(fitted.model.state_dict(), path)
    for state in (path, fitted.model.state_dict()):
        tta = tta_norm.adapt(model, "ttn", init_state=state)
        assert all(float(lay.mix_weight[0]) == pytest.approx(0.8) for _, lay in tta.norm_layers())
        first = tta(X)
        tta.reset()
        assert torch.equal(tta(X), first)
    torch.testing.assert_close(first, tta_norm.adapt(model, "ttn", alpha=0.8)(X))
    with pytest.raises(ValueError, match="init_state does not fit"):
        tta_norm.adapt(model, "tbn", init_state=path)


def test_cli_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    from tta_norm.cli import SUBCOMMANDS, main

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert name in out
    for name in SUBCOMMANDS:  # every subcommand has its own --help
        with pytest.raises(SystemExit):
            main([name, "--help"])
        assert capsys.readouterr().out.startswith("usage: tta-norm " + name)


@pytest.mark.parametrize("method", [None, "tent", "eata", "sar"])
def test_state_and_load_state_fork_a_wrapper_exactly(method: str | None) -> None:
    """A wrapper that loads another's state() predicts and adapts exactly like it from then on."""
    a = tta_norm.adapt(tiny_net(), "ema", method=method)
    b = tta_norm.adapt(tiny_net(), "ema", method=method)
    a(X)
    a(X.flip(0))
    b.load_state(a.state())
    assert b.num_adapted == a.num_adapted == 2
    for batch in (X, X * 0.5):
        torch.testing.assert_close(b(batch), a(batch), rtol=0, atol=0)
    for (name, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    saved = a.state()
    kept = {k: v.clone() for k, v in saved["model"].items()}
    a(X)  # adapting further does not touch the saved copy
    assert all(torch.equal(saved["model"][k], v) for k, v in kept.items())
    assert any(not torch.equal(a.model.state_dict()[k], v) for k, v in kept.items())
    with pytest.raises(ValueError, match="gradient method"):
        tta_norm.adapt(tiny_net(), "ema", method=None if method else "tent").load_state(saved)


def test_will_reset_and_device() -> None:
    tta = tta_norm.adapt(tiny_net(), "tbn", reset_every=2)
    assert not tta.will_reset and tta.device == torch.device("cpu")
    tta(X)
    tta(X)
    assert tta.will_reset
    tta(X)
    assert tta.num_adapted == 1 and not tta.will_reset
    assert tta_norm.adapt(tiny_net(), "tbn", episodic=True).will_reset


@pytest.mark.parametrize("method", ["tent", "eata", "sar"])
def test_to_moves_the_adaptation_state_with_the_model(method) -> None:
    """After ``.double()`` (or ``.to(device)``) a wrapper goes on adapting as it would have: the optimiser's
    moments, the method's tensors and the window follow the model (Adam's step failed on float32 moments)."""
    kwargs = {"fisher_data": [X.flip(0)]} if method == "eata" else {}
    tta = tta_norm.adapt(tiny_net(), "tbn", method, window=4, **kwargs)
    tta(X)
    tta(X[:3] * 0.5)  # a step on the first batch, then three samples in the window
    single = copy.deepcopy(tta)
    tta.double()
    for batch in (X[3:5], X * 0.7, X.flip(0)):
        torch.testing.assert_close(tta(batch).float(), single(batch), rtol=1e-4, atol=1e-5)
    state = tta.state()
    tensors = [state["window"], *[t for v in state["method"]["attributes"].values() for t in _tensors(v)],
               *[t for s in state["method"]["optimizer"]["state"].values() for k, t in s.items() if k != "step"]]
    assert tensors and all(t.dtype == torch.float64 for t in tensors if t.is_floating_point())
    tta.reset()
    single.reset()
    torch.testing.assert_close(tta(X).float(), single(X), rtol=1e-4, atol=1e-5)


def _tensors(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


class _Spectrogram(torch.nn.Module):
    """(N, F, T) spectrograms, unsqueezed to (N, 1, F, T) before a conv and a BatchNorm2d."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.conv(x.unsqueeze(1))).mean((2, 3)))


def _token_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Embedding(20, 8), torch.nn.Flatten(), torch.nn.Linear(40, 6),
                               torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 2))  # fmt: skip


@pytest.mark.parametrize(
    ("build", "x"),
    [
        (_Spectrogram, torch.randn(4, 16, 20)),
        (_token_model, torch.randint(0, 20, (6, 5))),
    ],
)
def test_models_whose_input_is_not_an_image_batch_adapt_exactly(build, x) -> None:
    torch.manual_seed(0)
    model = build().eval()
    with torch.no_grad():
        torch.testing.assert_close(tta_norm.adapt(model, "source")(x), model(x), rtol=0, atol=0)
        torch.testing.assert_close(tta_norm.adapt(model, "tbn")(x), copy.deepcopy(model).train()(x))


def test_pixels_and_masks_are_refused_before_anything_runs() -> None:
    tta = tta_norm.adapt(_token_model().eval(), "tbn")
    for bad in (torch.zeros(4, 5, dtype=torch.uint8), torch.zeros(4, 5, dtype=torch.bool)):
        with pytest.raises(TypeError, match="x.float\\(\\) / 255"):
            tta(bad)
    assert tta.num_batches == 0


def test_the_unsqueeze_hint_is_given_only_for_a_missing_batch_dimension() -> None:
    plain = tta_norm.adapt(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval(), "tbn")
    with pytest.raises(ValueError, match="unsqueeze"):
        plain(torch.randn(3, 8, 8))
    spectrogram = tta_norm.adapt(_Spectrogram().eval(), "tbn")
    with pytest.raises((RuntimeError, ValueError)) as caught:  # a wrong input of the model's own rank: no hint
        spectrogram(torch.randn(4, 16))
    assert "unsqueeze" not in str(caught.value)
    with pytest.raises(TypeError, match="floating-point"):
        plain(torch.randn(2, 3, 8, 8, dtype=torch.complex64))
    assert plain.num_batches == spectrogram.num_batches == 0


@pytest.mark.parametrize("window", [None, 4])
def test_an_unbatched_image_gets_the_hint_on_a_model_with_norm_layers_of_several_ranks(window) -> None:
    """tiny_net has a BatchNorm2d and a BatchNorm1d: the 1d layer's 2-D rank hid the missing dimension."""
    tta = tta_norm.adapt(tiny_net(), "tbn", window=window)
    with pytest.raises(ValueError, match="unsqueeze"):
        tta(X[0])
    assert tta.num_batches == 0 and tta.state()["window"] is None


def test_integer_pixels_and_out_of_memory_errors() -> None:
    """Integer pixels to a conv net: a ValueError that says what to do (the raw dtype RuntimeError before);
    an out-of-memory error stays what it is (the message-based rewording must not turn it into a ValueError)."""
    tta = tta_norm.adapt(tiny_net(), "tbn")
    for dtype in (torch.int64, torch.int32):
        with pytest.raises(ValueError, match="x.float\\(\\) / 255"):
            tta((X * 50).round().to(dtype))

    class Exhausted(nn.Module):
        def forward(self, x):
            raise torch.OutOfMemoryError("tried to allocate 2.00 GiB: the tensor size exceeds what is free")

    exhausted = tta_norm.adapt(nn.Sequential(tiny_net(), Exhausted()), "tbn")
    with pytest.raises(torch.OutOfMemoryError):
        exhausted(X)


@pytest.mark.parametrize("preset,method", [("tbn", None), ("medbn", "tent"), ("ttn", "sar")])
def test_a_wrapper_adapts_under_bfloat16_autocast(preset, method):
    """The forward of a float32 network under CPU autocast (the docs' advice for reduced precision)."""
    full = tta_norm.adapt(tiny_net(), preset, method)
    mixed = tta_norm.adapt(tiny_net(), preset, method)
    for batch in (X, X.flip(0)):
        expected = full(batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = mixed(batch)
        assert got.dtype == torch.bfloat16 and bool(torch.isfinite(got).all())
        assert (got.float().argmax(1) == expected.argmax(1)).float().mean() >= 0.75
    assert all(p.dtype == torch.float32 for p in mixed.parameters())


def test_train_mode_of_the_wrapper_keeps_the_network_in_eval() -> None:
    """tta.train() turned the wrapped network's dropout on: predictions became random, also after reset()."""
    torch.manual_seed(0)
    net = nn.Sequential(tiny_net(), nn.Dropout(0.5), nn.Linear(tiny_net()(X).shape[1], 4))
    tta = tta_norm.adapt(net, "tbn")
    expected = tta(X)
    tta.train()
    assert tta.training and not tta.model.training
    torch.testing.assert_close(tta(X), expected, rtol=0, atol=0)
    tta.eval()
    assert not tta.training


def test_a_statistics_setting_the_preset_does_not_use_is_refused() -> None:
    """adapt(m, "tbn", momentum=0.9) and the like were accepted and gave exactly the plain preset."""
    for preset, kwargs in (("tbn", {"momentum": 0.9}), ("alpha", {"momentum": 0.9}), ("medbn", {"unbiased": True}),
                           ("tbn", {"median": "average"}), ("ema", {"iabn_k": 0.0}),
                           ("tbn", {"example_weight": 1.0})):  # fmt: skip
        with pytest.raises(ValueError, match="change.*nothing"):
            tta_norm.adapt(tiny_net(), preset, **kwargs)
    tta_norm.adapt(tiny_net(), "ema", momentum=0.2)  # used: accepted
    tta_norm.adapt(tiny_net(), "medbn", median="average")
    tta_norm.adapt(tiny_net(), "tbn", unbiased=True)


def test_init_state_given_as_the_saved_dict_loads_like_its_file(tmp_path) -> None:
    """A {"state_dict": ...} file was unwrapped, the same dict passed in memory was refused (missing keys)."""
    donor = tta_norm.adapt(tiny_net(), "ema")
    donor(X)
    saved = {"state_dict": donor.model.state_dict(), "meta": {"note": "fitted"}}
    torch.save(saved, tmp_path / "s.pt")
    from_file = tta_norm.adapt(tiny_net(), "ema", init_state=tmp_path / "s.pt")
    from_dict = tta_norm.adapt(tiny_net(), "ema", init_state=saved)
    torch.testing.assert_close(from_dict(X), from_file(X), rtol=0, atol=0)


@pytest.mark.parametrize("preset", ["ttn", "ema", "sabn"])
def test_an_init_state_fitted_on_another_model_is_refused(preset, tmp_path) -> None:
    """A state fitted on another checkpoint of the same architecture loaded whole: the model ran with the other
    model's convolutions and source statistics under its own name."""
    kwargs = {"num_domains": 2} if preset == "sabn" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnfittedTTNWarning)
        fitted = tta_norm.adapt(tiny_net(seed=1), preset, **kwargs)
        for _, layer in fitted.norm_layers():  # what fitting learns: affine, TTN weights, heads
            layer.weight.data.add_(0.5)
            for name in ("mix_weight", "domain_weight"):
                if hasattr(layer, name):
                    getattr(layer, name).data.mul_(0.5)
        torch.save({"state_dict": fitted.model.state_dict(), "meta": {}}, tmp_path / "fitted.pt")
        own = tiny_net(seed=1)
        tta_norm.adapt(own, preset, init_state=tmp_path / "fitted.pt", **kwargs)  # its own model: loads
        other = tiny_net(seed=2)
        before = copy.deepcopy(other.state_dict())
        for init_state in (tmp_path / "fitted.pt", fitted.model.state_dict()):
            for inplace in (False, True):
                with pytest.raises(ValueError, match="fitted on another model.*differ from the model's"):
                    tta_norm.adapt(other, preset, init_state=init_state, inplace=inplace, **kwargs)
                assert all(torch.equal(v, other.state_dict()[k]) for k, v in before.items())
        torch.save({"state_dict": fitted.model.state_dict(), "meta": {"config": {"train": "all"}}}, tmp_path / "w.pt")
        whole = tta_norm.adapt(other, preset, init_state=tmp_path / "w.pt", **kwargs)  # a whole-network training
    assert torch.equal(whole.model.conv.weight, fitted.model.conv.weight)


def test_a_model_without_batchnorm_is_told_what_it_has() -> None:
    """A network without any norm layer, or with frozen BatchNorms only, was told that gradient methods adapt
    LayerNorm/GroupNorm (which it does not have)."""
    from torchvision.ops import FrozenBatchNorm2d

    with pytest.raises(ValueError, match="no norm layer at all"):
        tta_norm.adapt(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), "tbn")
    with pytest.raises(ValueError, match="frozen BatchNorms.*register_norm_converter"):
        tta_norm.adapt(nn.Sequential(nn.Conv2d(3, 4, 3), FrozenBatchNorm2d(4)), "tbn")
    with pytest.raises(ValueError, match="LayerNorm/GroupNorm"):
        tta_norm.adapt(nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4)), "tbn")


class _TupleNet(nn.Module):
    """Returns (logits, features), as detection-style or distillation models do."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_net()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net(x), x


@pytest.mark.parametrize("call", ["forward", "graph", "graph_adapt"])
def test_a_model_returning_a_tuple_is_told_to_wrap_it(call) -> None:
    """differentiable_forward handed the tuple on (an attack then failed far from the cause)."""
    tta = tta_norm.adapt(_TupleNet(), "ema")
    before = {k: v.clone() for k, v in tta.state_dict().items()}
    run = {"forward": lambda: tta(X), "graph": lambda: tta.differentiable_forward(X),
           "graph_adapt": lambda: tta.differentiable_forward(X, adapt=True)}[call]  # fmt: skip
    with pytest.raises(TypeError, match="returned a tuple, not a tensor of logits; wrap it"):
        run()
    assert all(torch.equal(v, tta.state_dict()[k]) for k, v in before.items()) and tta.num_adapted == 0


@pytest.mark.parametrize("make", [torch.jit.script, lambda m: torch.jit.trace(m, X)])
def test_a_torchscript_model_is_told_to_adapt_the_eager_one(make) -> None:
    """A scripted model failed with an AttributeError of TorchScript's internals, or was said to have no norm
    layer at all."""
    scripted = make(tiny_net())
    for preset in ("source", "tbn"):
        with pytest.raises(TypeError, match="TorchScript.*adapt the eager model"):
            tta_norm.adapt(scripted, preset)
