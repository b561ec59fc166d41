"""TTN post-training: learn the channel-wise test weights of the ``ttn`` preset on labelled source data.

TTN (Lim, Kim, Choo, Choi -- "TTN: A Domain-Shift Aware Batch Normalization in Test-Time Adaptation", ICLR 2023)
normalises with the mixture of the test-batch and source statistics, with a weight ``a`` per channel of every BN
layer (``AdaptiveNorm.mix_weight``; ``a = 1`` is TBN, ``a = 0`` the source model), learned after pre-training
and fixed at test time.  **No official code exists; the details below are our choices** (see
``REFERENCE.md`` part 2, sections 2 and 8.5):

1. **Prior** (domain-shift sensitivity, :func:`shift_sensitivity_prior`).  For ``B`` source batches, take the
   gradients of the cross-entropy with respect to every BN ``gamma`` and ``beta`` on the clean batch and on a
   shifted copy of it (one random domain of :class:`~tta_norm.fitting.augment.ShiftAugment` per batch),
   computed with the source statistics (``prior_stats="source"``, the pre-trained model as it is; ``"batch"``
   uses the batch statistics).  Per channel, stack the ``B`` per-batch gradients into vectors ``g`` (clean)
   and ``g'`` (shifted) and score ``d = (dist(g_gamma, g'_gamma) + dist(g_beta, g'_beta)) / 2`` with
   ``dist = 1 - cos`` (default, in [0, 2]; two zero vectors have distance 0, one zero vector distance 1)
   or the alternative ``dist = |g - g'| / (|g| + |g'|)`` (``distance="l2"``, in [0, 1]).  The prior ``A`` is
   ``d`` min-max normalised to [0, 1] over all channels of the model (``normalize="model"``, default) or
   within each layer (``normalize="layer"``); constant scores map to 0.5.  A large score (the gradient
   direction changes under shift) means the channel is shift-sensitive and gets a large weight on the test
   statistics.
2. **Fit** (:func:`fit_ttn`).  Freeze everything but ``a``, initialise ``a <- A`` and minimise
   ``CE(model(x_shifted), y) + lam * mean_c (a_c - A_c)^2`` (the mean runs over all channels of all layers) with
   Adam; ``a`` is projected onto [0, 1] after every step (the layer also clamps in its forward).  Each step
   draws ``batch_size`` source images and one shift domain for them (left clean with probability
   ``clean_prob``), and, because the learned ``a`` must serve every test batch size, normalises them in
   groups of a test batch size drawn from ``fit_batch_sizes`` (each group is one forward pass; every size
   divides ``batch_size``).  The epoch's partial last batch draws among the sizes that divide its length, and
   is left out of the epoch when none does.  The
   third-party batch-size rescaling ``a_B = 1 - 16 (1 - a) / sqrt(B)`` is *not* used (unconfirmed).

The result is the state dict of the ``ttn``-adapted model; load it with
``tta_norm.adapt(model, "ttn", init_state=path)`` (it composes with gradient methods: ``method="tent"``
updates gamma/beta and leaves ``a`` fixed).
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tta_norm._files import write_atomically
from tta_norm._numbers import finite_number
from tta_norm.device import resolve_device
from tta_norm.fitting._data import ImageArray, as_image_tensor, as_labels, to_model_input
from tta_norm.fitting.augment import SHIFT_OPS, ShiftAugment
from tta_norm.norm.adaptive import AdaptiveNorm
from tta_norm.presets import UnfittedTTNWarning
from tta_norm.training import fit

Distance = Literal["cosine", "l2"]
ShiftFn = Callable[[Tensor, torch.Generator], Tensor]
Normalization = Literal["model", "layer"]


#: The version of the fit's arithmetic: cached fits and benchmark cells of another version are not reused.
#: 2: the clamp of the weights passes the gradient through (a channel on the boundary moves again).
#: 3: inside (0, 1) that gradient is the identity too (version 2 doubled it there, halving the prior's lambda).
#: 4: no group of a size outside ``fit_batch_sizes`` (a partial batch was split by the drawn size, a larger size
#: capped at the batch), and by default only the sizes that divide ``batch_size``.
FIT_VERSION = 4

#: The test batch sizes the fit simulates by default (those that divide ``batch_size``): the paper's small test
#: batch sizes up to the default ``batch_size`` (it reports 200, 64, 16, 4, 2 and 1; REFERENCE.md part 2).
DEFAULT_FIT_BATCH_SIZES: tuple[int, ...] = (1, 4, 16, 64)


@dataclass
class TTNConfig:
    """Hyper-parameters of the TTN post-training (our choices; the paper's are unverified).

    ``fit_batch_sizes``: the test batch sizes the fit normalises its groups of images with, each a divisor of
    ``batch_size`` (the images of one step); ``None``: those of :data:`DEFAULT_FIT_BATCH_SIZES` (1, 4, 16, 64:
    the paper's test batch sizes up to the default ``batch_size`` 64, REFERENCE.md part 2) that divide
    ``batch_size``, read from :attr:`group_sizes`."""

    prior_batches: int = 32
    prior_batch_size: int = 64
    prior_stats: Literal["source", "batch"] = "source"
    distance: Distance = "cosine"
    normalize: Normalization = "model"
    epochs: int = 2
    batch_size: int = 64
    fit_batch_sizes: tuple[int, ...] | None = None
    lr: float = 0.02
    lam: float = 1.0
    clean_prob: float = 0.25
    init: Literal["prior", "preset"] = "prior"
    ops: tuple[str, ...] = SHIFT_OPS
    seed: int = 0

    def __post_init__(self) -> None:
        if self.fit_batch_sizes is not None:
            self.fit_batch_sizes = tuple(int(b) for b in self.fit_batch_sizes)
        self.ops = tuple(self.ops)
        if self.distance not in ("cosine", "l2"):
            raise ValueError(f"distance must be 'cosine' or 'l2', got {self.distance!r}")
        if self.normalize not in ("model", "layer"):
            raise ValueError(f"normalize must be 'model' or 'layer', got {self.normalize!r}")
        if self.prior_stats not in ("source", "batch"):
            raise ValueError(f"prior_stats must be 'source' or 'batch', got {self.prior_stats!r}")
        if self.init not in ("prior", "preset"):
            raise ValueError(f"init must be 'prior' or 'preset', got {self.init!r}")
        if self.prior_batches < 2:
            raise ValueError("prior_batches must be >= 2 (the cosine is taken over batches)")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1 (passes of the fit over the images), got {self.epochs}")
        if self.batch_size < 1 or self.prior_batch_size < 1:
            raise ValueError(f"batch sizes must be >= 1, got {self.batch_size} and {self.prior_batch_size}")
        if self.fit_batch_sizes is not None:
            if not self.fit_batch_sizes or min(self.fit_batch_sizes) < 1:
                raise ValueError(f"fit_batch_sizes must be positive, got {self.fit_batch_sizes}")
            if max(self.fit_batch_sizes) > self.batch_size:
                raise ValueError(f"fit_batch_sizes has {max(self.fit_batch_sizes)} > batch_size {self.batch_size} "
                                 "(a group is part of a step's images); raise batch_size or drop the size")  # fmt: skip
            odd = [b for b in self.fit_batch_sizes if self.batch_size % b]
            if odd:
                raise ValueError(f"batch_size {self.batch_size} is not a multiple of fit batch size {odd[0]} (a "
                                 "step's images are normalised in groups of that size)")  # fmt: skip
        for name in ("lam", "lr", "clean_prob"):
            finite_number(name, getattr(self, name))
        if self.lam < 0 or self.lr <= 0 or not 0 <= self.clean_prob <= 1:
            raise ValueError("need lam >= 0, lr > 0 and clean_prob in [0, 1]")
        ShiftAugment(ops=self.ops)

    @property
    def group_sizes(self) -> tuple[int, ...]:
        """The test batch sizes the fit draws from: ``fit_batch_sizes``, or its default for ``batch_size``."""
        if self.fit_batch_sizes is not None:
            return self.fit_batch_sizes
        return tuple(b for b in DEFAULT_FIT_BATCH_SIZES if self.batch_size % b == 0)

    def check_images(self, n: int) -> None:
        """A one-line ``ValueError`` unless ``n`` source images give the fit a step in every epoch."""
        if n < 1:
            raise ValueError(f"no source images to fit TTN on ({n} given; n_images must be >= 1)")
        if n < self.batch_size and not _sizes_for(n, self.group_sizes):
            raise ValueError(f"{n} images make no step: fewer than batch_size {self.batch_size} and no fit batch "
                             f"size of {self.group_sizes} divides {n}")  # fmt: skip


# ------------------------------------------------------------------------------------------------- the prior


def gradient_distance(clean: Tensor, shifted: Tensor, distance: Distance = "cosine", eps: float = 1e-20) -> Tensor:
    """Per-channel distance between gradient vectors stacked over batches: inputs ``(B, C)``, output ``(C,)``.

    ``"cosine"``: ``1 - cos(g, g')`` in [0, 2] (two zero vectors -> 0, one zero vector -> 1).
    ``"l2"``: ``|g - g'| / (|g| + |g'|)`` in [0, 1] (two zero vectors -> 0).
    """
    if clean.shape != shifted.shape or clean.dim() != 2:
        raise ValueError(f"expected two (B, C) tensors, got {tuple(clean.shape)} and {tuple(shifted.shape)}")
    clean, shifted = clean.double(), shifted.double()
    nc, ns = clean.norm(dim=0), shifted.norm(dim=0)
    both_zero = (nc <= eps) & (ns <= eps)
    if distance == "cosine":
        cos = (clean * shifted).sum(0) / (nc * ns).clamp_min(eps)
        d = 1.0 - cos.clamp(-1.0, 1.0)
    elif distance == "l2":
        d = (clean - shifted).norm(dim=0) / (nc + ns).clamp_min(eps)
    else:
        raise ValueError(f"unknown distance {distance!r}; choose 'cosine' or 'l2'")
    return torch.where(both_zero, torch.zeros_like(d), d).float()


def normalize_scores(scores: dict[str, Tensor], mode: Normalization = "model") -> dict[str, Tensor]:
    """Min-max normalise per-channel scores to [0, 1] over the whole model or within each layer (constant
    scores map to 0.5)."""

    def minmax(t: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        if float(hi - lo) <= 1e-12:
            return torch.full_like(t, 0.5)
        return ((t - lo) / (hi - lo)).clamp(0.0, 1.0)

    if mode == "layer":
        return {k: minmax(v, v.min(), v.max()) for k, v in scores.items()}
    if mode != "model":
        raise ValueError(f"normalize must be 'model' or 'layer', got {mode!r}")
    allv = torch.cat([v.flatten() for v in scores.values()])
    lo, hi = allv.min(), allv.max()
    return {k: minmax(v, lo, hi) for k, v in scores.items()}


def ttn_layers(model: nn.Module) -> list[tuple[str, AdaptiveNorm]]:
    """The adaptive norm layers of a ``ttn``-adapted model (channel-wise ``mix_weight``); clear errors otherwise."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, AdaptiveNorm)]
    if not layers:
        raise ValueError("the model has no AdaptiveNorm layers; adapt it with the 'ttn' preset first")
    bad = [n for n, m in layers if not hasattr(m, "mix_weight")]
    if bad:
        raise ValueError(f"layers {bad[:3]} have no channel-wise mix_weight: use the 'ttn' preset (channelwise=True)")
    return layers


def _affine_params(layers: list[tuple[str, AdaptiveNorm]]) -> list[Tensor]:
    params = []
    for name, layer in layers:
        if layer.weight is None or layer.bias is None:
            raise ValueError(f"TTN's prior needs the BN affine parameters, but layer {name!r} has affine=False")
        params += [layer.weight, layer.bias]
    return params


def affine_gradients(model: nn.Module, layers: list[tuple[str, AdaptiveNorm]], x: Tensor, y: Tensor) -> list[Tensor]:
    """Gradients of the mean cross-entropy on ``(x, y)`` w.r.t. ``[gamma_1, beta_1, gamma_2, ...]``.

    Leaves the parameters' ``requires_grad`` flags and ``.grad`` as they were."""
    params = _affine_params(layers)
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(model(x), y)
            grads = torch.autograd.grad(loss, params)
    finally:
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)
    return [g.detach() for g in grads]


@dataclass
class TTNPrior:
    """Raw per-channel sensitivity scores and the normalised prior ``A`` in [0, 1], keyed by layer name."""

    scores: dict[str, Tensor]
    prior: dict[str, Tensor]
    distance: str
    normalize: str


def _set_mix(layers: list[tuple[str, AdaptiveNorm]], values: dict[str, Tensor] | float) -> None:
    with torch.no_grad():
        for name, layer in layers:
            if isinstance(values, dict):
                layer.mix_weight.copy_(values[name])
            else:
                layer.mix_weight.fill_(values)


def shift_sensitivity_prior(
    model: nn.Module,
    images: ImageArray,
    labels: Tensor | Sequence[int],
    *,
    config: TTNConfig | None = None,
    device: torch.device | str | None = None,
    shift: ShiftFn | None = None,
    progress: bool = False,
) -> TTNPrior:
    """TTN's prior from the gradient distance of the BN affine parameters on clean vs shifted source batches.

    ``model`` is a ``ttn``-adapted model (its ``mix_weight`` values are restored afterwards).  Batch ``b`` is
    the slice ``[b * s, (b + 1) * s) mod n`` of ``torch.randperm(n, generator=Generator().manual_seed(seed))``
    with ``s = config.prior_batch_size`` (a fresh draw from the same generator if the slice runs short).  Its
    shifted copy is ``shift(x, generator)`` (default: a random :class:`ShiftAugment` domain of
    ``config.ops``).  See the module docstring for the formula.
    """
    from tqdm.auto import tqdm

    config = config or TTNConfig()
    device = resolve_device(device, model)
    images = as_image_tensor(images)
    y_all = as_labels(labels, len(images))
    if len(images) < 1:
        raise ValueError("TTN's prior is taken on labelled source images; got 0")
    layers = ttn_layers(model)
    gen = torch.Generator().manual_seed(config.seed)
    aug = ShiftAugment(ops=config.ops)
    saved = {n: layer.mix_weight.detach().clone() for n, layer in layers}
    _set_mix(layers, 0.0 if config.prior_stats == "source" else 1.0)
    clean_g: list[list[Tensor]] = []
    shift_g: list[list[Tensor]] = []
    try:
        order = torch.randperm(len(images), generator=gen)
        for b in tqdm(range(config.prior_batches), desc="ttn prior", disable=not progress):
            lo = (b * config.prior_batch_size) % len(images)
            idx = order[lo : lo + config.prior_batch_size]
            if len(idx) < min(config.prior_batch_size, len(images)):
                idx = torch.randperm(len(images), generator=gen)[: config.prior_batch_size]
            x = to_model_input(images[idx], device)
            y = y_all[idx].to(device)
            xs = shift(x, gen) if shift is not None else aug(x, gen)
            clean_g.append(affine_gradients(model, layers, x, y))
            shift_g.append(affine_gradients(model, layers, xs, y))
    finally:
        _set_mix(layers, saved)
    scores = {}
    for i, (name, _) in enumerate(layers):
        d_gamma = gradient_distance(
            torch.stack([g[2 * i] for g in clean_g]), torch.stack([g[2 * i] for g in shift_g]), config.distance
        )
        d_beta = gradient_distance(
            torch.stack([g[2 * i + 1] for g in clean_g]), torch.stack([g[2 * i + 1] for g in shift_g]), config.distance
        )
        scores[name] = (0.5 * (d_gamma + d_beta)).cpu()
    prior = normalize_scores(scores, config.normalize)
    return TTNPrior(scores, prior, config.distance, config.normalize)


# --------------------------------------------------------------------------------------------------- the fit


@dataclass
class TTNResult:
    """What :func:`fit_ttn` returns: the adapted model's state dict (CPU), the prior and the learned weights."""

    state_dict: dict[str, Tensor]
    prior: TTNPrior
    alpha: dict[str, Tensor]
    config: TTNConfig
    history: list[dict[str, float]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``{"state_dict", "meta", "ttn"}`` with ``torch.save`` (atomically); loadable by
        ``tta_norm.adapt(model, "ttn", init_state=path)``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "state_dict": self.state_dict,
            "meta": {
                **self.meta,
                "config": {**dataclasses.asdict(self.config), "fit_batch_sizes": self.config.group_sizes},
                "history": self.history,
            },
            "ttn": {
                "prior": self.prior.prior,
                "scores": self.prior.scores,
                "alpha": self.alpha,
                "distance": self.prior.distance,
                "normalize": self.prior.normalize,
            },
        }
        return write_atomically(path, lambda tmp: torch.save(payload, tmp))


def load_ttn(path: str | os.PathLike) -> dict[str, Any]:
    """The payload written by :meth:`TTNResult.save` (``state_dict``, ``meta``, ``ttn``)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def mix_weight_vector(model: nn.Module) -> Tensor:
    """All channel-wise weights of a ``ttn``-adapted model, concatenated in module order."""
    return torch.cat([layer.mix_weight.detach().flatten() for _, layer in ttn_layers(model)])


def _groups(n: int, size: int) -> list[slice]:
    return [slice(i, i + size) for i in range(0, n, size)]


def _sizes_for(n: int, sizes: tuple[int, ...]) -> tuple[int, ...]:
    """The sizes that cut a batch of ``n`` images into whole groups."""
    return tuple(b for b in sizes if n % b == 0)


def fit_mix_weights(
    model: nn.Module,
    images: ImageArray,
    labels: Tensor | Sequence[int],
    prior: dict[str, Tensor],
    *,
    config: TTNConfig | None = None,
    device: torch.device | str | None = None,
    shift: ShiftFn | None = None,
    progress: bool = False,
) -> list[dict[str, float]]:
    """Optimise the ``mix_weight`` of a ``ttn``-adapted ``model`` in place (step 2 of the module docstring).

    Every other parameter is frozen during the fit; ``requires_grad`` flags are restored afterwards.  ``shift``
    replaces the random shift domains (it is then applied to every batch, ``clean_prob`` unused).  Returns the
    per-epoch history (mean CE, mean prior MSE, mean ``a``).  A batch is normalised in groups of one size of
    ``config.group_sizes`` drawn among those that divide it: a partial last batch without one is left out."""

    config = config or TTNConfig()
    device = resolve_device(device, model)
    images = as_image_tensor(images)
    y_all = as_labels(labels, len(images))
    config.check_images(len(images))
    layers = ttn_layers(model)
    weights = [layer.mix_weight for _, layer in layers]
    target = torch.cat([prior[name].to(device).flatten() for name, _ in layers])
    flags = {id(p): p.requires_grad for p in model.parameters()}
    gen = torch.Generator().manual_seed(config.seed + 1)
    aug = ShiftAugment(ops=config.ops)

    def loss_fn(idx: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        x = to_model_input(images[idx], device)
        x = shift(x, gen) if shift is not None else aug(x, gen, clean_prob=config.clean_prob)
        y = y_all[idx].to(device)
        sizes = _sizes_for(len(idx), config.group_sizes)
        b = sizes[int(torch.randint(len(sizes), (), generator=gen))]
        logits = torch.cat([model(x[s]) for s in _groups(len(idx), b)])
        ce = F.cross_entropy(logits, y)
        mse = (torch.cat([w.flatten() for w in weights]) - target).square().mean()
        return ce + config.lam * mse, {"ce": ce.detach() * len(idx), "mse": mse.detach() * len(idx)}

    def clamp(step: int, loss: Tensor, sums: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for w in weights:
                w.clamp_(0.0, 1.0)

    def summary(record: dict) -> None:
        del record["train_loss"], record["time_s"]
        record["mean_alpha"] = float(mix_weight_vector(model).mean())

    try:
        model.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        opt = torch.optim.Adam(weights, lr=config.lr)
        remainder = len(images) % config.batch_size
        drop_last = remainder > 0 and not _sizes_for(remainder, config.group_sizes)
        history = fit(opt, loss_fn, n=len(images), batch_size=config.batch_size, epochs=config.epochs,
                      generator=gen, drop_last=drop_last, after_step=clamp, on_epoch_end=summary, progress=progress,
                      desc="ttn fit").history  # fmt: skip
    finally:
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
        for w in weights:
            w.grad = None
    return history


def fit_ttn(
    model: nn.Module,
    source_images: ImageArray,
    source_labels: Tensor | Sequence[int],
    *,
    config: TTNConfig | None = None,
    device: torch.device | str | None = None,
    shift: ShiftFn | None = None,
    progress: bool = True,
    **overrides: Any,
) -> TTNResult:
    """TTN post-training of a source model (with BatchNorms) on labelled source data.

    ``source_images``: uint8 NHWC (as the data readers return) or float NCHW in [0, 1]; ``source_labels``: class
    indices.  Keyword ``overrides`` replace :class:`TTNConfig` fields (``lam=0.5``, ``epochs=3``...).  ``shift``
    (``f(x, generator) -> x``) replaces the random shift domains.  The given model is not modified.  Returns a
    :class:`TTNResult`; ``result.save(path)`` writes a file for ``tta_norm.adapt(model, "ttn", init_state=path)``.
    """
    import tta_norm

    config = TTNConfig(**overrides) if config is None else dataclasses.replace(config, **overrides)
    config.check_images(len(source_images))
    device = resolve_device(device, model)
    t0 = time.perf_counter()
    with warnings.catch_warnings():  # the weights being fitted start unfitted, by definition
        warnings.simplefilter("ignore", UnfittedTTNWarning)
        tta = tta_norm.adapt(model, "ttn", device=device)
    net = tta.model
    layers = ttn_layers(net)
    prior = shift_sensitivity_prior(
        net, source_images, source_labels, config=config, device=device, shift=shift, progress=progress
    )
    if config.init == "prior":
        _set_mix(layers, {k: v.to(device) for k, v in prior.prior.items()})
    history = fit_mix_weights(
        net, source_images, source_labels, prior.prior, config=config, device=device, shift=shift, progress=progress
    )
    state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    alpha = {name: layer.mix_weight.detach().cpu().clone() for name, layer in layers}
    meta = {
        "preset": "ttn",
        "n_images": len(source_images),
        "wall_time_s": round(time.perf_counter() - t0, 1),
        "device": str(device),
        "torch": str(torch.__version__),
    }
    return TTNResult(state, prior, alpha, config, history, meta)
