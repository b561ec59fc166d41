"""PGD adversarial training with BN, AuxBN or SaAuxBN (Madry et al., ICLR 2018; Gong et al., WACV 2022).

Recipe (SaBN's ``Adv`` code, see ``REFERENCE.md`` part 2 section 3): PGD-7, Linf ``eps = 8/255``, step
``2/255``, random start; loss ``0.5 * [CE(f(x; domain 0), y) + CE(f(x_adv; domain 1), y)]`` with the
adversarial examples generated through the adversarial domain.  ``kind="bn"`` uses the same loss with one shared
BN (the baseline: only the normalisation differs); ``"aux"`` / ``"saaux"`` convert every ``BatchNorm2d`` with
:func:`tta_norm.layers.convert_to_aux_bn` first (starting equal to the source model on both domains).

Conventions: adversarial examples are crafted with the model in ``train()`` mode, as the official code does
(``craft_mode="train"``: the adversarial domain normalises each PGD iterate with its batch statistics and its
running statistics see the adversarial inputs); ``craft_mode="eval"`` crafts against the running statistics
instead and leaves them untouched. The loss is computed in ``train()`` mode.  Augmentation: CIFAR crop of the
4-pixel zero-padded image + horizontal flip, drawn per sample (:func:`tta_norm.training.augment_batch`).  The
steps run in :func:`tta_norm.training.fit`. Evaluation (:func:`evaluate_robustness`): clean and PGD-k accuracy
(random start) per domain, in ``eval()`` mode.  ``domain`` selects the AuxBN/SaAuxBN domain (``None``: the
model's layers as they are, e.g. plain BN); ``branch=`` is its deprecated name.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tta_norm._deprecation import renamed_keywords
from tta_norm._integers import integer_index
from tta_norm._numbers import finite_number
from tta_norm.attacks.lp import pgd_attack
from tta_norm.data.tensors import to_float_nchw
from tta_norm.layers.aux_batch_norm import convert_to_aux_bn, domain_layers, use_domain
from tta_norm.training import augment_batch, fit

KINDS = ("bn", "aux", "saaux")
CRAFT_MODES = ("train", "eval")


@dataclass
class AdvTrainConfig:
    """Fine-tuning settings (defaults: the recipe above, SGD momentum 0.9, wd 5e-4, batch 128)."""

    kind: str = "saaux"
    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 7
    epochs: int = 1
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    seed: int = 0
    craft_mode: Literal["train", "eval"] = "train"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.craft_mode not in CRAFT_MODES:
            raise ValueError(f"craft_mode must be one of {CRAFT_MODES}, got {self.craft_mode!r}")
        for name in ("steps", "epochs", "batch_size", "seed"):
            if integer_index(getattr(self, name)) is None:
                raise ValueError(f"{name} must be an integer, got {getattr(self, name)!r}")
        if self.epochs < 1 or self.batch_size < 2 or self.steps < 0:
            raise ValueError("epochs >= 1, batch_size >= 2 and steps >= 0 are required")
        for name, low, high in (("eps", 0.0, 1.0), ("step_size", 0.0, 1.0), ("lr", 0.0, math.inf),
                                ("momentum", 0.0, 1.0), ("weight_decay", 0.0, math.inf)):  # fmt: skip
            finite_number(name, getattr(self, name), low, high)
        if self.lr == 0:
            raise ValueError("lr must be > 0, got 0")


def _on_domain(model: nn.Module, domain: int | None) -> contextlib.AbstractContextManager[Any]:
    return use_domain(model, domain) if domain is not None and domain_layers(model) else contextlib.nullcontext()


def _as_input(images: np.ndarray | Tensor, device: torch.device) -> Tensor:
    """uint8 NHWC images -> float NCHW in [0, 1]; float input is taken as NCHW model input already."""
    t = torch.as_tensor(images).to(device)
    return to_float_nchw(t) if t.dtype == torch.uint8 else t


@renamed_keywords(branch="domain")
def craft(model: nn.Module, x: Tensor, y: Tensor, cfg: AdvTrainConfig, generator: torch.Generator,
          domain: int | None = 1) -> Tensor:  # fmt: skip
    """PGD-``steps`` Linf examples through ``domain`` with the model in ``cfg.craft_mode`` (the mode is restored).

    ``"train"`` (official recipe) normalises with batch statistics and moves the domain's running statistics;
    ``"eval"`` uses the running statistics and leaves them alone."""
    was_training = model.training
    model.train(cfg.craft_mode == "train")
    try:
        with _on_domain(model, domain):
            return pgd_attack(model, x, y, norm="Linf", eps=cfg.eps, step_size=cfg.step_size, steps=cfg.steps,
                              random_start=True, generator=generator)  # fmt: skip
    finally:
        model.train(was_training)


def adversarial_finetune(
    model: nn.Module,
    images: np.ndarray | Tensor,
    labels: np.ndarray | Tensor,
    cfg: AdvTrainConfig,
    *,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> tuple[nn.Module, list[dict[str, float]]]:
    """Fine-tune ``model`` (converted in place for ``aux``/``saaux``) by PGD adversarial training.

    ``images``: uint8 NHWC (or float NCHW in ``[0, 1]``); ``labels``: int.  Full batches only (a final partial
    batch is dropped); cosine learning-rate decay to 0 over the run.  Returns the model (in ``eval()`` mode) and
    the per-step history (loss, clean and adversarial training accuracy of the batch).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    if cfg.kind != "bn":
        convert_to_aux_bn(model, cfg.kind)
        model.to(device)
    g = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    data = torch.as_tensor(np.asarray(images)) if not isinstance(images, Tensor) else images
    layout = "NHWC" if data.dtype == torch.uint8 else "NCHW"
    labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    n = labels_t.shape[0]
    steps_per_epoch = n // cfg.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"{n} training images are fewer than one batch of {cfg.batch_size}")
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs * steps_per_epoch)
    clean_domain, adv_domain = (None, None) if cfg.kind == "bn" else (0, 1)
    history: list[dict[str, float]] = []

    def loss_fn(idx: Tensor) -> Tensor:
        x = _as_input(augment_batch(data[idx], g, pad=4, layout=layout), device)
        y = labels_t[idx].to(device)
        x_adv = craft(model, x, y, cfg, g, adv_domain)
        model.train()
        with _on_domain(model, clean_domain):
            out_clean = model(x)
        with _on_domain(model, adv_domain):
            out_adv = model(x_adv)
        history.append({"clean_acc": float((out_clean.argmax(1) == y).float().mean()),
                        "adv_acc": float((out_adv.argmax(1) == y).float().mean())})  # fmt: skip
        return 0.5 * (F.cross_entropy(out_clean, y) + F.cross_entropy(out_adv, y))

    def after_step(step: int, loss: Tensor, sums: dict[str, Tensor]) -> None:
        history[-1] = {"loss": float(loss.detach()), **history[-1]}

    fit(opt, loss_fn, n=n, batch_size=cfg.batch_size, epochs=cfg.epochs, generator=g, drop_last=True,
        scheduler=sched, after_step=after_step, progress=progress, desc=f"adv-train {cfg.kind}")  # fmt: skip
    return model.eval(), history


@renamed_keywords(branch="domain")
def evaluate_robustness(
    model: nn.Module,
    images: np.ndarray | Tensor,
    labels: np.ndarray | Tensor,
    *,
    domain: int | None = None,
    pgd_steps: tuple[int, ...] = (10, 20),
    eps: float = 8 / 255,
    step_size: float = 2 / 255,
    batch_size: int = 250,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Clean and PGD-k accuracy (Linf, random start) of ``model`` in ``eval()`` mode on ``domain``.

    Each ``k`` draws its random starts from its own generator seeded with ``seed`` (a figure does not depend on
    which other ``k`` are asked for)."""
    if any(integer_index(k) is None or k < 0 for k in pgd_steps) or len(set(pgd_steps)) != len(pgd_steps):
        raise ValueError(f"pgd_steps must be distinct integers >= 0, got {pgd_steps}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    correct = {"clean": 0, **{f"pgd{k}": 0 for k in pgd_steps}}
    generators = {k: torch.Generator().manual_seed(seed) for k in pgd_steps}
    with _on_domain(model, domain):
        for start in range(0, labels_t.shape[0], batch_size):
            x = _as_input(images[start : start + batch_size], device)
            y = labels_t[start : start + batch_size].to(device)
            with torch.no_grad():
                correct["clean"] += int((model(x).argmax(1) == y).sum())
            for k in pgd_steps:
                x_adv = pgd_attack(model, x, y, eps=eps, step_size=step_size, steps=k, generator=generators[k])
                with torch.no_grad():
                    correct[f"pgd{k}"] += int((model(x_adv).argmax(1) == y).sum())
    n = labels_t.shape[0]
    return {"n": n, "domain": domain, **{k: v / n for k, v in correct.items()}}


def config_dict(cfg: AdvTrainConfig) -> dict[str, Any]:
    return asdict(cfg)
