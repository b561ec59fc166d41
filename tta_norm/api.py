"""The public entry point: ``tta_norm.adapt(model, preset, method=...)`` -> a :class:`TTAModel`."""

from __future__ import annotations

import contextlib
import copy
import os
import re
import threading
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from tta_norm import kernels
from tta_norm.device import available_device, input_dtype
from tta_norm.methods import GradientMethod, get_method_class
from tta_norm.methods.base import NonFiniteLogits, all_finite, optim_setting_names
from tta_norm.norm.adaptive import AdaptiveNorm, InputRankError, adaptive_layers, check_domain
from tta_norm.norm.context import UNSET, layer_options
from tta_norm.norm.convert import convert_batchnorms, find_batchnorms
from tta_norm.norm.spec import NormSpec, spec_fields, unused_fields
from tta_norm.presets import Preset, UnfittedTTNWarning, get_preset
from tta_norm.transaction import MutableBuffers, Snapshot

BadBatchPolicy = Literal["raise", "skip"]


class TTAModel(nn.Module):
    """A model whose BatchNorm layers adapt online; every forward adapts on its batch and returns logits.

    Build it with :func:`tta_norm.adapt`.  Reset policies: ``reset()`` (explicit), ``episodic=True`` (reset
    before every batch), ``reset_every=N`` (reset after every N adapted batches, RDumb), and never (continual;
    the default).  ``reset()`` restores parameters, statistics buffers, optimiser and method state, and the
    layers' option defaults: the outputs afterwards are bit-identical to those of a freshly built wrapper.

    Transactions: a forward changes the adaptation state only if it succeeds as a whole (the model's
    forward, the method's step and finite logits); otherwise every buffer, parameter, optimiser moment and
    method attribute is restored bit for bit (:mod:`tta_norm.transaction`).  Bad batches: a batch with
    NaN/Inf inputs, or whose adapting forward gives non-finite logits, raises ``ValueError``
    (``on_bad_batch="raise"``) or, with ``on_bad_batch="skip"``, is predicted with the current state without
    adapting (``skipped_batches`` counts them).  ``window=W`` normalises a batch smaller than W together with
    the previous samples, up to W in all (a sliding window for batch size 1, as in Marsden & Doebler's
    benchmark, ``TTAMethod.forward``): the statistics adapt at every call, a gradient method takes its step
    once per W samples (when the window holds W samples it has not stepped on) and predicts the calls in
    between from the window without a step; while the window holds a single sample, that sample is predicted
    with the current state without adapting.  The window holds test inputs, not adaptation state: a reset
    (``episodic``, ``reset_every``, SAR's recovery, :meth:`reset`) keeps it, as in that benchmark.

    Isolation: adaptation runs on a detached copy of the input and the returned logits carry no graph, so a
    caller's autograd graph never receives gradients from a method's step.  Gradients of the adapting
    forward w.r.t. its input go through :meth:`differentiable_forward`.  Per-call options (``domain``,
    ``on_bad_batch``) travel with the call (:mod:`tta_norm.norm.context`); a wrapper adapts one stream, so
    concurrent calls from several threads are serialised by a lock, in arrival order.

    Counters: ``num_batches`` (batches answered; a refused call is not counted), ``num_adapted`` (batches
    adapted on since the last reset), ``skipped_batches``, ``num_resets`` (every return to the source state:
    explicit, episodic, periodic, and SAR's model recovery, which also restarts the ``reset_every`` count).
    """

    def __init__(
        self,
        model: nn.Module,
        spec: NormSpec,
        method: GradientMethod | None = None,
        *,
        preset_name: str = "",
        episodic: bool = False,
        reset_every: int | None = None,
        on_bad_batch: BadBatchPolicy = "raise",
        window: int | None = None,
    ) -> None:
        super().__init__()
        _check_policy(on_bad_batch)
        if reset_every is not None and reset_every < 1:
            raise ValueError(f"reset_every must be a positive number of batches, got {reset_every}")
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if meta:
            raise ValueError(
                f"the model has tensors on the 'meta' device ({meta[0]!r}...), which hold no values to adapt; "
                "materialise it first, e.g. model.to_empty(device='cpu') and load its weights"
            )
        self.model = model
        self.spec = spec
        self.preset_name = preset_name
        self.method = method
        self.episodic = episodic
        self.reset_every = reset_every
        self.on_bad_batch = on_bad_batch
        self.window = window
        self.num_batches = 0
        self.num_adapted = 0
        self.skipped_batches = 0
        self.num_resets = 0
        self._window_buffer: Tensor | None = None
        self._window_samples = 0  # samples that went through the window (its step clock)
        self._layers = [layer for _, layer in adaptive_layers(model)]
        # (a tuple: a plain attribute, not a registered parameter) the usual answer of _input_dtype in one lookup
        self._first_float = tuple(p for p in model.parameters() if p.is_floating_point())[:1]
        self._layer_defaults = [(layer.update_state, layer.use_batch, layer.domain) for layer in self._layers]
        self._num_domains = max((layer.spec.num_domains for layer in self._layers), default=1)
        ranks = [max(layer.expected_dims) for layer in self._layers if layer.expected_dims]
        self._max_rank = max(ranks, default=2)  # an input of lower rank that a layer refuses lacks a dimension
        self._mutable_buffers = MutableBuffers(model)
        self._lock = threading.RLock()
        self._initial_model_state = copy.deepcopy(model.state_dict())
        self._initial_optimizer_state = copy.deepcopy(method.optimizer.state_dict()) if method else None
        device = self._device()
        if self._layers and (device is None or device.type == "cpu"):
            kernels.kernel()  # build/load the compiled kernel now, never inside a (timed) forward

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__() if hasattr(super(), "__getstate__") else dict(self.__dict__)
        state = dict(state)
        state.pop("_lock", None)  # locks are not copyable; a copy gets its own
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._lock = threading.RLock()

    def train(self, mode: bool = True) -> TTAModel:
        """Sets the wrapper's own flag only: the adapted network stays in ``eval()`` as :func:`adapt` left it
        (dropout off; adaptive norm layers ignore the mode).  Propagated, ``tta.train()`` turned dropout on and
        every prediction random, also after :meth:`reset`."""
        self.training = mode
        return self

    def _apply(self, fn: Any, recurse: bool = True) -> TTAModel:
        """``.to()``, ``.cuda()``, ``.double()``...: the model's tensors as for any module, and with them the
        adaptation state kept outside it, so the next step runs where and in what dtype the model now does:
        the optimiser's state (cast as ``Optimizer.load_state_dict`` casts it to its parameters), the method's
        tensors (EATA's Fisher weights and moving average...), the window and the reset snapshot."""
        super()._apply(fn, recurse)
        with self._lock:
            if self._window_buffer is not None:
                self._window_buffer = fn(self._window_buffer)
            self._initial_model_state = _map_tensors(fn, self._initial_model_state)
            if self.method is not None:
                optimizer = self.method.optimizer
                optimizer.load_state_dict(optimizer.state_dict())
                for key, value in list(vars(self.method).items()):
                    if key not in self.method.WIRING:
                        setattr(self.method, key, _map_tensors(fn, value))
        return self

    # -- reset ---------------------------------------------------------------------------------------------
    def _restore(self) -> None:
        self.model.load_state_dict(self._initial_model_state)
        if self.method is not None:
            self.method.optimizer.load_state_dict(copy.deepcopy(self._initial_optimizer_state))
            self.method.optimizer.zero_grad(set_to_none=True)
            self.method.reset_requested = False
        self.num_adapted = 0
        self.num_resets += 1

    def reset(self) -> None:
        """Back to the source model: parameters, statistics, optimiser and method state, and the layers'
        per-call option defaults (``update_state``, ``use_batch``, ``domain``) as they were at construction.
        The window's samples stay: they are test inputs, not adaptation state."""
        with self._lock:
            self._restore()
            for layer, (update_state, use_batch, domain) in zip(self._layers, self._layer_defaults, strict=True):
                layer.update_state, layer.use_batch, layer.domain = update_state, use_batch, domain
            if self.method is not None:
                self.method.reset_method_state()

    # -- adaptation state -----------------------------------------------------------------------------------
    COUNTERS = ("num_batches", "num_adapted", "skipped_batches", "num_resets")

    def state(self) -> dict[str, Any]:
        """Everything adaptation changes, deep-copied: the model's parameters and buffers, the method's
        optimiser and own state, the counters and the window buffer, with the :class:`NormSpec` they belong to.
        :meth:`load_state` puts it back (on this wrapper or on a copy of it: attacks and fitting fork a deployed
        model this way)."""
        with self._lock:
            return {
                "model": copy.deepcopy(self.model.state_dict()),
                "method": self.method.state_dict() if self.method is not None else None,
                "counters": {k: getattr(self, k) for k in self.COUNTERS},
                "window": None if self._window_buffer is None else self._window_buffer.clone(),
                "window_samples": self._window_samples,
                "spec": self.spec,
            }

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Make this wrapper carry ``state`` (from :meth:`state` of this wrapper or of one built the same way).
        A state that does not fit (another architecture, spec or method, a missing or mistyped part, a window
        this wrapper's window cannot hold) is a ``ValueError`` and leaves this wrapper as it was."""
        with self._lock:
            self._check_state(state)
            before = self.state()
            attributes = None if self.method is None else dict(vars(self.method))
            try:
                self._put_state(state)
            except BaseException:
                self._put_state(before)
                if attributes is not None:  # every attribute as it was before the failed load
                    vars(self.method).clear()
                    vars(self.method).update(attributes)
                raise

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict`` (the model's tensors; layers' own key migrations included), all or
        nothing: a state that does not fit raises a one-line ``RuntimeError`` and leaves every tensor as it was."""
        try:
            # under the wrapper's lock: a forward in another thread sees the old state or the new, never a mix
            with self._lock, _undone_on_error(self, values=True):  # tensor objects (assign=True swaps them), values
                return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except RuntimeError as err:
            raise RuntimeError(f"load_state_dict: the state does not fit this wrapper "
                               f"({_describe_misfit(self, state_dict, err)}); nothing was loaded") from None

    def _check_state(self, state: Mapping[str, Any]) -> None:
        parts = ("model", "method", "counters", "window")
        if not isinstance(state, Mapping) or any(k not in state for k in parts):
            raise ValueError(f"load_state: a state has the parts {list(parts)} (from TTAModel.state())")
        if (state["method"] is None) != (self.method is None):
            raise ValueError("load_state: the state and this wrapper differ in having a gradient method")
        if self.method is not None:
            if not isinstance(state["method"], Mapping):
                raise ValueError("load_state: the method part must be a mapping (from TTAModel.state())")
            kind = state["method"].get("class", type(self.method).__name__)  # (states saved before it was kept)
            if kind != type(self.method).__name__:
                raise ValueError(f"load_state: the state is of method {kind!r}, this wrapper runs "
                                 f"{type(self.method).__name__!r}")  # fmt: skip
            self._check_optimizer_state(state["method"].get("optimizer"))
            attributes = state["method"].get("attributes")
            ours = {k for k in vars(self.method) if k not in self.method.WIRING}
            if not isinstance(attributes, Mapping) or set(attributes) != ours:
                given = sorted(attributes) if isinstance(attributes, Mapping) else type(attributes).__name__
                raise ValueError(f"load_state: the method part's attributes ({given}) are not this "
                                 f"{type(self.method).__name__}'s {sorted(ours)}")  # fmt: skip
        if not isinstance(state["model"], Mapping):
            raise ValueError("load_state: the model part must be a state dict")
        spec = state.get("spec", self.spec)  # (states saved before they named their spec: not checked)
        if spec != self.spec:
            raise ValueError(f"load_state: the state's statistics are those of {spec!r}, this wrapper computes "
                             f"{self.spec!r}")  # fmt: skip
        counters = state["counters"]
        if not isinstance(counters, Mapping) or set(counters) != set(self.COUNTERS):
            raise ValueError(f"load_state: the counters must be {list(self.COUNTERS)}")
        counts = {**counters, "window_samples": state.get("window_samples", 0)}
        bad = [k for k, v in counts.items() if isinstance(v, bool) or not isinstance(v, int) or v < 0]
        if bad:
            raise ValueError(f"load_state: counter {bad[0]!r} must be an int >= 0, got {counts[bad[0]]!r}")
        self._check_window_state(state["window"])

    def _check_window_state(self, window: Any) -> None:
        """A window part this wrapper's window can hold: None, or 1 to W-1 earlier samples of the kind it
        has seen (a window of another shape failed every later forward, in ``torch.cat``)."""
        if window is None:
            return
        if not isinstance(window, Tensor):
            raise ValueError("load_state: the window part must be a tensor or None (from TTAModel.state())")
        held = 0 if self.window is None else self.window - 1
        if window.dim() < 2 or not 1 <= window.shape[0] <= held:
            raise ValueError(f"load_state: the window part holds {tuple(window.shape)}, this wrapper's window keeps "
                             f"up to {held} earlier samples (a batch of shape (n, ...), 1 <= n <= {held})")
        try:
            window = self._validate(window)  # (moved to the model's device and input dtype, as a batch is)
        except (TypeError, ValueError) as err:
            raise ValueError(f"load_state: the window part is not a batch this wrapper takes: {err}") from None
        ours = self._window_buffer
        if ours is not None and (window.shape[1:], window.dtype) != (ours.shape[1:], ours.dtype):
            raise ValueError(f"load_state: the window part holds samples of shape {tuple(window.shape[1:])} "
                             f"({window.dtype}), this wrapper's window {tuple(ours.shape[1:])} ({ours.dtype})")

    def _check_optimizer_state(self, given: Any) -> None:
        """The state's optimiser is this wrapper's kind: the same groups, parameter counts and setting names
        (an Adam state loaded into SGD failed at the next step, with every later forward)."""
        ours = self.method.optimizer.state_dict()["param_groups"]
        groups = given.get("param_groups") if isinstance(given, Mapping) else None

        def shape(gs: Any) -> list[tuple[int, list[str]]]:
            return [(len(g.get("params", ())), sorted(k for k in g if k != "params")) for g in gs]

        if not isinstance(groups, list) or not all(isinstance(g, Mapping) for g in groups):
            raise ValueError("load_state: the method part has no optimiser state (from TTAModel.state())")
        if shape(groups) != shape(ours):
            raise ValueError(f"load_state: the state's optimiser (groups {shape(groups)}) is not this wrapper's "
                             f"{type(self.method.optimizer).__name__} (groups {shape(ours)})")  # fmt: skip

    def _put_state(self, state: Mapping[str, Any]) -> None:
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as err:
            raise ValueError(f"load_state: the model state does not fit this wrapper "
                             f"({_describe_misfit(self.model, state['model'], err)})") from None
        if self.method is not None:
            self.method.load_state_dict(state["method"])
        for key, value in state["counters"].items():
            setattr(self, key, value)
        window = state["window"]
        self._window_buffer = None if window is None else self._validate(window).clone()
        self._window_samples = int(state.get("window_samples", 0))  # (states saved before it was kept: 0)

    @property
    def device(self) -> torch.device | None:
        """The device of the adapted model's parameters (``None`` for a model without any)."""
        return self._device()

    @property
    def will_reset(self) -> bool:
        """Whether the next adapting forward starts with a reset (``episodic``, or ``reset_every`` reached)."""
        return self._reset_due()

    # -- helpers -------------------------------------------------------------------------------------------
    def norm_layers(self) -> list[tuple[str, AdaptiveNorm]]:
        """The ``(name, layer)`` pairs of the model's adaptive norm layers."""
        return list(adaptive_layers(self.model))

    def _input_dtype(self, given: torch.dtype) -> torch.dtype | None:
        """The dtype an input of dtype ``given`` is cast to (:func:`tta_norm.device.input_dtype`), answered
        from the first floating parameter in the usual case."""
        if self._first_float and self._first_float[0].dtype == given:
            return given
        return input_dtype(self.model, given)

    def _device(self) -> torch.device | None:
        if self._layers:  # (the cheap lookup: a forward's input check calls this)
            return self._layers[0]._buffers["source_mean"].device
        for t in self.model.parameters():
            return t.device
        for t in self.model.buffers():
            return t.device
        return None

    def _check_domain(self, domain: int | Tensor | None, batch_size: int) -> None:
        if domain is None:
            return
        try:
            check_domain(domain, self._num_domains, batch_size)
        except ValueError as err:
            if self._num_domains > 1:
                raise
            raise ValueError(
                f"domain={domain!r} given, but preset {self.preset_name or self.spec!r} has no SaBN heads (one "
                "domain: index 0 only); build the wrapper with num_domains=K (e.g. the 'sabn' preset) or pass "
                "domain=None"
            ) from err

    def _validate(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"expected a torch.Tensor batch, got {type(x).__name__}")
        if x.dtype in (torch.uint8, torch.bool) or x.is_complex():  # pixels, a mask: not a model input (ids are)
            raise TypeError(
                f"expected a floating-point batch, got dtype {x.dtype}; convert images first, "
                "e.g. x.float() / 255 for uint8 pixels"
            )
        if x.dim() < 2:
            raise ValueError(f"expected a batch of shape (N, ...), got shape {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError("got an empty batch (N = 0); nothing to predict or adapt on")
        if x.is_meta:
            raise ValueError("got a meta tensor (shapes without data); pass a batch of values")
        device = self._device()
        dtype = self._input_dtype(x.dtype) if x.is_floating_point() else None  # integer inputs (ids) stay as given
        if (device is not None and x.device != device) or (dtype is not None and x.dtype != dtype):
            x = x.to(device=device, dtype=dtype)
        return x

    def _with_window(self, x: Tensor) -> Tensor:
        """``x`` after the window's samples, the last W in all (``x`` itself without a window or when it has W)."""
        if self.window is None or x.shape[0] >= self.window or self._window_buffer is None:
            return x
        return torch.cat([self._window_buffer, x])[-self.window :]

    def _windowed(self, x: Tensor) -> tuple[Tensor, bool]:
        """The batch to normalise ``x`` with (``x`` and the window's previous samples), and whether a gradient
        method steps on it (always without a window or for a batch of W or more; else once per W samples)."""
        n = x.shape[0]
        xw = self._with_window(x)
        if self.window is not None and self.window > 1:  # a copy: the caller may refill x in place
            self._window_buffer = xw[-(self.window - 1) :].detach().clone()
        if self.window is None or n >= self.window:
            return xw, True
        before, self._window_samples = self._window_samples, self._window_samples + n
        return xw, self._window_samples // self.window > before // self.window

    def layer_frame(self, n: int, **options: Any) -> contextlib.AbstractContextManager[None]:
        """The layer options (:func:`~tta_norm.norm.context.layer_options`) of one forward of this wrapper on
        ``n`` samples: ``samples`` for pseudo-count mixing (a layer's rows need not be images), plus ``options``;
        no frame when nothing is set.  Code that calls ``tta.model`` directly (attacks) enters it to see what
        the wrapper's forward gives the layers."""
        if self.spec.pseudo_count is not None:
            options["samples"] = n
        options = {k: v for k, v in options.items() if v is not UNSET}
        return layer_options(self._layers, **options) if options else _NO_FRAME

    def _predict_without_adapting(self, x: Tensor, domain: int | Tensor | None) -> Tensor:
        with torch.no_grad(), layer_options(self._layers, use_batch=False, domain=_option(domain)):
            return self.model(x)

    def _skip(self, x: Tensor, domain: int | Tensor | None) -> Tensor:
        """A skipped batch, predicted without adapting from the state it would have been adapted from: after the
        reset that is due (``episodic``, ``reset_every``), not from the previous batch's adapted state."""
        if self._reset_due():
            self.reset()
        self.skipped_batches += 1
        return self._predict_without_adapting(x, domain)

    def _reset_due(self) -> bool:
        return self.episodic or (self.reset_every is not None and self.num_adapted >= self.reset_every)

    # -- forward -------------------------------------------------------------------------------------------
    def forward(
        self, x: Tensor, domain: int | Tensor | None = None, *, on_bad_batch: BadBatchPolicy | None = None
    ) -> Tensor:
        """Adapt on the batch ``x`` (``(N, ...)``: floats, or integer ids for a model that embeds them; not uint8
        pixels) and return its logits (without autograd graph).

        ``domain`` selects SaBN heads (an int, or ``(N,)`` per-sample indices); ``None`` applies the shared
        affine only.  ``on_bad_batch`` overrides the wrapper's policy for this call.  The input is moved to the
        model's device (and, unless some of its parameters have the input's dtype, to the model's dtype) and
        detached: adaptation never reaches back into the caller's graph.
        """
        policy = self.on_bad_batch if on_bad_batch is None else _check_policy(on_bad_batch)
        x = self._validate(x)
        if x.requires_grad:
            x = x.detach()
        self._check_domain(domain, x.shape[0])
        if self.window is not None and isinstance(domain, Tensor):
            raise ValueError("per-sample domain indices cannot be combined with window=W; pass an int domain")
        with self._lock:
            if not all_finite(x):
                if policy == "raise":
                    raise ValueError(
                        "the batch contains NaN or Inf values; nothing was adapted. Clean the input, or build the "
                        "wrapper with on_bad_batch='skip' to predict such batches without adapting"
                    )
                logits = self._skip(x, domain)
            else:
                logits = self._adapt(x, domain, policy)
            self.num_batches += 1  # a batch answered; a refused one changes nothing
            return logits

    def _adapt(self, x: Tensor, domain: int | Tensor | None, policy: BadBatchPolicy) -> Tensor:
        """One transaction: (reset,) window, forward and step; everything is rolled back if any part fails."""
        reset_due = self._reset_due()
        snapshot = Snapshot(
            self, self._mutable_buffers, self.method, full=reset_due,
            owner_attributes=("_window_buffer", "_window_samples", "num_adapted", "num_resets"),
        )  # fmt: skip
        try:
            if reset_due:
                self.reset()
            n = x.shape[0]
            xw, step = self._windowed(x)
            if self.window is not None and xw.shape[0] < 2:
                # nothing to normalise the very first sample with yet: predict with the current state
                return self._predict_without_adapting(xw, domain)
            with self.layer_frame(xw.shape[0], domain=_option(domain)):
                if self.method is not None and step:
                    logits = self.method.forward_and_adapt(xw)
                else:  # statistics only (no method, or a window between two of the method's steps)
                    with torch.no_grad() if self.method is not None else contextlib.nullcontext():
                        logits = self.model(xw)
            _check_tensor_output(logits)
            if not all_finite(logits):
                raise NonFiniteLogits
        except NonFiniteLogits:
            snapshot.restore()
            if policy == "raise":
                raise ValueError(
                    "the adapting forward gave NaN or Inf logits (e.g. inputs of extreme magnitude); nothing was "
                    "adapted. Rescale the input, or use on_bad_batch='skip' to predict such batches without "
                    "adapting"
                ) from None
            return self._skip(x, domain)
        except (RuntimeError, ValueError) as err:
            snapshot.restore()
            first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
            if x.dim() < self._max_rank and _is_rank_error(err):  # e.g. one image without its batch dimension
                raise ValueError(
                    f"the model could not process a batch of shape {tuple(x.shape)} (a batch is (N, ...): for a "
                    f"single sample add the batch dimension, x.unsqueeze(0)): {first_line}"
                ) from err
            if isinstance(err, ValueError) or isinstance(err, torch.OutOfMemoryError):
                raise
            if not x.is_floating_point() and "type" in str(err):  # integer ids are passed on as given
                raise ValueError(
                    f"the model does not take {x.dtype} inputs ({first_line}); convert images to floats first, "
                    "e.g. x.float() / 255 for 0-255 pixel values"
                ) from err
            if "channel" in str(err) or "size" in str(err) or "shape" in str(err):
                raise ValueError(
                    f"the model could not process a batch of shape {tuple(x.shape)}: {err}. "
                    "Check the channel count and image size the model expects."
                ) from err
            raise
        except BaseException:
            snapshot.restore()
            raise
        self.num_adapted += 1
        if self.method is not None and self.method.reset_requested:
            self._restore()  # model recovery (SAR); the method keeps its own state, as in the reference
        logits = logits[-n:] if logits.shape[0] != n else logits
        return logits.detach() if logits.requires_grad else logits

    def differentiable_forward(self, x: Tensor, domain: int | Tensor | None = None, *, adapt: bool = False) -> Tensor:
        """Logits of the adapting forward on ``x`` that keep their autograd graph (w.r.t. ``x`` and parameters).

        For attacks and for training heads through the wrapper: with ``adapt=False`` (default) the layers
        compute their statistics from ``x`` exactly as an adapting forward does, but nothing is committed (no
        EMA update, no method step, counters unchanged), from the current state: when a reset is due
        (``episodic``, ``reset_every``) the forward would reset first, so call :meth:`reset` to match it.  With
        ``adapt=True`` (statistics-only presets) the forward also adapts, as one transaction like
        :meth:`forward` (a reset that is due comes first).  Gradients flow only if autograd is enabled by the
        caller.  ``domain`` as in :meth:`forward`.  With ``window=W``, a batch smaller than W is normalised
        together with the window's samples, as :meth:`forward` does (gradients reach ``x`` only).
        """
        x = self._validate(x)
        self._check_domain(domain, x.shape[0])
        with self._lock:
            if not adapt:
                return _check_tensor_output(self._windowed_logits(x, domain))
            if self.method is not None:
                raise ValueError(
                    "differentiable_forward(adapt=True) needs a statistics-only preset: a gradient method's "
                    "step would change the parameters the returned graph depends on"
                )
            if self.window is not None:
                raise ValueError("differentiable_forward(adapt=True) does not support window=W")
            if not bool(torch.isfinite(x.detach()).all()):
                raise ValueError("the batch contains NaN or Inf values; nothing was adapted")
            reset_due = self._reset_due()
            snapshot = Snapshot(
                self, self._mutable_buffers, None, full=reset_due, owner_attributes=("num_adapted", "num_resets")
            )
            try:
                if reset_due:  # as forward() does: the adapting call starts from the source state
                    self.reset()
                with self.layer_frame(x.shape[0], domain=_option(domain)):
                    logits = _check_tensor_output(self.model(x))
                if not bool(torch.isfinite(logits.detach()).all()):
                    raise ValueError("the adapting forward gave NaN or Inf logits; nothing was adapted")
            except BaseException:
                snapshot.restore()
                raise
            self.num_adapted += 1
            self.num_batches += 1
            return logits

    def _windowed_logits(self, x: Tensor, domain: int | Tensor | None) -> Tensor:
        """The logits :meth:`forward` gives ``x`` (its window included), with their graph, committing nothing."""
        n = x.shape[0]
        if self.window is None or n >= self.window:
            with self.layer_frame(n, update_state=False, domain=_option(domain)):
                return self.model(x)
        if isinstance(domain, Tensor):
            raise ValueError("per-sample domain indices cannot be combined with window=W; pass an int domain")
        xw = self._with_window(x)
        if xw.shape[0] < 2:  # the forward predicts a lone first sample with the current state
            with layer_options(self._layers, use_batch=False, domain=_option(domain)):
                return self.model(xw)
        with self.layer_frame(xw.shape[0], update_state=False, domain=_option(domain)):
            return self.model(xw)[-n:]

    def extra_repr(self) -> str:
        method = self.method.name if self.method is not None else None
        return f"preset={self.preset_name or self.spec!r}, method={method}, episodic={self.episodic}"


def _check_tensor_output(logits: Any) -> Tensor:
    """``logits`` if the model returned a tensor; otherwise a ``TypeError`` saying how to wrap the model."""
    if not isinstance(logits, Tensor):
        raise TypeError(f"the model returned a {type(logits).__name__}, not a tensor of logits; wrap it in a module "
                        "that returns the (N, classes) logits")  # fmt: skip
    return logits


def _map_tensors(fn: Any, value: Any) -> Any:
    """``value`` with ``fn`` applied to every tensor in it (through dicts, lists and tuples)."""
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, dict):
        return type(value)((k, _map_tensors(fn, v)) for k, v in value.items())
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_map_tensors(fn, v) for v in value)
    return value


def _is_rank_error(err: BaseException) -> bool:
    """Whether ``err`` is a norm layer refusing an input of the wrong rank (torch's or :class:`AdaptiveNorm`'s)."""
    torch_rank_error = isinstance(err, ValueError) and re.match(r"expected \dD input", str(err)) is not None
    return isinstance(err, InputRankError) or torch_rank_error


_NO_FRAME = contextlib.nullcontext()  # domain=None sets no option: no frame (an enclosing block stays in charge)




def _option(domain: int | Tensor | None) -> Any:
    """``domain=None`` leaves an enclosing ``with_domain`` block in charge (the layers' default otherwise)."""
    return UNSET if domain is None else domain


def _check_policy(policy: str) -> BadBatchPolicy:
    if policy not in ("raise", "skip"):
        raise ValueError(f"on_bad_batch must be 'raise' or 'skip', got {policy!r}")
    return policy  # type: ignore[return-value]


def load_adapted_state(model: nn.Module, state: Mapping[str, Any] | str | os.PathLike) -> None:
    """Load the state dict of an adapted model (strict: the same architecture and spec-dependent tensors).

    The state must have been fitted on ``model``'s own weights: a tensor outside what adaptation and fitting
    learn (norm affine, TTN weights, SaBN heads, EMA state) that differs is a ``ValueError``, except in a file
    of a whole-network training (``sabn-train --train all``, which says so in its meta)."""
    if isinstance(state, (str, os.PathLike)):
        state = torch.load(state, map_location="cpu", weights_only=True)
    whole_network = False
    if isinstance(state, Mapping) and "state_dict" in state:  # a saved {"state_dict", "meta", ...}, read or not
        meta = state.get("meta")
        config = meta.get("config") if isinstance(meta, Mapping) else None
        whole_network = isinstance(config, Mapping) and config.get("train") == "all"  # (sabn-train --train all)
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(f"init_state must be a state dict (names to tensors), got {type(state).__name__}")
    misfit = None if whole_network else _other_weights(model, state)
    if misfit is not None:
        raise ValueError(f"init_state was fitted on another model: {misfit}")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(
            f"init_state does not fit the adapted model ({_describe_misfit(model, state, err)}); it must come from "
            "a model adapted with the same architecture and preset (e.g. saved by ttn-fit for the 'ttn' preset)"
        ) from None


def _other_weights(model: nn.Module, state: Mapping[str, Any]) -> str | None:
    """Where ``state`` holds other weights than ``model`` outside what adaptation and fitting learn (every tensor
    of an adaptive layer but its source statistics, the affine of LayerNorm/GroupNorm layers), or ``None``: a
    state fitted on another model (another checkpoint of the same architecture) would silently replace the
    model's weights."""
    learned: set[str] = set()
    for name, layer in model.named_modules(remove_duplicate=False):
        prefix = f"{name}." if name else ""
        if isinstance(layer, AdaptiveNorm):
            learned.update(prefix + k for k in (*layer._parameters, *layer._buffers) if not k.startswith("source_"))
        elif isinstance(layer, (nn.LayerNorm, nn.GroupNorm)):
            learned.update((prefix + "weight", prefix + "bias"))
    own = model.state_dict()
    differ = [k for k, mine in own.items() if k not in learned and isinstance(state.get(k), Tensor)
              and state[k].shape == mine.shape
              and not torch.equal(mine, state[k].to(device=mine.device, dtype=mine.dtype))]  # fmt: skip
    if not differ:
        return None  # (missing keys and shapes are load_state_dict's to report, after the layers' key migrations)
    return (f"{len(differ)} of its tensors outside the norm layers' learned ones differ from the model's (e.g. "
            f"{differ[0]!r}). Pass the model it was fitted on; a state trained with the whole network is taken "
            "from the file sabn-train saved, or load its weights into the model first")


def _describe_misfit(module: nn.Module, state: Any, err: Exception) -> str:
    """One line on why ``state`` did not load into ``module``: its key and shape differences, else the error's
    first line."""
    if isinstance(state, Mapping):
        found = state_dict_mismatch(module.state_dict(), state)
        if found:
            return found
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def state_dict_mismatch(expected: Mapping[str, Any], given: Mapping[str, Any]) -> str | None:
    """One line saying how ``given`` differs from a module's state dict ``expected`` (missing and unexpected
    keys, shape mismatches), or ``None``."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [k for k in expected if k in given and isinstance(given[k], Tensor)
              and tuple(given[k].shape) != tuple(expected[k].shape)]  # fmt: skip
    found = {"missing keys": missing, "unexpected keys": unexpected, "shape mismatches": shapes}
    parts = [f"{len(keys)} {what} (e.g. {keys[0]!r})" for what, keys in found.items() if keys]
    return ", ".join(parts) if parts else None


def _resolve_spec(preset: str | NormSpec | Preset) -> tuple[NormSpec, str]:
    if isinstance(preset, NormSpec):
        return preset, ""
    if isinstance(preset, Preset):
        return preset.spec, preset.name
    if isinstance(preset, str):
        p = get_preset(preset)
        return p.spec, p.name
    raise TypeError(f"preset must be a preset name, a NormSpec or a Preset, got {type(preset).__name__}")


def check_ambiguous_kwargs(method: str | None, kwargs: Iterable[str]) -> None:
    """Refuse, when a gradient ``method`` is given, a keyword that is both a NormSpec field and an optimiser
    setting (``momentum``, ``eps``): a :class:`TypeError` saying where each of the two belongs."""
    if method is None:
        return
    ambiguous = sorted(set(kwargs) & spec_fields() & optim_setting_names())
    if ambiguous:
        key = ambiguous[0]
        raise TypeError(
            f"{key}= is ambiguous with a gradient method: it is the NormSpec field (statistics {key}) and an "
            f"optimiser setting; pass the optimiser's in optim={{{key!r}: ...}} and the statistics' in the "
            f"preset (e.g. preset=tta_norm.get_preset('ema').spec.replace({key}=...))"
        )


def adapt(
    model: nn.Module,
    preset: str | NormSpec | Preset | None = None,
    method: str | None = None,
    *,
    inplace: bool = False,
    device: torch.device | str | None = None,
    episodic: bool = False,
    reset_every: int | None = None,
    on_bad_batch: BadBatchPolicy = "raise",
    window: int | None = None,
    init_state: Mapping[str, Any] | str | os.PathLike | None = None,
    **kwargs: Any,
) -> TTAModel:
    """Wrap ``model`` for test-time adaptation: ``tta = adapt(model, "medbn"); logits = tta(x)``.

    ``preset`` is a preset name (see :func:`tta_norm.presets`), a :class:`NormSpec` or a ``Preset``
    (default ``"tbn"``); ``method`` a gradient method name (``"tent"``, ``"eata"``, ``"sar"``) or ``None`` for
    statistics only.  A model without BatchNorm (LayerNorm / GroupNorm networks: ViT, ConvNeXt, ResNet-GN) is
    adapted by a gradient method alone, on its LayerNorm / GroupNorm affine parameters (``"source"`` alone
    wraps it unchanged); a statistics preset other than ``"source"`` on it is a ``ValueError`` (statistics
    presets need BatchNorm).  A model with both
    adapts both: BatchNorm statistics by the preset, every norm affine by the method.
    Keyword arguments that name :class:`NormSpec` fields override the preset (``alpha=0.2``,
    ``momentum=0.1``, ``num_domains=4``...); the others go to the method (``lr=1e-3``, ``steps=1``,
    ``optimizer="sgd"``, ``optim={"momentum": 0.9}``, ``fisher_data=...``).  With a method, a name that is
    both a NormSpec field and an optimiser setting (``momentum``, ``eps``) is rejected as ambiguous: the
    optimiser's goes in ``optim``, the statistics' in the preset.
    The given model is not modified (a deep copy is adapted) unless ``inplace=True``.
    The adapted model is put in ``eval()`` mode (dropout off); adaptive norm layers ignore the mode.
    ``init_state`` (a state dict of an adapted model, or a file saved with ``torch.save``) is loaded after the
    conversion and becomes the state ``reset()`` returns to: learned TTN weights, trained SaBN heads.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):  # (its layers cannot be replaced; it looked like a norm-free net)
        raise TypeError("model is a TorchScript module (torch.jit.script / trace), whose layers cannot be replaced: "
                        "adapt the eager model it was made from")  # fmt: skip
    if any(isinstance(m, (TTAModel, AdaptiveNorm)) for m in model.modules()):
        # (a model converted with inplace=True holds the first wrapper's layers: a second wrapper would run them,
        # with their spec and adapted state, under its own preset's name)
        raise ValueError("the model is already adapted (it holds a TTAModel or adaptive norm layers, e.g. from "
                         "adapt(..., inplace=True)): adapt the source model, once; reset() or load_state() change "
                         "how an adapted one runs")  # fmt: skip
    lazy = sorted({type(m).__name__ for m in model.modules()
                   if any(nn.parameter.is_lazy(t) for t in (*m._parameters.values(), *m._buffers.values()))})
    if lazy:  # (their shapes, and the norm layers' channel counts, are not known yet)
        raise ValueError(f"model {type(model).__name__} has uninitialised lazy modules {lazy}: run one forward on a "
                         "batch of the real input size before adapting it")  # fmt: skip
    has_batchnorm = bool(find_batchnorms(model))
    spec, name = _resolve_spec("tbn" if preset is None else preset)
    if not has_batchnorm and (method is not None or name == "source"):
        spec_kwargs = sorted(set(kwargs) & spec_fields())
        # any preset but source, also sabn (no batch statistics, but its heads live in BatchNorm layers)
        named = preset is not None and (spec.uses_batch or name not in (None, "", "source") or spec.num_domains > 1
                                        or spec.channelwise)  # (a NormSpec has no name: its fields decide)
        if named or spec_kwargs:
            raise ValueError(
                f"model {type(model).__name__} has no BatchNorm layer, and statistics presets need BatchNorm "
                f"(got preset {name or spec!r}{f' and {spec_kwargs}' if spec_kwargs else ''}); leave the preset "
                f"out (or pass 'source') and a gradient method (method='tent', 'eata' or 'sar') adapts its "
                "LayerNorm/GroupNorm affine parameters"
            )
        spec, name = get_preset("source").spec, "source"
    elif not has_batchnorm:
        kinds = sorted({type(m).__name__ for m in model.modules() if "Norm" in type(m).__name__})
        if not kinds:
            hint = "it has no norm layer at all, so there is nothing to adapt"
        elif any("Frozen" in k for k in kinds):
            hint = (f"it has {kinds}: frozen BatchNorms keep fixed statistics; teach the converter the layer with "
                    "tta_norm.norm.register_norm_converter, or build the model with ordinary BatchNorm")
        else:
            hint = (f"it has {kinds}; a gradient method (method='tent', 'eata' or 'sar') adapts LayerNorm/GroupNorm "
                    "affine parameters")
        raise ValueError(f"model {type(model).__name__} has no BatchNorm layer, and statistics presets need "
                         f"BatchNorm: {hint}")  # fmt: skip
    check_ambiguous_kwargs(method, kwargs)
    spec_overrides = {k: v for k, v in kwargs.items() if k in spec_fields()}
    method_kwargs = {k: v for k, v in kwargs.items() if k not in spec_fields()}
    if spec_overrides:
        spec = spec.replace(**spec_overrides)
        ignored = sorted(set(spec_overrides) & unused_fields(spec))
        if ignored:  # (they were accepted, and the wrapper computed exactly the plain preset)
            raise ValueError(f"{ignored} change(s) nothing in preset {name or spec!r} ({spec.estimator} statistics, "
                             f"{spec.mixing} mixing, instance {spec.instance}); drop them or pick a preset that "
                             "uses them")  # fmt: skip
    if method_kwargs and method is None:
        raise TypeError(
            f"unknown keyword argument(s) {sorted(method_kwargs)}: not NormSpec fields, and no method was given"
        )
    method_cls = get_method_class(method) if method is not None else None
    if spec.channelwise and init_state is None:
        warnings.warn(
            f"preset {name or 'channelwise'!r} without init_state: every channel mixes with alpha="
            f"{spec.fixed_alpha(1)} (a plain mixture, not TTN); fit the weights with `tta-norm ttn-fit` and pass "
            "init_state=<file>",
            UnfittedTTNWarning,
            stacklevel=2,
        )
    if device is not None:
        device = available_device(device)
    target = model if inplace else copy.deepcopy(model)
    undo = _undone_on_error(target, values=init_state is not None) if inplace else contextlib.nullcontext()
    with undo:  # a refused call leaves the caller's model as it was
        if device is not None:
            target = target.to(device)
        convert_batchnorms(target, spec, allow_none=not has_batchnorm)
        if init_state is not None:
            load_adapted_state(target, init_state)
        target.eval()
        if method_cls is None:
            target.requires_grad_(False)
            method_obj = None
        else:
            try:
                method_obj = method_cls(target, **method_kwargs)
            except TypeError as err:
                raise TypeError(f"method {method!r}: {err}") from err
        return TTAModel(
            target,
            spec,
            method_obj,
            preset_name=name,
            episodic=episodic,
            reset_every=reset_every,
            on_bad_batch=on_bad_batch,
            window=window,
        )


@contextlib.contextmanager
def _undone_on_error(model: nn.Module, *, values: bool = False) -> Iterator[None]:
    """Undo, if the block raises, what ``adapt(..., inplace=True)`` does to ``model``: replaced submodules,
    moved parameters and buffers, train/eval flags and ``requires_grad``; with ``values`` also the values of
    every parameter and buffer (kept as copies: an ``init_state`` is loaded into them in place)."""
    modules = list(model.modules())
    saved = [(m, dict(m._modules), dict(m._parameters), dict(m._buffers), m.training) for m in modules]
    params = [(p, p.data, p.requires_grad) for p in model.parameters()]
    tensors = [t.data for t in (*model.parameters(), *model.buffers())] if values else []
    copies = [t.clone() for t in tensors]
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for t, kept in zip(tensors, copies, strict=True):
                t.copy_(kept)
        for m, children, parameters, buffers, training in saved:
            m._modules.clear()
            m._modules.update(children)
            m._parameters.clear()
            m._parameters.update(parameters)
            m._buffers.clear()
            m._buffers.update(buffers)
            m.training = training
        for p, data, requires_grad in params:
            p.data = data
            p.requires_grad_(requires_grad)
        raise
