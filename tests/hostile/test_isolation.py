"""Graph isolation, threads and per-call options of the wrapper."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from torch import nn

import tta_norm
from tta_norm.norm import NormSpec
from tta_norm.norm.context import frames


def _conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 30 * 30, 10)
    ).eval()


# ----------------------------------------------------------------------------------------------- graph isolation
@pytest.mark.parametrize("method", ["tent", "eata", "sar"])
def test_adaptation_never_reaches_the_callers_graph(method):
    pre = nn.Conv2d(3, 3, 1)
    tta = tta_norm.adapt(_conv_net(), "tbn", method=method)
    x = pre(torch.randn(8, 3, 32, 32))
    logits = tta(x)
    assert pre.weight.grad is None  # the method's entropy gradient stayed inside the wrapper
    assert logits.grad_fn is None and not logits.requires_grad
    x.sum().backward()  # the caller's own backward still works (no "backward through the graph a second time")
    assert pre.weight.grad is not None


def test_differentiable_forward_gives_input_gradients_and_changes_nothing():
    tta = tta_norm.adapt(_conv_net(), "ema", method="tent")
    state = {k: v.clone() for k, v in tta.state_dict().items()}
    x = torch.randn(4, 3, 32, 32, requires_grad=True)
    tta.differentiable_forward(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(torch.equal(v, tta.state_dict()[k]) for k, v in state.items())
    assert tta.num_batches == 0 and tta.num_adapted == 0


@pytest.mark.parametrize("method", [None, "tent"])
def test_differentiable_forward_sees_the_window_as_the_forward_does(method):
    """With window=W the forward normalises a small batch with the window's samples; the differentiable
    forward gave the logits of the batch alone."""
    tta = tta_norm.adapt(_conv_net(), "tbn", method=method, window=4)
    xs = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    for i, n in enumerate((1, 1, 2, 1, 1)):
        x = xs[i : i + n].clone().requires_grad_(True)
        window = None if tta._window_buffer is None else tta._window_buffer.clone()
        logits = tta.differentiable_forward(x)
        logits.logsumexp(1).sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0
        assert (window is None and tta._window_buffer is None) or torch.equal(window, tta._window_buffer)
        torch.testing.assert_close(logits.detach(), tta(x.detach()), rtol=1e-5, atol=1e-6)  # (kernel vs autograd)


def test_differentiable_forward_adapt_commits_as_one_transaction():
    tta = tta_norm.adapt(_conv_net(), "ema")
    before = tta.model[1].ema_mean.clone()
    x = torch.randn(4, 3, 32, 32, requires_grad=True)
    tta.differentiable_forward(x, adapt=True).sum().backward()
    assert x.grad is not None and not torch.equal(before, tta.model[1].ema_mean) and tta.num_adapted == 1
    with pytest.raises(ValueError, match="statistics-only"):
        tta_norm.adapt(_conv_net(), "tbn", method="tent").differentiable_forward(x, adapt=True)


@pytest.mark.parametrize("policy", [{"episodic": True}, {"reset_every": 2}])
def test_differentiable_forward_adapt_takes_the_reset_that_is_due(policy):
    """The adapting differentiable forward went on from the previous batch's state where forward() resets."""
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(4, 3, 32, 32, generator=g) + shift for shift in (3.0, 0.0, -2.0, 1.0)]
    by_forward = tta_norm.adapt(_conv_net(), "ema", **policy)
    by_graph = tta_norm.adapt(_conv_net(), "ema", **policy)
    for x in xs:
        expected = by_forward(x)
        got = by_graph.differentiable_forward(x, adapt=True).detach()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)  # (kernel vs autograd)
    assert by_graph.num_resets == by_forward.num_resets > 0


# --------------------------------------------------------------------------------------- threads and options
def _run_threads(*targets) -> None:
    errors: list[BaseException] = []

    def guard(fn):
        try:
            fn()
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=guard, args=(fn,)) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_skipping_thread_never_leaks_source_statistics_into_clean_batches():
    tta = tta_norm.adapt(_conv_net(), "tbn", on_bad_batch="skip")
    clean = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(20)]
    with torch.no_grad():
        expected = [tta_norm.adapt(_conv_net(), "tbn")(x) for x in clean]
    got: list[torch.Tensor] = []
    bad = torch.full((4, 3, 32, 32), float("nan"))

    def clean_stream():
        with torch.no_grad():
            got.extend(tta(x) for x in clean)

    def bad_stream():
        with torch.no_grad():
            for _ in range(20):
                tta(bad)

    _run_threads(clean_stream, bad_stream, bad_stream)
    for out, ref in zip(got, expected, strict=True):
        torch.testing.assert_close(out, ref)  # test statistics every time, never source statistics
    assert tta.skipped_batches == 40
    assert all(layer.use_batch and layer.update_state and layer.domain is None for _, layer in tta.norm_layers())


def test_per_sample_domains_do_not_bleed_between_threads():
    spec = NormSpec(num_domains=3)
    tta = tta_norm.adapt(_conv_net(), spec)
    with torch.no_grad():
        layer = tta.norm_layers()[0][1]
        layer.domain_weight.copy_(torch.rand(3, 4) + 0.5)
        layer.domain_bias.copy_(torch.randn(3, 4))
    xs = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(10)]
    with torch.no_grad():
        refs = {k: [tta(x, domain=k) for x in xs] for k in (0, 2)}
    results: dict[int, list[torch.Tensor]] = {0: [], 2: []}

    def stream(k):
        def run():
            with torch.no_grad():
                results[k].extend(tta(x, domain=k) for x in xs)

        return run

    _run_threads(stream(0), stream(2))
    for k in (0, 2):
        for out, ref in zip(results[k], refs[k], strict=True):
            torch.testing.assert_close(out, ref)


def test_tent_from_two_threads_is_serialised():
    tta = tta_norm.adapt(_conv_net(), "tbn", method="tent")
    xs = [torch.randn(4, 3, 32, 32) for _ in range(5)]
    _run_threads(lambda: [tta(x) for x in xs], lambda: [tta(x) for x in xs])
    assert tta.num_adapted == 10


def test_concurrent_calls_never_overlap():
    tta = tta_norm.adapt(_conv_net(), "tbn")
    inside, overlaps = [], []
    inner = tta.model[0]

    def slow_hook(module, inp):
        if inside:
            overlaps.append(1)
        inside.append(1)
        time.sleep(0.01)
        inside.pop()

    inner.register_forward_pre_hook(slow_hook)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _run_threads(*[lambda: [tta(x) for _ in range(5)]] * 3)
    assert not overlaps


def test_per_call_on_bad_batch_and_frames_are_restored():
    tta = tta_norm.adapt(_conv_net(), "tbn")
    bad = torch.full((2, 3, 32, 32), float("nan"))
    with torch.no_grad():
        tta(bad, on_bad_batch="skip")
        with pytest.raises(ValueError):
            tta(bad)
    assert tta.skipped_batches == 1 and not frames()


def test_reset_restores_every_per_call_flag():
    tta = tta_norm.adapt(_conv_net(), "tbn")
    layer = tta.norm_layers()[0][1]
    layer.use_batch, layer.update_state, layer.domain = False, False, 1
    tta.reset()
    assert layer.use_batch and layer.update_state and layer.domain is None


# ------------------------------------------------------------------------------------------------ validation
def test_out_of_range_domain_is_a_value_error():
    tta = tta_norm.adapt(_conv_net(), "tbn", num_domains=3)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for bad in (3, -1, torch.tensor([0, 3]), torch.tensor([0.0, 1.0])):
            with pytest.raises(ValueError, match="domain"):
                tta(x, domain=bad)
        tta(x, domain=torch.tensor([0, 2]))


def test_domain_on_a_preset_without_heads_is_a_value_error():
    tta = tta_norm.adapt(_conv_net(), "tbn")
    x = torch.randn(2, 3, 32, 32)
    for domain in (1, 2, torch.tensor([0, 1])):
        with pytest.raises(ValueError, match="no SaBN heads"):
            tta(x, domain=domain)
    with torch.no_grad():
        torch.testing.assert_close(tta(x, domain=0), tta(x))  # the one domain: the shared affine


def test_unbatched_image_is_a_value_error():
    from tta_norm.models import cifar_resnet

    tta = tta_norm.adapt(cifar_resnet(20).eval(), "tbn")
    with pytest.raises(ValueError, match="unsqueeze"):
        tta(torch.randn(3, 32, 32))
    assert tta.num_batches == 0


def test_meta_device_model_is_refused_at_adapt():
    with torch.device("meta"):
        model = _conv_net()
    with pytest.raises(ValueError, match="meta"):
        tta_norm.adapt(model, "tbn")


def test_context_managers_act_in_the_calling_thread_only():
    from tta_norm.norm import keep_state

    tta = tta_norm.adapt(_conv_net(), "ema")
    inside, release = threading.Event(), threading.Event()

    def hold_keep_state():
        with keep_state(tta.model):
            inside.set()
            release.wait(10)

    holder = threading.Thread(target=hold_keep_state)
    holder.start()
    inside.wait(10)
    before = tta.model[1].ema_mean.clone()
    with torch.no_grad():
        tta(torch.randn(4, 3, 32, 32))
    release.set()
    holder.join()
    assert not torch.equal(before, tta.model[1].ema_mean)  # this thread committed its update


def test_copies_get_their_own_lock():
    import copy

    tta = tta_norm.adapt(_conv_net(), "ema", method="tent")
    twin = copy.deepcopy(tta)
    assert twin._lock is not tta._lock
    twin(torch.randn(4, 3, 32, 32))
    assert twin.num_adapted == 1 and tta.num_adapted == 0


_PAUSE: dict[str, threading.Event] = {}


class _Paused(nn.Module):
    """A network whose forward waits for ``_PAUSE["resume"]`` after it has started (``_PAUSE["started"]``);
    the events live outside the module, which ``adapt`` copies."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _conv_net()

    def forward(self, x):
        if _PAUSE:
            _PAUSE["started"].set()
            assert _PAUSE["resume"].wait(10)
        return self.net(x)


def test_load_state_dict_waits_for_a_forward_in_another_thread():
    """A state loaded in the middle of another thread's adapting forward lands after it (it landed inside it:
    the step then ran on half-loaded parameters and the forward's commit overwrote the loaded statistics)."""
    tta = tta_norm.adapt(_Paused(), "ema")
    loaded = {k: v.clone() + 1 if v.is_floating_point() else v for k, v in tta.state_dict().items()}
    done = []
    _PAUSE.update(started=threading.Event(), resume=threading.Event())
    thread = threading.Thread(target=lambda: done.append(tta(torch.randn(4, 3, 32, 32))))
    thread.start()
    assert _PAUSE["started"].wait(10)
    loader = threading.Thread(target=lambda: tta.load_state_dict(loaded))
    loader.start()
    time.sleep(0.2)
    assert loader.is_alive()  # waiting for the forward
    _PAUSE["resume"].set()
    thread.join(10)
    loader.join(10)
    _PAUSE.clear()
    assert done and all(torch.equal(v, loaded[k]) for k, v in tta.state_dict().items())
