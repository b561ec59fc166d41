"""Shared pieces of the gradient methods: parameter collection, entropy, optimiser, the method base class."""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from tta_norm.norm.adaptive import AdaptiveNorm
from tta_norm.norm.convert import keep_state

#: Norm layers whose affine parameters the gradient methods adapt: the toolkit's adaptive BatchNorm
#: replacement and PyTorch's LayerNorm / GroupNorm (subclasses included, e.g. timm's ``LayerNorm2d``).
ADAPTABLE_NORMS: tuple[type[nn.Module], ...] = (AdaptiveNorm, nn.LayerNorm, nn.GroupNorm)

#: The optimiser settings each supported optimiser accepts (``torch.optim`` argument names).
OPTIM_SETTINGS: dict[str, tuple[str, ...]] = {
    "adam": ("lr", "betas", "eps", "weight_decay", "amsgrad"),
    "sgd": ("lr", "momentum", "dampening", "weight_decay", "nesterov"),
}

#: The authors' optimiser defaults.  Adam: TENT's CIFAR setting (``DequanWang/tent`` ``cfgs/tent.yaml``: lr 1e-3,
#: betas (0.9, 0.999), wd 0), also used by MedBN's CIFAR configs for TENT, EATA and SAR and by Marsden & Doebler's
#: for TENT and EATA (their SAR builds SGD, momentum 0.9, at the config's lr).
#: SGD: the ImageNet setting of TENT, EATA and SAR (``mr-eggplant/EATA`` and ``mr-eggplant/SAR`` ``main.py``:
#: lr 0.00025 at batch 64, momentum 0.9, no Nesterov, wd 0).
OPTIM_DEFAULTS: dict[str, dict[str, Any]] = {
    "adam": {"lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 0.0},
    "sgd": {"lr": 2.5e-4, "momentum": 0.9, "weight_decay": 0.0},
}

def paper_sgd_lr(batch_size: int, *, vit: bool = False, method: str | None = None) -> float:
    """The SGD learning rate of SAR's ImageNet code at test batch size ``batch_size`` (``mr-eggplant/SAR``
    ``main.py``, also used there for TENT and EATA): ResNets (BN or GN) ``0.00025``, scaled to
    ``0.00025 / 64 * batch_size * 2`` below batch 32; ViT ``0.001 / 64 * batch_size``; for ``method="sar"`` at
    batch size 1 twice that (its ``bs1`` experiment doubles SAR's rate).  The default SGD lr
    (:data:`OPTIM_DEFAULTS`) is the ResNet value at batch 32 or more: pass ``lr=paper_sgd_lr(b, vit=...)`` for
    the paper's value at another batch size or for a ViT."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if vit:
        lr = 0.001 / 64 * batch_size
    else:
        lr = 0.00025 / 64 * batch_size * 2 if batch_size < 32 else 0.00025
    return 2 * lr if method == "sar" and batch_size == 1 else lr


#: Optimiser settings a method also takes as plain keyword arguments (no NormSpec field has these names).
DIRECT_OPTIM_KWARGS: tuple[str, ...] = ("lr", "betas", "weight_decay")


def optim_setting_names() -> frozenset[str]:
    """Every optimiser setting name of :data:`OPTIM_SETTINGS` (used to route and reject keyword arguments)."""
    return frozenset(k for keys in OPTIM_SETTINGS.values() for k in keys)


def _check_trainable_dtypes(named_params: list[tuple[str, nn.Parameter]]) -> None:
    """Refuse float16/bfloat16 trainable parameters: Adam's ``eps`` 1e-8 and SAR's norm guard are 0 in float16
    (a first step of 0/0 = NaN weights, with finite logits), and bfloat16 cannot hold a 1e-3 step at 1.0."""
    low = [name for name, p in named_params if p.dtype in (torch.float16, torch.bfloat16)]
    if low:
        dtype = dict(named_params)[low[0]].dtype
        raise ValueError(
            f"the parameters to adapt ({low[0]}, {len(low)} in all) are {str(dtype).removeprefix('torch.')}, too "
            "coarse for an optimiser step; keep the norm layers in float32 (a reduced-precision network can run "
            "its forward under torch.autocast)"
        )


def softmax_entropy(logits: Tensor) -> Tensor:
    """Per-sample Shannon entropy of ``softmax(logits)`` in nats: ``-(p * log p).sum(1)``, shape ``(N,)``."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def collect_norm_params(
    model: nn.Module, *, skip: Any = None
) -> list[tuple[str, nn.Parameter]]:
    """The affine ``weight`` and ``bias`` of every adaptable norm layer, in module order.

    Adaptable layers (:data:`ADAPTABLE_NORMS`): the adaptive BatchNorm layers and every ``nn.LayerNorm`` /
    ``nn.GroupNorm`` (TENT as run by Marsden & Doebler, EATA, SAR: the papers adapt the norm affine of BN, GN and
    LN networks).  ``skip(module_name) -> bool`` leaves out layers (SAR's top layers).  A parameter two layers
    share is listed once (under its first name), as ``named_parameters()`` does: it takes one step, not two.
    """
    params = []
    seen: set[int] = set()
    for name, layer in model.named_modules():
        if not isinstance(layer, ADAPTABLE_NORMS) or (skip is not None and skip(name)):
            continue
        for pname in ("weight", "bias"):
            p = getattr(layer, pname, None)
            if isinstance(p, nn.Parameter) and id(p) not in seen:
                seen.add(id(p))
                params.append((f"{name}.{pname}" if name else pname, p))
    if not params:
        raise ValueError(
            "no affine norm parameters to adapt: the model has no BatchNorm, LayerNorm or GroupNorm layer with "
            "affine weights (or all of them were skipped)"
        )
    return params


def optimizer_settings(
    optimizer: str = "adam", optim: Mapping[str, Any] | None = None, **direct: Any
) -> dict[str, Any]:
    """The settings of the method's optimiser: the authors' defaults (:data:`OPTIM_DEFAULTS`), then ``optim``.

    ``direct`` holds the plain keyword arguments of :data:`DIRECT_OPTIM_KWARGS` (``None`` = not given); giving
    the same setting there and in ``optim`` is a ``TypeError``; a setting the optimiser does not take is a
    ``ValueError`` naming the accepted ones.
    """
    if optimizer not in OPTIM_SETTINGS:
        raise ValueError(f"unknown optimizer {optimizer!r}; expected 'adam' or 'sgd'")
    if optim is not None and not isinstance(optim, Mapping):
        raise TypeError(f"optim must be a mapping of optimiser settings, got {type(optim).__name__}")
    optim = dict(optim or {})
    for key, value in direct.items():
        if value is None:
            continue
        if key in optim:
            raise TypeError(f"{key} is given twice (as {key}= and in optim=); pass it once")
        optim[key] = value
    unknown = sorted(set(optim) - set(OPTIM_SETTINGS[optimizer]))
    if unknown:
        raise ValueError(
            f"optimizer {optimizer!r} takes no setting(s) {unknown}; optim= accepts {list(OPTIM_SETTINGS[optimizer])}"
        )
    settings = {**OPTIM_DEFAULTS[optimizer], **optim}
    if "betas" in settings:
        settings["betas"] = tuple(settings["betas"])
    return settings


def build_optimizer(
    params: list[nn.Parameter], optimizer: str = "adam", optim: Mapping[str, Any] | None = None
) -> torch.optim.Optimizer:
    """``torch.optim.Adam`` or ``torch.optim.SGD`` over ``params`` with :func:`optimizer_settings`."""
    settings = optimizer_settings(optimizer, optim)
    cls = torch.optim.Adam if optimizer == "adam" else torch.optim.SGD
    return cls(params, **settings)


@contextlib.contextmanager
def grad_context(x: Tensor) -> Iterator[Tensor]:
    """Enable autograd for an adaptation step, also under ``torch.no_grad()`` or ``torch.inference_mode()``."""
    with torch.inference_mode(False), torch.enable_grad():
        yield x.clone() if x.is_inference() else x


class NonFiniteLogits(ArithmeticError):
    """The adapting forward gave NaN or Inf logits: a step on them would poison the parameters, so none is
    taken (:class:`~tta_norm.api.TTAModel` rolls the batch back and raises or skips it per its policy)."""


def check_logits(logits: Any) -> None:
    """A gradient method's losses (entropy, margins) read ``(N, classes)`` logits with at least 2 classes: a
    tuple, an ``(N, T, C)`` output or a single logit (entropy 0: no step ever) is a one-line error."""
    if not isinstance(logits, Tensor) or logits.ndim != 2 or logits.shape[1] < 2:
        got = f"shape {tuple(logits.shape)}" if isinstance(logits, Tensor) else f"a {type(logits).__name__}"
        raise ValueError(f"a gradient method needs (N, classes) logits with >= 2 classes, the model gave {got}; "
                         "wrap it in a module that returns them")  # fmt: skip


def all_finite(t: Tensor) -> bool:
    """Whether every value of ``t`` is finite: one reduction, and the exact check only when the sum is not
    finite (NaN/Inf, or finite values whose sum overflows)."""
    return math.isfinite(float(t.detach().sum())) or bool(torch.isfinite(t).all())


class GradientMethod:
    """Base class: a thin adapter that updates the affine parameters of a model's norm layers.

    :meth:`forward_and_adapt` runs ``steps`` rounds of forward pass + :meth:`adapt_step` on a test batch and
    returns the logits of the last forward (computed before its update); only the first forward may move
    stateful statistics (EMA).  Subclasses implement :meth:`adapt_step` and, if they keep state besides the
    parameters and optimiser, :meth:`reset_method_state`; :meth:`select_params` picks what is trained
    (default: :func:`collect_norm_params`).  The wrapper (:class:`tta_norm.api.TTAModel`) restores
    parameters, buffers and optimiser state on reset.  A method sets ``reset_requested = True`` to ask the
    wrapper for a model recovery (SAR).

    Optimiser: ``optimizer="adam"`` (default) or ``"sgd"``, its settings in ``optim={"lr": ..., "momentum":
    ...}`` (see :data:`OPTIM_SETTINGS`) over the authors' defaults (:data:`OPTIM_DEFAULTS`: Adam lr 1e-3,
    betas (0.9, 0.999); SGD lr 0.00025, momentum 0.9); ``lr``, ``betas`` and ``weight_decay`` may also be
    given as plain keyword arguments.
    """

    name = "base"

    def __init__(
        self,
        model: nn.Module,
        *,
        optimizer: str = "adam",
        optim: Mapping[str, Any] | None = None,
        lr: float | None = None,
        betas: tuple[float, float] | None = None,
        weight_decay: float | None = None,
        steps: int = 1,
    ) -> None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        settings = optimizer_settings(optimizer, optim, lr=lr, betas=betas, weight_decay=weight_decay)
        self.model = model
        self.named_params = self.select_params(model)
        _check_trainable_dtypes(self.named_params)
        model.requires_grad_(False)
        for _, p in self.named_params:
            p.requires_grad_(True)
        self.params = [p for _, p in self.named_params]
        self.optimizer = build_optimizer(self.params, optimizer, settings)
        self.steps = steps
        self.reset_requested = False

    def select_params(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """The ``(name, parameter)`` pairs this method trains (default: every norm layer's affine)."""
        return collect_norm_params(model)

    def forward_and_adapt(self, x: Tensor) -> Tensor:
        """Adapt on the batch ``x`` and return the logits predicted for it."""
        with grad_context(x) as x:
            for step in range(self.steps):
                with keep_state(self.model) if step else contextlib.nullcontext():
                    logits = self.model(x)
                if not step:
                    check_logits(logits)
                    if not all_finite(logits):
                        raise NonFiniteLogits
                # gradients left on the parameters (e.g. by differentiable_forward(x).sum().backward()) must
                # not be added into this step's
                self.optimizer.zero_grad(set_to_none=True)
                self.adapt_step(x, logits)
        return logits.detach()

    def adapt_step(self, x: Tensor, logits: Tensor) -> None:  # pragma: no cover - abstract
        """One update from the batch ``x`` and the logits of its forward pass (which carry the graph)."""
        raise NotImplementedError

    def reset_method_state(self) -> None:
        """Forget method state kept outside parameters/optimiser (none by default)."""

    #: attributes that are the method's wiring, not its state (see :meth:`state_dict`)
    WIRING = frozenset({"model", "named_params", "params", "optimizer"})

    def state_dict(self) -> dict[str, Any]:
        """Everything adaptation changes in the method itself: the optimiser's state and the method's own
        attributes (EATA's moving average, SAR's loss EMA and recovery flag...), deep-copied."""
        attributes = {k: copy.deepcopy(v) for k, v in vars(self).items() if k not in self.WIRING}
        return {"class": type(self).__name__, "optimizer": copy.deepcopy(self.optimizer.state_dict()),
                "attributes": attributes}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (copies, so the source can go on adapting)."""
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        for key, value in state["attributes"].items():
            setattr(self, key, copy.deepcopy(value))
