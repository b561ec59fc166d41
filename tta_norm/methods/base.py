"""Shared pieces of the gradient methods: parameter collection, entropy, optimiser, the method base class."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from tta_norm.norm.adaptive import adaptive_layers
from tta_norm.norm.convert import keep_state


def softmax_entropy(logits: Tensor) -> Tensor:
    """Per-sample Shannon entropy of ``softmax(logits)`` in nats: ``-(p * log p).sum(1)``, shape ``(N,)``."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def collect_norm_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The affine ``weight`` and ``bias`` of every adaptive norm layer: what TENT and its successors update."""
    params = []
    for name, layer in adaptive_layers(model):
        for pname in ("weight", "bias"):
            p = getattr(layer, pname)
            if p is not None:
                params.append((f"{name}.{pname}" if name else pname, p))
    if not params:
        raise ValueError("no affine norm parameters to adapt (every BatchNorm has affine=False)")
    return params


def build_optimizer(
    params: list[nn.Parameter],
    optimizer: str = "adam",
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    momentum: float = 0.9,
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """Adam (default: lr 1e-3, betas (0.9, 0.999), TENT's CIFAR setting) or SGD with momentum (ImageNet)."""
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=weight_decay)
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {optimizer!r}; expected 'adam' or 'sgd'")


@contextlib.contextmanager
def grad_context(x: Tensor) -> Iterator[Tensor]:
    """Enable autograd for an adaptation step, also under ``torch.no_grad()`` or ``torch.inference_mode()``."""
    with torch.inference_mode(False), torch.enable_grad():
        yield x.clone() if x.is_inference() else x


class GradientMethod:
    """Base class: a thin adapter that updates the affine parameters of a model's adaptive norm layers.

    :meth:`forward_and_adapt` runs ``steps`` rounds of forward pass + :meth:`adapt_step` on a test batch and
    returns the logits of the last forward (computed before its update); only the first forward may move
    stateful statistics (EMA).  Subclasses implement :meth:`adapt_step` and, if they keep state besides the
    parameters and optimiser, :meth:`reset_method_state`.  The
    wrapper (:class:`tta_norm.api.TTAModel`) restores parameters, buffers and optimiser state on reset.
    A method sets ``reset_requested = True`` to ask the wrapper for a model recovery (SAR).
    """

    name = "base"

    def __init__(
        self,
        model: nn.Module,
        *,
        lr: float = 1e-3,
        optimizer: str = "adam",
        betas: tuple[float, float] = (0.9, 0.999),
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        steps: int = 1,
    ) -> None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.model = model
        self.named_params = collect_norm_params(model)
        model.requires_grad_(False)
        for _, p in self.named_params:
            p.requires_grad_(True)
        self.params = [p for _, p in self.named_params]
        self.optimizer = build_optimizer(self.params, optimizer, lr, betas, momentum, weight_decay)
        self.steps = steps
        self.reset_requested = False

    def forward_and_adapt(self, x: Tensor) -> Tensor:
        """Adapt on the batch ``x`` and return the logits predicted for it."""
        with grad_context(x) as x:
            for step in range(self.steps):
                with keep_state(self.model) if step else contextlib.nullcontext():
                    logits = self.model(x)
                self.adapt_step(x, logits)
        return logits.detach()

    def adapt_step(self, x: Tensor, logits: Tensor) -> None:  # pragma: no cover - abstract
        """One update from the batch ``x`` and the logits of its forward pass (which carry the graph)."""
        raise NotImplementedError

    def reset_method_state(self) -> None:
        """Forget method state kept outside parameters/optimiser (none by default)."""
