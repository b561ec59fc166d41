"""``AdaptiveNorm``: one module that replaces ``nn.BatchNorm1d/2d/3d`` and ``nn.SyncBatchNorm`` at test time."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.graph import increment_version
from torch.nn.modules.batchnorm import _BatchNorm

from tta_norm import kernels
from tta_norm.norm.context import UNSET, _local, effective
from tta_norm.norm.functional import (
    SINGLE_VALUE_HINT,
    batch_norm_eval,
    estimate,
    layer_statistics,
    median_batch_norm,
    normalize,
)
from tta_norm.norm.spec import NormSpec
from tta_norm.stats.estimators import Stats, count_per_channel

_EMA = kernels.RULE_CODES["ema"]
_LINEAR_OR_MIXTURE = (kernels.RULE_CODES["linear"], kernels.RULE_CODES["mixture"])

_EXPECTED_DIMS: dict[type, tuple[int, ...]] = {
    nn.BatchNorm1d: (2, 3),
    nn.BatchNorm2d: (4,),
    nn.BatchNorm3d: (5,),
}



class InputRankError(ValueError):
    """An adaptive norm layer got an input of a rank its BatchNorm does not take (e.g. an image without its
    batch dimension reaching a ``BatchNorm2d``)."""

_REDUCED = (torch.float16, torch.bfloat16)


class AdaptiveNorm(nn.Module):
    """A BatchNorm whose statistics come from a :class:`NormSpec` (test batch, source prior, EMA, median...).

    It keeps the source running statistics (buffers ``source_mean``, ``source_var``) and the source affine
    (``weight``, ``bias``), and adds, as the spec asks, an EMA state (``ema_mean``, ``ema_var``, RoTTA's RBN),
    a channel-wise test weight ``mix_weight`` (TTN; a parameter with ``requires_grad=False`` unless a fitting
    routine turns it on) and SaBN heads ``domain_weight``/``domain_bias`` of shape ``(K, C)``, initialised to
    the identity so that the layer equals the source BatchNorm until they are trained.

    **Its behaviour comes from its spec, never from ``train()``/``eval()``.**  Three options steer a forward
    pass.  Reading an attribute of the same name gives the value in effect in the calling thread; assigning it
    sets the layer's default.  Per call, options travel with the calling thread
    (:func:`tta_norm.norm.context.layer_options`, used by the wrapper in :mod:`tta_norm.api` and by the
    context managers of :mod:`tta_norm.norm.convert`), never as flags flipped on the shared layer:

    * ``update_state`` (default ``True``): whether an EMA state commits the batch's update;
    * ``use_batch`` (default ``True``): ``False`` normalises with the current state without looking at the
      batch (used to predict on a batch that must not adapt the model);
    * ``domain`` (default ``None``): SaBN head index, an ``int`` or a ``(N,)`` tensor of per-sample indices;
      ``None`` applies the shared affine only.

    Non-finite batch statistics never enter the EMA state (the old value is kept per channel).
    """

    is_norm_layer = True  # counted as a norm layer by tta_norm.training.param_groups

    def __init__(
        self,
        num_features: int,
        spec: NormSpec | None = None,
        *,
        eps: float = 1e-5,
        affine: bool = True,
        source_mean: Tensor | None = None,
        source_var: Tensor | None = None,
        expected_dims: tuple[int, ...] | None = None,
        name: str = "",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        spec = spec or NormSpec()
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.spec = spec
        self.eps = spec.eps if spec.eps is not None else eps
        if spec.uses_batch and not self.eps > 0:  # (torch's BatchNorm refuses it in training mode too)
            raise ValueError(f"{'layer ' + repr(name) + ': ' if name else ''}eps must be > 0 when the test batch "
                             f"enters the statistics (a constant channel would divide by 0), got {self.eps}; pass "
                             "eps=... to adapt()")  # fmt: skip
        self.expected_dims = expected_dims
        self.name = name
        self.update_state = True  # the defaults of the per-call options (properties below)
        self.use_batch = True
        plain = spec.instance == "none"
        self._plain_tbn = plain and spec.mixing == "test" and spec.estimator == "mean_var" and not spec.unbiased
        lower_median = spec.median == "lower"
        self._plain_medbn = plain and spec.mixing == "test" and spec.estimator == "median_msd" and lower_median
        self._plain_source = plain and spec.mixing == "source"
        self._plain_stateless = plain and spec.mixing != "ema"  # without the batch: the source statistics
        self._plain_ema = plain and spec.mixing == "ema"
        self._heads = spec.num_domains > 1
        # the compiled CPU kernel (tta_norm.kernels) covers every estimator x mixing x instance refinement
        self._fused = (
            (
                kernels.ESTIMATOR_CODES[spec.estimator],
                kernels.RULE_CODES[spec.mixing],
                kernels.INSTANCE_CODES[spec.instance],
                spec.iabn_k if spec.instance == "iabn" else spec.example_weight,
            )
            if not self._plain_source
            else None
        )
        self._kernel_args: kernels.Arguments | None = None  # the kernel's declared arguments (see _fused_forward)
        exact = spec.estimator in ("median_mad", "median_mad_normal") and spec.mixing == "test" and plain
        # (2, C) declaration of the statistics the kernel returns when ATen normalises (see _fused_forward)
        self._exact_stats = torch.empty(2, num_features, dtype=torch.float32) if exact else None
        # input ranks accepted without a closer look (the checks run in _check_input otherwise)
        self._dims = expected_dims if expected_dims is not None else tuple(range(2, 9))
        self.domain = None
        mean = source_mean if source_mean is not None else torch.zeros(num_features, **factory)
        var = source_var if source_var is not None else torch.ones(num_features, **factory)
        self.register_buffer("source_mean", mean.detach().clone())
        self.register_buffer("source_var", var.detach().clone())
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **factory))
            self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if spec.mixing == "ema":
            self.register_buffer("ema_mean", self.source_mean.clone())
            self.register_buffer("ema_var", self.source_var.clone())
        if spec.channelwise:
            init = spec.fixed_alpha(1)
            self.mix_weight = nn.Parameter(torch.full_like(self.source_mean, init), requires_grad=False)
        if spec.num_domains > 1:
            self.domain_weight = nn.Parameter(torch.ones(spec.num_domains, num_features, **factory))
            self.domain_bias = nn.Parameter(torch.zeros(spec.num_domains, num_features, **factory))

    @classmethod
    def from_batchnorm(cls, bn: _BatchNorm, spec: NormSpec, name: str = "") -> AdaptiveNorm:
        """Build from a (trained) BatchNorm: copies its running statistics, affine parameters and epsilon."""
        needs_source = spec.mixing != "test" or spec.instance != "none"
        if bn.running_mean is None and needs_source:
            raise ValueError(
                f"BatchNorm layer {name or bn!r} has no running statistics (track_running_stats=False), but "
                f"the spec (mixing={spec.mixing!r}, instance={spec.instance!r}) needs source statistics; "
                "use a test-statistics preset such as 'tbn' or 'medbn' (in eval mode torch normalises such a "
                "layer with its batch statistics too: for this model 'tbn' is what eval() computes there)"
            )
        ref = bn.weight if bn.weight is not None else bn.running_mean
        factory = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
        layer = cls(
            bn.num_features,
            spec,
            eps=bn.eps,
            affine=bn.affine,
            source_mean=bn.running_mean,
            source_var=bn.running_var,
            expected_dims=next((_EXPECTED_DIMS[c] for c in type(bn).__mro__ if c in _EXPECTED_DIMS), None),
            name=name,
            **factory,
        )
        if bn.affine:
            with torch.no_grad():
                layer.weight.copy_(bn.weight)
                layer.bias.copy_(bn.bias)
        return layer

    # -- per-call options (see tta_norm.norm.context) -----------------------------------------------------
    @property
    def update_state(self) -> bool:
        return effective(self, "update_state")

    @update_state.setter
    def update_state(self, value: bool) -> None:
        self.__dict__["_update_state_default"] = bool(value)

    @property
    def use_batch(self) -> bool:
        return effective(self, "use_batch")

    @use_batch.setter
    def use_batch(self, value: bool) -> None:
        self.__dict__["_use_batch_default"] = bool(value)

    @property
    def domain(self) -> int | Tensor | None:
        return effective(self, "domain")

    @domain.setter
    def domain(self, value: int | Tensor | None) -> None:
        self.__dict__["_domain_default"] = value

    def _options(self) -> tuple[bool, bool, int | Tensor | None]:
        """``(update_state, use_batch, domain)`` in effect for this forward in the calling thread."""
        d = self.__dict__
        frame = _local.frames.get(self)
        if frame is None:
            return d["_update_state_default"], d["_use_batch_default"], d["_domain_default"]
        u, b, k = frame.update_state, frame.use_batch, frame.domain
        return (
            d["_update_state_default"] if u is UNSET else u,
            d["_use_batch_default"] if b is UNSET else b,
            d["_domain_default"] if k is UNSET else k,
        )

    def _sample_count(self, x: Tensor) -> int:
        """Test samples in the batch (``n`` of pseudo-count mixing): the ``samples`` option the wrapper sets for
        the whole model, else the rows the layer sees (the same for convolutional BatchNorm; not for a
        BatchNorm1d over flattened tokens, whose rows are images x tokens)."""
        frame = _local.frames.get(self)
        n = UNSET if frame is None else frame.samples
        return int(x.shape[0]) if n is UNSET or n is None else int(n)

    def __setstate__(self, state: dict) -> None:
        for name in ("update_state", "use_batch", "domain"):  # pickles of layers that kept plain attributes
            if name in state:
                state[f"_{name}_default"] = state.pop(name)
        super().__setstate__(state)

    # -- state ---------------------------------------------------------------------------------------------
    def source_stats(self) -> Stats:
        return Stats(self.source_mean, self.source_var)

    def ema_state(self) -> Stats | None:
        return Stats(self.ema_mean, self.ema_var) if self.spec.mixing == "ema" else None

    def reset_state(self) -> None:
        """Return the EMA state (if any) to the source statistics."""
        if self.spec.mixing == "ema":
            with torch.no_grad():
                self.ema_mean.copy_(self.source_mean)
                self.ema_var.copy_(self.source_var)

    def _commit(self, new_state: Stats) -> None:
        """Store a new EMA state; channels whose new mean or variance is not finite keep their old values."""
        with torch.no_grad():
            mean, var = new_state.mean.detach(), new_state.var.detach()
            ok = torch.isfinite(mean + var)
            self.ema_mean.copy_(torch.where(ok, mean, self.ema_mean))
            self.ema_var.copy_(torch.where(ok, var, self.ema_var))

    def _ema_step_(self, batch: Stats) -> None:
        """In-place EMA update toward the batch statistics (equal to :func:`ema_update` + :meth:`_commit`)."""
        ok = torch.isfinite(batch.mean + batch.var)
        self.ema_mean.lerp_(torch.where(ok, batch.mean, self.ema_mean), self.spec.momentum)
        self.ema_var.lerp_(torch.where(ok, batch.var, self.ema_var), self.spec.momentum)

    # -- forward -------------------------------------------------------------------------------------------
    def _check_input(self, x: Tensor) -> None:
        label = f"adaptive norm layer {self.name!r}" if self.name else "adaptive norm layer"
        if x.dim() < 2 or (self.expected_dims is not None and x.dim() not in self.expected_dims):
            want = " or ".join(f"{d}-D" for d in self.expected_dims or (2,))
            raise InputRankError(f"{label} expects a {want} input (N, C, ...), got shape {tuple(x.shape)}")
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"{label} expects {self.num_features} channels (dim 1), got {x.shape[1]} "
                f"(input shape {tuple(x.shape)})"
            )
        if x.shape[0] == 0:
            raise ValueError(f"{label} got an empty batch")

    def _affine(self, batch_size: int, domain: int | Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """The composed SaBN affine ``g_k * (g * x_hat + b) + b_k`` as one ``(weight, bias)`` pair."""
        weight, bias = self.weight, self.bias
        if domain is None or self.spec.num_domains == 1:
            return weight, bias
        if isinstance(domain, Tensor):
            check_domain(domain, self.spec.num_domains, batch_size)
            domain = domain.to(self.domain_weight.device, torch.long)
        elif not 0 <= int(domain) < self.spec.num_domains:
            raise ValueError(f"domain index {domain} out of range for {self.spec.num_domains} SaBN heads")
        g_k, b_k = self.domain_weight[domain], self.domain_bias[domain]
        shared_w = weight if weight is not None else torch.ones_like(b_k)
        shared_b = bias if bias is not None else torch.zeros_like(b_k)
        return g_k * shared_w, g_k * shared_b + b_k

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() not in self._dims or x.shape[1] != self.num_features or x.shape[0] == 0:
            self._check_input(x)
        stat_dtype = self._buffers["source_mean"].dtype
        if x.dtype != stat_dtype and x.dtype in _REDUCED and stat_dtype not in _REDUCED:
            # a reduced-precision activation (autocast) with float statistics: estimate, mix and normalise in
            # the statistics' precision and hand back the activation's dtype, as BatchNorm's mixed-dtype path
            # does (statistics of bfloat16 values summed in bfloat16 lose most of their digits)
            return self.forward(x.to(stat_dtype)).to(x.dtype)
        update_state, use_batch, domain = self._options()
        if self._fused is not None and x.is_cpu and use_batch and (domain is None or not self._heads):
            out = self._fused_forward(x, update_state)
            if out is not None:
                return out
        weight, bias = self._parameters["weight"], self._parameters["bias"]  # (faster than __getattr__)
        if self._heads and domain is not None:
            weight, bias = self._affine(x.shape[0], domain)
        if weight is None or weight.dim() == 1:  # per-channel affine: fused ATen calls where they are exact
            out = self._fast_forward(x, weight, bias, update_state, use_batch)
            if out is not None:
                return out
        stats, new_state = layer_statistics(
            x,
            self.spec,
            self.source_stats(),
            ema_state=self.ema_state(),
            mix_weight=getattr(self, "mix_weight", None),
            use_batch=use_batch,
            samples=self._sample_count(x) if self.spec.pseudo_count is not None else None,
            eps=self.eps,
        )
        if new_state is not None and update_state:
            self._commit(new_state)
        if use_batch and not self._plain_source and self.spec.mixing != "ema":
            # a variance beyond float32 range normalises to NaN, as on the kernel path, not to a constant
            # channel (1 / sqrt(inf) = 0): the wrapper then refuses the batch instead of adapting on it
            stats = Stats(stats.mean, stats.var.masked_fill(stats.var.isinf(), float("nan")))
        return normalize(x, stats, weight, bias, self.eps)

    def _fast_forward(
        self, x: Tensor, weight: Tensor | None, bias: Tensor | None, update_state: bool, use_batch: bool
    ) -> Tensor | None:
        """The common plain presets in as few kernel calls as possible (per-layer op overhead dominates small
        batches on CPU); ``None`` when the general path must run.  Each branch equals the general path (MedBN's
        input-gradient branch up to float rounding: a closed-form backward instead of autograd's)."""
        if self._plain_source or (self._plain_stateless and not use_batch):
            buffers = self._buffers
            return batch_norm_eval(x, buffers["source_mean"], buffers["source_var"], weight, bias, self.eps)
        if not use_batch:
            return None
        if self._plain_tbn:
            if count_per_channel(x) < 2:
                raise ValueError(SINGLE_VALUE_HINT)
            if x.shape[0] == 1 and x.dim() > 2:
                # one sample: its batch statistics are its instance statistics, i.e. group norm with one
                # channel per group (one fused kernel, and a fused backward)
                return F.group_norm(x, x.shape[1], weight, bias, self.eps)
            if x.device.type != "cpu" or _needs_grad(x, weight) or not x.is_contiguous():
                # fused statistics + normalisation (and its fused backward); also for a channels_last input,
                # which the compiled kernel does not take and ATen's batch norm reads in place
                return F.batch_norm(x, None, None, weight, bias, True, 0.0, self.eps)
        if self._plain_medbn and x.requires_grad and torch.is_grad_enabled() and x.dtype in _CLOSED_FORM_DTYPES:
            frozen = not ((weight is not None and weight.requires_grad) or (bias is not None and bias.requires_grad))
            if frozen and count_per_channel(x) > 1:
                # differentiated w.r.t. the input only (an attacker, a saliency map): the closed-form backward.
                # While a gradient method adapts the affine, the general path keeps the reference arithmetic.
                return median_batch_norm(x, weight, bias, self.eps)
        if self._plain_ema and update_state and not _needs_grad(x, weight):
            # no autograd: update the state in place and normalise with the buffers (fewer small ops)
            self._ema_step_(estimate(x, self.spec))
            return batch_norm_eval(x, self.ema_mean, self.ema_var, weight, bias, self.eps)
        return None

    def _fused_forward(self, x: Tensor, update_state: bool) -> Tensor | None:
        """Estimate + mix + commit + normalise in one call of the compiled CPU kernel (:mod:`tta_norm.kernels`);
        ``None`` when it does not apply (gradients needed, not float32, kernel unavailable...): the general
        path then gives the same numbers.  This is the hot path of every small-batch forward, so it reads
        parameters and buffers from ``_parameters``/``_buffers`` (``nn.Module.__getattr__`` costs ~0.7 us per
        lookup) and calls :func:`tta_norm.kernels.launch` after checking only what can differ from the
        layer's own invariants."""
        lib = kernels.kernel()
        if lib is None or x.dtype is not torch.float32 or not x.is_contiguous():
            return None
        params, buffers, spec = self._parameters, self._buffers, self.spec
        weight, bias = params["weight"], params["bias"]
        source_mean = buffers["source_mean"]
        if source_mean.dtype is not torch.float32 or not source_mean.is_cpu:
            return None  # a layer moved to another dtype/device than its input: the general path says so
        if torch.is_grad_enabled() and (
            x.requires_grad
            or (weight is not None and weight.requires_grad)
            or (bias is not None and bias.requires_grad)
            or (spec.channelwise and params["mix_weight"].requires_grad)
        ):
            return None
        if count_per_channel(x) < 2:
            if spec.batch_only:
                raise ValueError(SINGLE_VALUE_HINT)
            if spec.unbiased:
                return None  # the general path raises its error
        estimator, rule, instance, instance_param = self._fused
        alpha_t, alpha = None, 0.0
        if rule == _EMA:
            ref_mean, ref_var, alpha = buffers["ema_mean"], buffers["ema_var"], spec.momentum
        else:
            ref_mean, ref_var = source_mean, buffers["source_var"]
            if spec.channelwise:
                alpha_t = params["mix_weight"]
            elif rule in _LINEAR_OR_MIXTURE:
                alpha = spec.fixed_alpha(self._sample_count(x) if spec.pseudo_count is not None else x.shape[0])
        stats_decl = self._exact_stats
        args = self._kernel_args
        if args is None or args.ptrs != (
            None if alpha_t is None else alpha_t.data_ptr(),
            ref_mean.data_ptr(),
            ref_var.data_ptr(),
            None if weight is None else weight.data_ptr(),
            None if bias is None else bias.data_ptr(),
            None if stats_decl is None else stats_decl.data_ptr(),
        ):  # a new layout (first call, a tensor replaced or moved): declare it to the kernel again
            tensors = (alpha_t, ref_mean, ref_var, weight, bias, stats_decl)
            args = self._kernel_args = kernels.Arguments(tensors, self.num_features)
        if not args.ok:
            return None  # a tensor of another size, dtype or layout: the general path says what is wrong
        commit = rule == _EMA and update_state
        if commit:  # the kernel writes the state through raw pointers: keep autograd's version check honest
            increment_version(ref_mean)
            increment_version(ref_var)
        if stats_decl is not None:
            # MAD statistics are exact order statistics, equal to the ATen path's bit for bit; normalising
            # with ATen's own formula keeps the outputs equal too (a MAD near 0 scales by up to 1/sqrt(eps),
            # which would amplify a 1-ulp difference of another formula layer after layer)
            stats = torch.empty_like(stats_decl)
            kernels.launch(
                lib, x, estimator, rule, args, alpha, commit, self.eps, spec.unbiased, spec.median == "average",
                instance, instance_param, stats,
            )  # fmt: skip
            return batch_norm_eval(x, stats[0], stats[1], weight, bias, self.eps)
        return kernels.launch(
            lib, x, estimator, rule, args, alpha, commit, self.eps, spec.unbiased, spec.median == "average",
            instance, instance_param,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, spec={self.spec}"


def check_domain(domain: int | Tensor, num_domains: int, batch_size: int | None = None) -> None:
    """``ValueError`` unless ``domain`` is a head index in ``[0, num_domains)``, or a ``(batch_size,)`` integer
    tensor of such indices."""
    if isinstance(domain, Tensor):
        if domain.is_floating_point() or domain.is_complex() or domain.dtype is torch.bool:
            raise ValueError(f"per-sample domain indices must be an integer tensor, got dtype {domain.dtype}")
        if batch_size is not None and domain.shape != (batch_size,):
            raise ValueError(f"per-sample domain indices must have shape ({batch_size},), got {tuple(domain.shape)}")
        if domain.numel() and not (0 <= int(domain.min()) and int(domain.max()) < num_domains):
            raise ValueError(
                f"per-sample domain indices must be in [0, {num_domains}) for {num_domains} SaBN heads, got "
                f"values in [{int(domain.min())}, {int(domain.max())}]"
            )
        return
    if isinstance(domain, bool) or not isinstance(domain, int):
        raise ValueError(f"domain must be an int head index or a tensor of indices, got {type(domain).__name__}")
    if not 0 <= domain < num_domains:
        raise ValueError(f"domain index {domain} out of range for {num_domains} SaBN heads (0..{num_domains - 1})")


#: input dtypes of MedBN's closed-form input-gradient path (others take the general autograd path)
_CLOSED_FORM_DTYPES = (torch.float32, torch.float64)


def _needs_grad(x: Tensor, weight: Tensor | None) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad))


def adaptive_layers(model: nn.Module) -> Iterator[tuple[str, AdaptiveNorm]]:
    """The ``(name, layer)`` pairs of every :class:`AdaptiveNorm` in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, AdaptiveNorm):
            yield name, module
