"""SAR: sharpness-aware and reliable entropy minimisation (Niu et al., ICLR 2023)."""

from __future__ import annotations

import copy
import math
import re
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from tta_norm.methods.base import ADAPTABLE_NORMS, GradientMethod, collect_norm_params, softmax_entropy
from tta_norm.methods.eata import entropy_margin
from tta_norm.norm.convert import keep_state


def is_sar_top_layer(module_name: str) -> bool:
    """Whether SAR's official parameter selection leaves the layer ``module_name`` out.

    ``mr-eggplant/SAR`` ``sar.collect_params`` skips modules whose name contains ``layer4`` (the last stage of
    an ImageNet ResNet), ``blocks.9``, ``blocks.10`` or ``blocks.11`` (the top blocks of a ViT-Base) or ``norm.``,
    and the module named ``norm`` (a ViT's final norm).  A CIFAR ResNet (stages ``layer1``-``layer3``) keeps all.
    """
    return (
        "layer4" in module_name
        or any(f"blocks.{i}" in module_name for i in (9, 10, 11))
        or "norm." in module_name
        or module_name == "norm"
    )


class SARTopLayerWarning(UserWarning):
    """SAR's official top-layer rule does not fit the model's block numbering (it names ViT-Base's)."""


_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)(?=\.|$)")


def sar_top_layer_misfit(module_names: Iterable[str]) -> str | None:
    """Where the official rule's ``blocks.9``-``blocks.11`` are not the model's top blocks: a description of the
    model's numbered blocks, or ``None`` when they are (a 12-block ViT) or the model has none (ResNets).

    The rule matches names, so on a 24-block ViT-Large it leaves out three middle blocks and on a ConvNeXt
    (``stages.<s>.blocks.<i>``) the middle of a deep stage, while a model with fewer blocks keeps them all."""
    groups: dict[str, set[int]] = {}
    for name in module_names:
        for match in _BLOCK.finditer(name):
            groups.setdefault(name[: match.start()], set()).add(int(match.group(1)))
    if not groups or (set(groups) == {""} and max(groups[""]) == 11):
        return None
    return ", ".join(f"{prefix + '.' if prefix else ''}blocks.0-{max(ix)}" for prefix, ix in sorted(groups.items()))


class SAR(GradientMethod):
    """SAR: reliable-entropy filtering, a sharpness-aware (SAM) step, and model recovery on collapse.

    Per batch, as ``mr-eggplant/SAR`` ``forward_and_adapt_sar`` with its ``SAM`` optimiser wrapper: forward,
    keep samples with entropy below ``e_margin`` (default ``0.4 ln C``), back-propagate their mean entropy, save
    the parameters and move them to the SAM point ``theta + rho * g / (||g|| + 1e-12)`` (``rho`` 0.05); forward
    again (statistics state not updated twice), keep the first filter's samples whose new entropy is still
    below the margin, back-propagate their mean entropy at the perturbed point, copy the saved parameters back
    and take the base optimiser step.  As in the reference the base step is taken on every batch, also when no
    sample survives a filter (the mean over no sample has zero gradient, but momentum / Adam moments still move
    the weights).  An EMA (``0.9 * ema + (1 - 0.9) * loss``) of the second loss below ``reset_constant`` (0.2)
    triggers a model recovery: parameters and statistics back to the source; as in the reference (whose
    ``SAM.load_state_dict`` restores only SAM's own state) the base optimiser's state (Adam moments and step
    count, SGD momentum) and the loss EMA survive it.  Returns the logits of the first forward pass.
    Deviation: an explicit ``reset()`` (and ``episodic`` / ``reset_every``) returns to the source state with a
    fresh optimiser, where the reference's ``reset`` (also its episodic mode) keeps the base optimiser's state.

    Trained parameters: the official selection (:func:`is_sar_top_layer` layers left out), with a
    :class:`SARTopLayerWarning` on a model whose numbered blocks it does not fit (:func:`sar_top_layer_misfit`);
    ``freeze_top=False`` adapts every norm layer, ``freeze_top=<callable(module_name) -> bool>`` leaves out the
    layers it returns ``True`` for.  Base optimiser: the toolkit default (Adam lr 1e-3, MedBN's CIFAR setting,
    ``cfgs/cifar10/sar.yaml``); the paper's ImageNet setting is ``optimizer="sgd"`` (momentum 0.9, lr 0.00025 for a
    ResNet at batch >= 32; :func:`~tta_norm.methods.base.paper_sgd_lr` gives the paper's lr at other batch sizes and
    for ViT).  Marsden & Doebler's SAR takes SGD whatever its config names (``SAR.setup_optimizer``: momentum 0.9,
    the config's lr, 1e-3 on CIFAR): ``optimizer="sgd", optim={"lr": 1e-3}``.
    """

    name = "sar"

    def __init__(
        self,
        model: nn.Module,
        *,
        e_margin: float | None = None,
        rho: float = 0.05,
        reset_constant: float = 0.2,
        freeze_top: bool | Callable[[str], bool] = True,
        **optim_kwargs: Any,
    ) -> None:
        if rho < 0:
            raise ValueError(f"rho must be >= 0, got {rho}")
        self.freeze_top = freeze_top
        super().__init__(model, **optim_kwargs)
        self.e_margin = e_margin
        self.rho = rho
        self.reset_constant = reset_constant
        self.loss_ema: float | None = None
        self._kept_optimizer_state: dict[str, Any] | None = None

    def select_params(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """The official ``collect_params`` selection (on the names of the network inside the package's input and
        logit wrappers), the caller's rule (``freeze_top`` callable), or every norm affine (``False``)."""
        from tta_norm.models.wrappers import inner_name

        if callable(self.freeze_top):
            rule = self.freeze_top
        elif self.freeze_top:
            rule = is_sar_top_layer
            misfit = sar_top_layer_misfit(inner_name(model, name) for name, _ in model.named_modules())
            if misfit is not None:
                left_out = [inner_name(model, n) for n, m in model.named_modules()
                            if isinstance(m, ADAPTABLE_NORMS) and is_sar_top_layer(inner_name(model, n))]  # fmt: skip
                some = f"{len(left_out)} norm layer(s) {left_out[:4]}{'...' if len(left_out) > 4 else ''}"
                warnings.warn(
                    f"SAR's official top-layer rule leaves out blocks.9-11 (the top of ViT-Base's 12 blocks); this "
                    f"model has {misfit}, and the rule leaves out {some if left_out else 'none of its norm layers'}"
                    ". Pass freeze_top=<callable(module_name) -> bool> to choose its top layers, or "
                    "freeze_top=False to adapt them all",
                    SARTopLayerWarning,
                    stacklevel=4,
                )
        else:
            return collect_norm_params(model)
        return collect_norm_params(model, skip=lambda name: bool(rule(inner_name(model, name))))

    def reset_method_state(self) -> None:
        self.loss_ema = None
        self._kept_optimizer_state = None

    def forward_and_adapt(self, x: Tensor) -> Tensor:
        if self._kept_optimizer_state is not None:  # after a model recovery: the base optimiser's state survives
            # a copy: load_state_dict aliases the tensors, and a rolled-back step must not change the kept state
            self.optimizer.load_state_dict(copy.deepcopy(self._kept_optimizer_state))
            self._kept_optimizer_state = None
        return super().forward_and_adapt(x)

    @torch.no_grad()
    def _perturb(self) -> dict[int, Tensor]:
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return {}
        grad_norm = torch.norm(torch.stack([g.norm(p=2) for g in grads]), p=2)
        scale = self.rho / (grad_norm + 1e-12)
        saved = {}
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            saved[i] = p.data.clone()
            p.add_(p.grad * scale.to(p))
        return saved

    @torch.no_grad()
    def _restore_params(self, saved: dict[int, Tensor]) -> None:
        for i, old in saved.items():
            self.params[i].copy_(old)

    def adapt_step(self, x: Tensor, logits: Tensor) -> None:
        margin = self.e_margin if self.e_margin is not None else entropy_margin(logits.shape[1])
        self.optimizer.zero_grad(set_to_none=True)
        entropy = softmax_entropy(logits)
        reliable = torch.where(entropy < margin)
        entropy[reliable].mean(0).backward()
        saved = self._perturb()
        self.optimizer.zero_grad(set_to_none=True)
        with keep_state(self.model):
            entropy2 = softmax_entropy(self.model(x))[reliable]
        still = torch.where(entropy2 < margin)
        loss2 = entropy2[still].mean(0)
        value = loss2.item()
        if not math.isnan(value):
            self.loss_ema = value if self.loss_ema is None else 0.9 * self.loss_ema + (1 - 0.9) * value
        loss2.backward()
        self._restore_params(saved)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.loss_ema is not None and self.loss_ema < self.reset_constant:
            self.reset_requested = True
            self._kept_optimizer_state = copy.deepcopy(self.optimizer.state_dict())
