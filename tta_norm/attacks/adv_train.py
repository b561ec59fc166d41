"""PGD adversarial training with BN, AuxBN or SaAuxBN (Madry et al., ICLR 2018; Gong et al., WACV 2022).

Recipe (SaBN's ``Adv`` code, see ``REFERENCE.md`` part 2 section 3): PGD-7, Linf ``eps = 8/255``, step
``2/255``, random start; loss ``0.5 * [CE(f(x; branch 0), y) + CE(f(x_adv; branch 1), y)]`` with the
adversarial examples generated through the adversarial branch.  ``kind="bn"`` uses the same loss with one shared
BN (the baseline: only the normalisation differs); ``"aux"`` / ``"saaux"`` convert every ``BatchNorm2d`` with
:func:`tta_norm.layers.convert_to_aux_bn` first (starting equal to the source model on both branches).

Conventions: adversarial examples are crafted as the official SaBN code crafts them, with the model in ``train()``
mode (``craft_mode="train"``, default): every PGD forward normalises with the batch statistics of the branch and
moves its running statistics, so the adversarial branch's statistics see the adversarial examples;
``craft_mode="eval"`` crafts against the branch's running statistics and leaves them alone.  The loss is computed
in ``train()`` mode.  Augmentation: per-sample horizontal flips and per-sample random crop offsets after 4-pixel
zero padding (vectorised).  Evaluation
(:func:`evaluate_robustness`): clean and PGD-k accuracy (random start) per branch, in ``eval()`` mode.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tta_norm.attacks.lp import pgd_attack
from tta_norm.data.tensors import to_float_nchw
from tta_norm.layers.aux_batch_norm import branch_layers, convert_to_aux_bn, use_branch

KINDS = ("bn", "aux", "saaux")


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
    craft_mode: str = "train"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.craft_mode not in ("train", "eval"):
            raise ValueError(f"craft_mode must be 'train' (as the official code) or 'eval', got {self.craft_mode!r}")
        if self.epochs < 1 or self.batch_size < 2 or self.steps < 0:
            raise ValueError("epochs >= 1, batch_size >= 2 and steps >= 0 are required")


def _branch(model: nn.Module, branch: int | None):
    import contextlib

    return use_branch(model, branch) if branch is not None and branch_layers(model) else contextlib.nullcontext()


def _to_float(images: np.ndarray | Tensor, device: torch.device) -> Tensor:
    t = torch.as_tensor(images).to(device)
    if t.dtype == torch.uint8 and t.shape[-1] == 3:
        return to_float_nchw(t)
    if t.dtype == torch.uint8:
        t = t.float().div(255)
    return t.permute(0, 3, 1, 2).contiguous() if t.shape[-1] == 3 else t


def augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """Per-sample horizontal flips and per-sample random crop offsets (zero padding 4), as RandomCrop(32, 4) +
    RandomHorizontalFlip draw them for each image."""
    n, _, h, w = x.shape
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device).view(-1, 1, 1, 1)
    x = torch.where(flip, x.flip(3), x)
    dy, dx = torch.randint(0, 9, (2, n), generator=generator).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # (n, h, 1)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]  # (n, 1, w)
    padded = F.pad(x, (4, 4, 4, 4))
    picked = padded[torch.arange(n, device=x.device)[:, None, None], :, rows, cols]  # (n, h, w, c)
    return picked.permute(0, 3, 1, 2).contiguous()


def craft(model: nn.Module, x: Tensor, y: Tensor, cfg: AdvTrainConfig, generator: torch.Generator,
          branch: int | None = 1) -> Tensor:  # fmt: skip
    """PGD-``steps`` Linf examples through ``branch``, in ``train()`` or ``eval()`` mode by ``cfg.craft_mode``
    (then the mode is restored)."""
    was_training = model.training
    model.train(cfg.craft_mode == "train")
    try:
        with _branch(model, branch):
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

    ``images``: uint8 NHWC (or float NCHW in ``[0, 1]``); ``labels``: int.  Returns the model and per-step
    history (loss, clean and adversarial training accuracy of the batch).
    """
    from tqdm.auto import tqdm

    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    if cfg.kind != "bn":
        convert_to_aux_bn(model, cfg.kind)
        model.to(device)
    g = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    n = labels_t.shape[0]
    steps_per_epoch = n // cfg.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"{n} training images are fewer than one batch of {cfg.batch_size}")
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs * steps_per_epoch)
    clean_branch, adv_branch = (None, None) if cfg.kind == "bn" else (0, 1)
    history = []
    bar = tqdm(total=cfg.epochs * steps_per_epoch, desc=f"adv-train {cfg.kind}", disable=not progress)
    for _ in range(cfg.epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(steps_per_epoch):
            idx = perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            x = augment(_to_float(images[idx.numpy()], device), g)
            y = labels_t[idx].to(device)
            x_adv = craft(model, x, y, cfg, g, adv_branch)
            model.train()
            with _branch(model, clean_branch):
                out_clean = model(x)
            with _branch(model, adv_branch):
                out_adv = model(x_adv)
            loss = 0.5 * (F.cross_entropy(out_clean, y) + F.cross_entropy(out_adv, y))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            history.append({"loss": float(loss.detach()), "clean_acc": float((out_clean.argmax(1) == y).float().mean()),
                            "adv_acc": float((out_adv.argmax(1) == y).float().mean())})  # fmt: skip
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1]['loss']:.3f}")
    bar.close()
    return model.eval(), history


def evaluate_robustness(
    model: nn.Module,
    images: np.ndarray | Tensor,
    labels: np.ndarray | Tensor,
    *,
    branch: int | None = None,
    pgd_steps: tuple[int, ...] = (10, 20),
    eps: float = 8 / 255,
    step_size: float = 2 / 255,
    batch_size: int = 250,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Clean and PGD-k accuracy (Linf, random start) of ``model`` in ``eval()`` mode on ``branch``."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    correct = {"clean": 0, **{f"pgd{k}": 0 for k in pgd_steps}}
    g = torch.Generator().manual_seed(seed)
    with _branch(model, branch):
        for start in range(0, labels_t.shape[0], batch_size):
            x = _to_float(images[start : start + batch_size], device)
            y = labels_t[start : start + batch_size].to(device)
            with torch.no_grad():
                correct["clean"] += int((model(x).argmax(1) == y).sum())
            for k in pgd_steps:
                x_adv = pgd_attack(model, x, y, eps=eps, step_size=step_size, steps=k, generator=g)
                with torch.no_grad():
                    correct[f"pgd{k}"] += int((model(x_adv).argmax(1) == y).sum())
    n = labels_t.shape[0]
    return {"n": n, "branch": branch, **{k: v / n for k, v in correct.items()}}


def config_dict(cfg: AdvTrainConfig) -> dict[str, Any]:
    return asdict(cfg)
