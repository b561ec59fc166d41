"""Adaptive Lp attacks on adapted models: batch-aware PGD, frozen snapshots and AutoAttack.

**What state each attack sees.**

* :func:`pgd_attack` on a :class:`~tta_norm.api.TTAModel` attacks the *deployed function*: the adapted
  forward of the **whole perturbed batch** (every adaptive norm layer takes its statistics from the adversarial
  batch itself, as the deployed model will when it receives it), with the model's **current** adaptation state
  (parameters adapted so far, EMA statistics, SaBN heads), the window's samples included.  It never calls
  ``train()``/``eval()``, never resets the model (a reset that is due is taken on a copy), commits no EMA
  update (:func:`tta_norm.norm.keep_state`) and takes no optimiser step; gradients are taken w.r.t. the input
  only.  (torchattacks switches the model to ``eval()`` during an attack, which for a
  plain BatchNorm model means attacking the source statistics instead of the deployed batch statistics; this
  is the pitfall avoided here.)  Since TENT-style methods return the logits of the forward used for their
  update, this is exactly the prediction the victim makes on the adversarial batch.  On a plain ``nn.Module``
  the module is called as is, in whatever mode it is in.
* :func:`frozen_snapshot` turns an adapted model into a static, per-sample model: each adaptive layer's
  statistics as adapted on a reference batch are frozen into it.  Static attacks (AutoAttack) apply to it; they
  then attack the snapshot, not the adapting model (a grey-box / transfer threat model for the adapting one).
* :func:`run_autoattack` runs AutoAttack (Croce & Hein, ICML 2020) through the optional ``pyautoattack``
  package on a static model (the source model, or a frozen snapshot).

PGD: Madry et al., ICLR 2018 (Linf signed steps; L2 normalised steps), projected onto the ball and ``[0, 1]``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tta_norm.api import TTAModel
from tta_norm.norm.adaptive import AdaptiveNorm, adaptive_layers
from tta_norm.norm.convert import keep_state
from tta_norm.norm.functional import layer_statistics
from tta_norm.norm.norm_act import AdaptiveNormAct
from tta_norm.norm.probe import record_inputs

Norm = Literal["Linf", "L2"]


def _flat_norm(t: Tensor) -> Tensor:
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def project(x_adv: Tensor, x: Tensor, eps: float, norm: Norm) -> Tensor:
    """Project ``x_adv`` onto the ``norm`` ball of radius ``eps`` around ``x`` (per sample), then onto ``[0, 1]``."""
    delta = x_adv - x
    if norm == "Linf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * torch.clamp(eps / (_flat_norm(delta) + 1e-12), max=1.0)
    return (x + delta).clamp(0.0, 1.0)


def deployed_forward(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """The function a PGD attack differentiates: see the module docstring.  For a ``TTAModel`` it is
    :meth:`~tta_norm.api.TTAModel.differentiable_forward` (the window's samples included, the input moved to the
    model's device and dtype), from the state the deployed model will adapt from: a copy of it reset first when
    a reset is due (``episodic``, ``reset_every``)."""
    if isinstance(model, TTAModel):
        deployed = model
        if model.will_reset:
            deployed = copy.deepcopy(model)
            deployed.reset()
        return deployed.differentiable_forward
    return model


def pgd_attack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    norm: Norm = "Linf",
    eps: float = 8 / 255,
    step_size: float = 2 / 255,
    steps: int = 10,
    random_start: bool = True,
    generator: torch.Generator | None = None,
    target: Tensor | None = None,
) -> Tensor:
    """Batch-aware PGD on the whole batch ``x`` (pixels in ``[0, 1]``); returns the adversarial batch.

    Maximises the summed cross-entropy of ``y`` (or, with ``target``, minimises that of ``target``) through
    :func:`deployed_forward`: for a ``TTAModel`` the adapted forward of the perturbed batch in its current
    state, which the attack does not change.  ``Linf``: signed steps; ``L2``: steps along the per-sample
    normalised gradient.  Random start: uniform in the Linf ball, or a uniformly random direction with a
    radius uniform in ``[0, eps]`` for L2, drawn on the CPU generator ``generator``.
    """
    if norm not in ("Linf", "L2"):
        raise ValueError(f"norm must be 'Linf' or 'L2', got {norm!r}")
    if eps < 0 or step_size < 0 or steps < 0:
        raise ValueError("eps, step_size and steps must be >= 0")
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2 or x.shape[0] == 0:
        raise ValueError("x must be a non-empty floating-point batch (N, C, ...) with pixels in [0, 1]")
    if not bool(torch.isfinite(x).all()) or float(x.min()) < 0 or float(x.max()) > 1:
        raise ValueError("x must be a floating-point batch with pixels in [0, 1] (no NaN or Inf)")
    for name, labels in (("y", y), ("target", target)):
        if labels is not None and (not isinstance(labels, Tensor) or labels.is_floating_point()
                                   or tuple(labels.shape) != (x.shape[0],)):  # fmt: skip
            raise ValueError(f"{name} must be integer labels of shape ({x.shape[0]},), got "
                             f"{getattr(labels, 'shape', labels)}")  # fmt: skip
    forward = deployed_forward(model)
    x = x.detach()
    if random_start and eps > 0:
        if norm == "Linf":
            noise = (torch.rand(x.shape, generator=generator) * 2 - 1) * eps
        else:
            direction = torch.randn(x.shape, generator=generator)
            direction = direction / _flat_norm(direction)
            noise = direction * eps * torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), generator=generator)
        x_adv = project(x + noise.to(x.device, x.dtype), x, eps, norm)
    else:
        x_adv = x.clone()
    sign = -1.0 if target is not None else 1.0
    labels = target if target is not None else y
    with torch.enable_grad(), torch.inference_mode(False):
        for _ in range(steps):
            x_adv.requires_grad_(True)
            logits = forward(x_adv)
            loss = F.cross_entropy(logits, labels.to(logits.device), reduction="sum")
            (grad,) = torch.autograd.grad(loss, [x_adv])
            grad = torch.nan_to_num(grad.detach())
            if norm == "Linf":
                step = grad.sign()
            else:
                step = grad / (_flat_norm(grad) + 1e-12)
            x_adv = project(x_adv.detach() + sign * step_size * step, x, eps, norm)
    return x_adv.detach()


def frozen_snapshot(tta: TTAModel, x_ref: Tensor) -> nn.Module:
    """A static copy of the adapted model: each layer's statistics on ``x_ref`` frozen in as source statistics.

    The copy's adaptive layers use ``mixing="source"`` with the statistics the adapted model would normalise
    ``x_ref`` with (after mixing and EMA, before any per-instance refinement, which stays per sample); the
    adapted affine parameters are copied.  The result no longer depends on batch composition: a static model
    for AutoAttack or transfer attacks.  ``tta`` itself is not changed.
    """
    model = copy.deepcopy(tta.model)
    named = list(adaptive_layers(model))
    with torch.no_grad(), keep_state(model), record_inputs(model, Tensor.detach) as captured:
        model(x_ref.to(next(model.parameters()).device))
    for name, layer in named:
        spec = layer.spec
        stats, _ = layer_statistics(
            captured[name], spec.replace(instance="none"), layer.source_stats(), ema_state=layer.ema_state(),
            mix_weight=getattr(layer, "mix_weight", None), use_batch=True,
            samples=x_ref.shape[0] if spec.pseudo_count is not None else None,
        )  # fmt: skip
        # a norm + act layer keeps its dropout and activation modules
        extra = {"drop": layer.drop, "act": layer.act} if isinstance(layer, AdaptiveNormAct) else {}
        frozen = (AdaptiveNormAct if extra else AdaptiveNorm)(
            layer.num_features, spec.replace(mixing="source", alpha=None, channelwise=False), eps=layer.eps,
            affine=layer.weight is not None, source_mean=stats.mean, source_var=stats.var,
            expected_dims=layer.expected_dims, name=layer.name, device=stats.mean.device, dtype=stats.mean.dtype,
            **extra,
        )  # fmt: skip
        with torch.no_grad():
            for pname, param in frozen.named_parameters():
                if hasattr(layer, pname) and getattr(layer, pname) is not None:
                    param.copy_(getattr(layer, pname))
        frozen.domain = layer.domain
        model.set_submodule(name, frozen)
    return model.requires_grad_(False)


def run_autoattack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float = 8 / 255,
    norm: str = "Linf",
    version: str = "standard",
    batch_size: int = 250,
    seed: int | None = 0,
    device: torch.device | str | None = None,
    attacks: list[str] | None = None,
) -> tuple[Tensor, Tensor]:
    """AutoAttack (Croce & Hein, ICML 2020) via the optional ``pyautoattack`` package; returns ``(x_adv, y_adv)``.

    For static models only (the source model or a :func:`frozen_snapshot`): AutoAttack evaluates in
    sub-batches of ``batch_size``, so an adapting model would see other batches than the deployed one.  The
    model is called as is (pyautoattack does not switch modes).  ``pyautoattack`` 0.2's API is keyword-only,
    takes ``batch_size=`` and always returns a tuple.
    """
    if isinstance(model, TTAModel):
        raise TypeError("AutoAttack needs a static model; pass tta.model's frozen_snapshot(tta, x) or the source model")
    try:
        from pyautoattack import AutoAttack
    except ImportError as err:  # optional dependency
        raise ImportError("run_autoattack needs the optional package pyautoattack: pip install pyautoattack") from err
    if device is None:
        device = next(model.parameters()).device
    kwargs: dict[str, Any] = {"norm": norm, "eps": eps, "version": version, "seed": seed, "device": device}
    if attacks is not None:
        kwargs["attacks"] = attacks
    adversary = AutoAttack(model, **kwargs)
    # contiguous: pyautoattack 0.2 calls .view() on input gradients, which fails for e.g. channels-last inputs
    result = adversary.run_standard_evaluation(x.contiguous(), y, batch_size=batch_size)
    if not isinstance(result, tuple):  # pragma: no cover - older builds returned the tensor alone
        return result, model(result).argmax(1)
    return result[0], result[1]


def threat_model(
    *, attack: str, norm: str, eps: float, batch_size: int, attacker_fraction: float, box: str, state: str
) -> str:
    """A one-paragraph threat-model statement for reports (batch composition, fraction, box, epsilon, state)."""
    eps_txt = f"{eps * 255:.3g}/255" if norm == "Linf" else f"{eps:.3g}"
    return (
        f"{attack}: {norm} eps = {eps_txt} on [0, 1] pixels; test batches of {batch_size}, attacker perturbs "
        f"{attacker_fraction:.0%} of each batch; {box} box; model state attacked: {state}."
    )
