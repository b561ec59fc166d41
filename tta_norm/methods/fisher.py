"""EATA's anti-forgetting weights: the diagonal Fisher information of the adapted parameters, computed once.

EATA (Niu et al., ICML 2022; ``mr-eggplant/EATA`` ``main.py``) computes, before adaptation, the squared
gradients of the cross-entropy against the model's own predictions (pseudo-labels) on ``fisher_size`` = 2000
clean images in batches of 64, summed over batches and divided by the number of batches, and keeps the
parameter values they were taken at as the anchor.  :func:`compute_fishers` does exactly that;
:func:`cached_fishers` memoises it per model state, statistics spec and data, so a benchmark grid computes it
once per model and reuses it in every cell.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tta_norm.device import input_dtype
from tta_norm.methods.base import collect_norm_params, grad_context
from tta_norm.norm.adaptive import adaptive_layers
from tta_norm.norm.convert import keep_state

Fishers = dict[str, tuple[Tensor, Tensor]]

#: EATA's defaults (``--fisher_size 2000``, ``--batch_size 64``), also Marsden & Doebler's ``SOURCE.NUM_SAMPLES``.
FISHER_SAMPLES = 2000
FISHER_BATCH_SIZE = 64
_CACHE_SIZE = 8

_cache: OrderedDict[str, Fishers] = OrderedDict()
cache_stats = {"hits": 0, "misses": 0}


def compute_fishers(
    model: nn.Module, batches: Iterable[Tensor], named_params: list[tuple[str, nn.Parameter]] | None = None
) -> Fishers:
    """Diagonal Fisher information of the adapted parameters (default: every norm affine), EATA's weights.

    For each batch (inputs only; the labels are the model's own argmax predictions), the squared gradient of
    the mean cross-entropy is accumulated; the sum is divided by the number of batches.  Returns
    ``{param name: (fisher, value at computation)}``.  The model's statistics state is not changed
    (:func:`~tta_norm.norm.keep_state`) and its parameters' ``.grad`` are left as they were.
    """
    named = named_params if named_params is not None else collect_norm_params(model)
    params = [p for _, p in named]
    flags = [p.requires_grad for p in params]
    total = {name: torch.zeros_like(p) for name, p in named}
    count = 0
    try:
        for p in params:
            p.requires_grad_(True)
        with keep_state(model):
            for x in batches:
                with grad_context(x) as x:
                    logits = model(x)
                    loss = F.cross_entropy(logits, logits.argmax(1))
                    grads = torch.autograd.grad(loss, params, allow_unused=True)
                for (name, _), g in zip(named, grads, strict=True):
                    if g is not None:
                        total[name] += g.detach() ** 2
                count += 1
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
    if count == 0:
        raise ValueError("compute_fishers needs at least one batch of data")
    return {name: (total[name] / count, p.detach().clone()) for name, p in named}


def check_fishers(fishers: Fishers, named_params: list[tuple[str, nn.Parameter]]) -> None:
    """Fisher weights fit the adapted parameters: every name one of them, ``(fisher, anchor)`` tensors of its
    shape, all finite (a NaN weight would silently turn every later loss, and so every step, into NaN)."""
    shapes = {name: tuple(p.shape) for name, p in named_params}
    for name, pair in fishers.items():
        if name not in shapes:
            raise ValueError(f"Fisher weights name {name!r}, which is not an adapted parameter ({len(shapes)} are)")
        if not (isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(t, Tensor) for t in pair)):
            raise ValueError(f"Fisher weights of {name!r} must be a (fisher, anchor) pair of tensors")
        for what, t in zip(("fisher", "anchor"), pair, strict=True):
            if tuple(t.shape) != shapes[name]:
                raise ValueError(f"Fisher {what} of {name!r} has shape {tuple(t.shape)}, the parameter {shapes[name]}")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"Fisher {what} of {name!r} holds NaN or Inf (non-finite source images or logits?)")


def check_fisher_images(images: Tensor) -> None:
    """Fisher source images are a finite floating-point tensor with a batch dimension (images in [0, 1], as the
    model is fed at test time: uint8 pixels would be read as 0-255)."""
    if not isinstance(images, Tensor) or not images.is_floating_point() or images.ndim < 2:
        kind = f"{images.dtype} tensor of shape {tuple(images.shape)}" if isinstance(images, Tensor) else type(images)
        raise ValueError(f"fisher_images must be a floating-point (N, ...) tensor of images in [0, 1], got {kind}")
    if not bool(torch.isfinite(images).all()):
        raise ValueError("fisher_images holds NaN or Inf")


def image_batches(images: Tensor, batch_size: int = FISHER_BATCH_SIZE) -> list[Tensor]:
    """``images`` (float ``(N, C, H, W)``) cut into consecutive batches of ``batch_size`` (the last may be smaller)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return list(torch.split(images, batch_size))


def _fingerprint(model: nn.Module, named: list[tuple[str, nn.Parameter]], images: Tensor, batch_size: int) -> str:
    h = hashlib.sha1()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(_raw_bytes(t))
    for name, layer in adaptive_layers(model):
        h.update(f"{name}:{layer.spec!r}".encode())
    h.update(",".join(n for n, _ in named).encode())
    h.update(str((tuple(images.shape), images.dtype, batch_size, str(images.device))).encode())
    h.update(_raw_bytes(images))
    return h.hexdigest()


def _raw_bytes(t: Tensor) -> bytes:
    """The bytes of ``t``'s values, for any dtype (numpy has no bfloat16)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def cached_fishers(
    model: nn.Module,
    images: Tensor,
    *,
    batch_size: int = FISHER_BATCH_SIZE,
    named_params: list[tuple[str, nn.Parameter]] | None = None,
) -> Fishers:
    """:func:`compute_fishers` over ``images`` in batches of ``batch_size``, memoised.

    The key is the model's state (parameters and buffers), its adaptive layers' specs, the parameter names and
    the images, so the same source model, preset and data reuse one computation (the last 8 are kept); the
    returned tensors are copies.  ``cache_stats`` counts hits and misses.
    """
    check_fisher_images(images)
    dtype = input_dtype(model, images.dtype)  # fed like a test batch: float64 images on a float32 model...
    if dtype is not None and dtype != images.dtype:
        images = images.to(dtype)
    named = named_params if named_params is not None else collect_norm_params(model)
    key = _fingerprint(model, named, images, batch_size)
    if key in _cache:
        cache_stats["hits"] += 1
        _cache.move_to_end(key)
    else:
        cache_stats["misses"] += 1
        _cache[key] = compute_fishers(model, image_batches(images, batch_size), named)
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return {name: (f.clone(), a.clone()) for name, (f, a) in _cache[key].items()}


def clear_fisher_cache() -> None:
    """Forget every memoised Fisher computation and reset ``cache_stats``."""
    _cache.clear()
    cache_stats.update(hits=0, misses=0)
