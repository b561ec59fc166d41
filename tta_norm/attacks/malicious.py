"""Malicious test samples against test-time adaptation: the distribution-invading attack (DIA).

Threat model (Wu et al., "Uncovering Adversarial Risks of Test-Time Adaptation", ICML 2023; the same scheme
as MedBN's evaluation, Park et al., CVPR 2024):

* A test batch of ``B`` samples; the attacker controls the **last** ``m`` of them (the malicious samples) and
  knows everything else: the benign samples and their labels, the model, the adaptation method and its
  current state (white box).  The benign samples are never modified.
* The malicious samples are optimised by signed-gradient PGD (Madry et al., ICLR 2018): step ``1/255``,
  ``100`` steps, initialised at flat grey ``127.5/255`` (or uniformly at random in the budget, or at the
  attacker's own clean images).  The budget is an L-infinity ball of radius ``eps`` around the attacker's own
  clean images, intersected with ``[0, 1]``; ``eps=1`` is unbounded (the papers' setting).
* Two separate choices (:class:`MaliciousAttack`):

  - ``victim``: what the victim's prediction of the batch is.  ``"updated"`` (DIA's ``cifar_test_attack.py``
    and MedBN's ``attack_adaptive.py``): the victim takes its adaptation step on the poisoned batch, then
    **predicts the batch again** with the updated parameters.  ``"adapting"``: the logits of the forward that
    adapts (what a TENT-style wrapper returns).  For statistics-only presets the two are the same forward.
  - ``attacker``: what the attacker differentiates.  ``"surrogate"`` (DIA, MedBN): the adapted forward on the
    whole batch, every adaptive norm layer computing its statistics from the poisoned batch (the median of
    ``medbn`` by its subgradient), without differentiating through the gradient update.  ``"unrolled"``: through
    one differentiable TENT step, see :func:`unrolled_logits`.

  The no-attack reference is always computed exactly like the attacked prediction (same ``victim`` rule, from
  the same state), so with zero malicious samples nothing counts as changed.  All attacker forwards run under
  :func:`tta_norm.norm.keep_state` and differentiate w.r.t. the malicious pixels only: the victim's state
  (parameters, EMA statistics, optimiser) is never touched.  The surrogate attacker is one copy of the victim
  per attack whose parameters are constants, so ``medbn`` layers take their closed-form input-gradient path
  (:func:`tta_norm.norm.functional.median_batch_norm`; the official code differentiates the textbook formula,
  equal up to float rounding).
* Iterates: DIA and MedBN keep the **last** iterate (``keep_best=False``, the default).  A targeted attack stops
  at the first step whose iterate makes the attacker's forward predict the target and the victim confirm it
  (``stop_on_success``; against an updated victim, or through an unrolled step, on a copy of the victim), and
  the step count is recorded: success is success, and steps-to-success is a measure of its own.  This departs
  from DIA's and MedBN's code, which run every step and score the last iterate (``stop_on_success=False``).
  Indiscriminate and stealthy attacks use the whole budget.  ``ATTACK_PROTOCOLS["dia"]`` names the published
  setting.
* Objectives: ``"targeted"`` (the benign sample at ``target_index`` (0) to label ``(y + 1) mod C``: minimise
  its cross-entropy), ``"indiscriminate"`` (maximise the sum over benign samples of ``clamp(CE, 0, 5)``),
  ``"stealthy"`` (targeted plus ``stealth_weight`` times the mean cross-entropy of the other benign samples
  against their no-attack predictions, which keeps them unchanged).
* Modes (:func:`attack_batch`): ``"instant"``, the deployed model adapts on the clean batch and carries that
  state on (the poison affects one batch); ``"cumulative"``, the poisoned victim state carries on.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from tta_norm._integers import integer_index
from tta_norm._numbers import finite_number
from tta_norm.api import TTAModel
from tta_norm.methods import Tent
from tta_norm.methods.base import softmax_entropy
from tta_norm.norm.convert import keep_state

Objective = Literal["targeted", "indiscriminate", "stealthy"]
Init = Literal["grey", "random", "clean"]
Mode = Literal["instant", "cumulative"]
Victim = Literal["updated", "adapting"]
Attacker = Literal["surrogate", "unrolled"]
OBJECTIVES: tuple[str, ...] = ("targeted", "indiscriminate", "stealthy")
INITS: tuple[str, ...] = ("grey", "random", "clean")
MODES: tuple[str, ...] = ("instant", "cumulative")
VICTIMS: tuple[str, ...] = ("updated", "adapting")
ATTACKERS: tuple[str, ...] = ("surrogate", "unrolled")
GREY = 127.5 / 255

#: Named attack protocols: the fields of :class:`MaliciousAttack` each one fixes.  ``dia``: DIA's and MedBN's
#: evaluation code (updated victim, surrogate attacker, last iterate); ``unrolled``: the same victim attacked
#: white-box through one unrolled TENT step.
ATTACK_PROTOCOLS: dict[str, dict[str, Any]] = {
    "dia": {"victim": "updated", "attacker": "surrogate", "keep_best": False},
    "unrolled": {"victim": "updated", "attacker": "unrolled", "keep_best": False},
}


def malicious_count(fraction: float, batch_size: int) -> int:
    """``fraction`` of ``batch_size`` rounded half up (0.05 of 50 is 3), the malicious count of an attack.

    The fraction is taken as the decimal it is written as (0.29 of 50 is 14.5, hence 15: the binary float
    0.28999... would round down)."""
    return int(math.floor(Fraction(repr(float(fraction))) * batch_size + Fraction(1, 2)))


@dataclass(frozen=True)
class MaliciousAttack:
    """Settings of the DIA attack (defaults: MedBN's/DIA's CIFAR setting; see the module docstring).

    ``num_malicious`` (a count) or ``fraction`` (of the batch, rounded to the nearest count) sets ``m``.
    ``eps`` is the L-infinity radius on the ``[0, 1]`` scale around the attacker's clean images (``1``:
    unbounded).  ``clamp_ce`` is the cap of the indiscriminate per-sample loss.  ``victim`` / ``attacker``: see
    the module docstring (defaults: the ``dia`` protocol).  ``keep_best`` returns the iterate with the best
    attacker loss instead of the last one.  ``stop_on_success``: a targeted attack ends at the first step whose
    attacker forward hits the target and the victim confirms it.
    """

    objective: Objective = "targeted"
    num_malicious: int | None = None
    fraction: float | None = None
    eps: float = 1.0
    step_size: float = 1 / 255
    steps: int = 100
    init: Init = "grey"
    target_index: int = 0
    stealth_weight: float = 1.0
    clamp_ce: float = 5.0
    keep_best: bool = False
    victim: Victim = "updated"
    attacker: Attacker = "surrogate"
    stop_on_success: bool = True

    @classmethod
    def from_protocol(cls, protocol: str, **fields: Any) -> MaliciousAttack:
        """The attack of a named protocol (:data:`ATTACK_PROTOCOLS`); ``fields`` set the rest.

        A field the protocol fixes may not be given again with another value."""
        if protocol not in ATTACK_PROTOCOLS:
            raise ValueError(f"unknown attack protocol {protocol!r}; choose one of {sorted(ATTACK_PROTOCOLS)}")
        fixed = ATTACK_PROTOCOLS[protocol]
        clash = sorted(k for k in fields if k in fixed and fields[k] != fixed[k])
        if clash:
            raise ValueError(f"protocol {protocol!r} fixes {clash}; drop them or choose no protocol")
        return cls(**{**fields, **fixed})

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; choose one of {OBJECTIVES}")
        if self.init not in INITS:
            raise ValueError(f"unknown init {self.init!r}; choose one of {INITS}")
        if self.victim not in VICTIMS:
            raise ValueError(f"victim must be one of {VICTIMS}, got {self.victim!r}")
        if self.attacker not in ATTACKERS:
            raise ValueError(f"attacker must be one of {ATTACKERS}, got {self.attacker!r}")
        for name in ("steps", "target_index", *(("num_malicious",) if self.num_malicious is not None else ())):
            if integer_index(getattr(self, name)) is None:
                raise ValueError(f"{name} must be an integer, got {getattr(self, name)!r}")
        for name in ("eps", "step_size", "stealth_weight", "clamp_ce", *(("fraction",) if self.fraction is not None
                                                                           else ())):  # fmt: skip
            finite_number(name, getattr(self, name))
        if (self.num_malicious is None) == (self.fraction is None):
            raise ValueError("give exactly one of num_malicious (a count) or fraction (of the batch)")
        if self.num_malicious is not None and self.num_malicious < 0:
            raise ValueError(f"num_malicious must be >= 0, got {self.num_malicious}")
        if self.fraction is not None and not 0.0 <= self.fraction < 1.0:
            raise ValueError(f"fraction must be in [0, 1), got {self.fraction}")
        if not 0.0 <= self.eps <= 1.0:
            raise ValueError(f"eps must be in [0, 1] (pixels on the [0, 1] scale), got {self.eps}")
        if self.steps < 0 or self.step_size < 0:
            raise ValueError(f"steps and step_size must be >= 0, got {self.steps}, {self.step_size}")
        if self.target_index < 0:
            raise ValueError(f"target_index must be >= 0, got {self.target_index}")
        if self.stealth_weight < 0 or self.clamp_ce <= 0:
            raise ValueError("stealth_weight must be >= 0 and clamp_ce > 0")

    def count(self, batch_size: int) -> int:
        """The number ``m`` of malicious samples in a batch of ``batch_size``; at least one benign sample remains."""
        m = self.num_malicious if self.num_malicious is not None else malicious_count(self.fraction, batch_size)
        benign = batch_size - m
        if benign < 1 or (self.objective != "indiscriminate" and self.target_index >= benign):
            raise ValueError(
                f"{m} malicious samples in a batch of {batch_size} leave {benign} benign samples; the attack needs "
                f"at least one (and target_index {self.target_index} must be a benign index)"
            )
        return m

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class AttackOutcome:
    """One attacked batch.  Benign = the first ``B - m`` samples; errors are fractions over them.

    ``clean_logits``: what the deployed model predicted for the clean batch (no attack); ``attacked_logits``:
    what the victim predicted for the poisoned batch.  ``target_success`` (targeted/stealthy objectives):
    the victim predicts the target label for the target sample.  ``changed``: fraction of the benign samples
    (target excluded for targeted objectives) whose prediction differs from the no-attack prediction.
    ``steps``: PGD steps taken (fewer than the budget when a targeted attack succeeded early).
    """

    x_malicious: Tensor
    clean_logits: Tensor
    attacked_logits: Tensor
    num_malicious: int
    benign_error_clean: float
    benign_error_attacked: float
    changed: float
    target_label: int | None
    target_success: bool | None
    target_clean_hit: bool | None
    final_loss: float
    linf: float
    steps: int

    def metrics(self) -> dict[str, Any]:
        """JSON-friendly per-batch numbers (no tensors)."""
        return {
            "num_malicious": self.num_malicious,
            "benign_error_clean": self.benign_error_clean,
            "benign_error_attacked": self.benign_error_attacked,
            "changed": self.changed,
            "target_label": self.target_label,
            "target_success": self.target_success,
            "target_clean_hit": self.target_clean_hit,
            "final_loss": self.final_loss,
            "linf": self.linf,
            "steps": self.steps,
        }


# ---------------------------------------------------------------------------------------------------------
def _check_batch(tta: TTAModel, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    if not isinstance(tta, TTAModel):
        raise TypeError(f"the victim must be a TTAModel built by tta_norm.adapt, got {type(tta).__name__}")
    if tta.window is not None:
        raise ValueError("the malicious-sample attack assumes window=None (the batch is the normalisation set)")
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise TypeError("x must be a floating-point batch (N, C, ...) with pixels in [0, 1]")
    if not isinstance(y, Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0] or y.is_floating_point():
        raise ValueError(f"y must be integer labels of shape ({x.shape[0]},), got {getattr(y, 'shape', y)}")
    if y.numel() and int(y.min()) < 0:
        raise ValueError(f"labels must be class indices >= 0, got {int(y.min())}")
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError("the batch contains NaN or Inf pixels")
    if x.numel() and (float(x.min()) < 0.0 or float(x.max()) > 1.0):
        raise ValueError("pixels must be in [0, 1] (the attack budget and clipping are on that scale)")
    device = tta.device
    return x.to(device), y.to(device)


def project_linf(x_adv: Tensor, x_ref: Tensor, eps: float) -> Tensor:
    """Project onto ``{x : |x - x_ref|_inf <= eps} intersected with [0, 1]`` (elementwise)."""
    return torch.minimum(torch.maximum(x_adv, x_ref - eps), x_ref + eps).clamp(0.0, 1.0)


def init_malicious(x_own: Tensor, attack: MaliciousAttack, generator: torch.Generator | None = None) -> Tensor:
    """The PGD starting point of the malicious samples (``x_own``: the attacker's clean images), in the budget.

    Random init draws ``U(-eps, eps)`` on the CPU generator (device-independent) before projection.
    """
    if attack.init == "clean":
        start = x_own.clone()
    elif attack.init == "grey":
        start = torch.full_like(x_own, GREY)
    else:
        noise = torch.rand(x_own.shape, generator=generator, dtype=x_own.dtype) * 2 - 1
        start = x_own + attack.eps * noise.to(x_own.device)
    return project_linf(start, x_own, attack.eps)


def attack_loss(
    logits: Tensor, y: Tensor, num_benign: int, attack: MaliciousAttack, keep_labels: Tensor | None = None
) -> Tensor:
    """The attacker's objective, to be **minimised** (indiscriminate: the negative clamped CE sum).

    ``logits``: the whole batch's; ``y``: the benign labels (length ``num_benign``); ``keep_labels``: the
    no-attack predictions of the benign samples (stealthy objective).
    """
    benign = logits[:num_benign]
    if attack.objective == "indiscriminate":
        ce = F.cross_entropy(benign, y[:num_benign], reduction="none")
        return -ce.clamp(0.0, attack.clamp_ce).sum()
    t = attack.target_index
    target = (y[t : t + 1] + 1) % logits.shape[1]
    loss = F.cross_entropy(benign[t : t + 1], target)
    if attack.objective == "stealthy" and num_benign > 1 and attack.stealth_weight > 0:
        if keep_labels is None:
            raise ValueError("the stealthy objective needs the benign samples' no-attack predictions")
        others = torch.ones(num_benign, dtype=torch.bool, device=logits.device)
        others[t] = False
        loss = loss + attack.stealth_weight * F.cross_entropy(benign[others], keep_labels[others])
    return loss


def unrolled_logits(tta: TTAModel, x: Tensor) -> Tensor:
    """Logits of ``x`` after one differentiable TENT step on ``x`` (``attacker="unrolled"``).

    The entropy gradient w.r.t. the norm affine parameters is taken with ``create_graph=True`` and the
    optimiser's update is written out functionally, from its current state, with
    :func:`torch.func.functional_call`: SGD (momentum, dampening, weight decay, Nesterov) exactly; Adam exactly
    too (bias-corrected moments, L2 weight decay), except that ``sqrt(v)`` is taken of ``max(v, 1e-30)`` to keep
    the derivative finite.  At Adam's first step the update is ``lr * g / (|g| + eps)``, about ``lr * sign(g)``,
    whose derivative w.r.t. ``g`` is nearly zero: the attack then effectively differentiates the post-step
    forward with the update held fixed.  Other methods (EATA, SAR) are not unrolled: their updates have
    sample selection and SAM steps; the attacker then uses the adapting forward (DIA's surrogate).
    """
    with keep_state(tta.model), tta.layer_frame(x.shape[0]):  # its two forwards would update EMA statistics
        return _unrolled_logits(tta, x)


def check_unrollable(tta: TTAModel) -> None:
    """Refuse a TENT whose update :func:`unrolled_logits` does not write out exactly: several steps per batch,
    several parameter groups, an optimiser other than plain SGD or Adam (AMSGrad, decoupled weight decay,
    ``maximize``)."""
    method = tta.method
    if not isinstance(method, Tent):
        return
    opt = method.optimizer
    group = opt.param_groups[0]
    if method.steps != 1:
        problem = f"it takes {method.steps} steps per batch"
    elif len(opt.param_groups) != 1:
        problem = f"its optimiser has {len(opt.param_groups)} parameter groups"
    elif type(opt) not in (torch.optim.SGD, torch.optim.Adam):
        problem = f"its optimiser is {type(opt).__name__}"
    elif group.get("maximize") or group.get("amsgrad") or group.get("decoupled_weight_decay"):
        problem = "its optimiser uses " + ", ".join(k for k in ("maximize", "amsgrad", "decoupled_weight_decay")
                                                   if group.get(k))  # fmt: skip
    else:
        return
    raise ValueError(f"attacker='unrolled' writes out one step of plain SGD or Adam, but this TENT's update differs "
                     f"({problem}); use attacker='surrogate'")  # fmt: skip


def _unrolled_logits(tta: TTAModel, x: Tensor) -> Tensor:
    method = tta.method
    if not isinstance(method, Tent):
        return tta.model(x)
    check_unrollable(tta)
    names = [n for n, _ in method.named_params]
    params = [p for _, p in method.named_params]
    logits = tta.model(x)
    loss = softmax_entropy(logits).mean(0)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    opt = method.optimizer
    group = opt.param_groups[0]
    new: dict[str, Tensor] = {}
    for name, p, g in zip(names, params, grads, strict=True):
        state = opt.state.get(p, {})
        lr, wd = group["lr"], group.get("weight_decay", 0.0)
        if wd:
            g = g + wd * p
        if isinstance(opt, torch.optim.Adam):
            b1, b2 = group["betas"]
            step = float(state["step"]) + 1 if "step" in state else 1.0
            m = b1 * state["exp_avg"] + (1 - b1) * g if "exp_avg" in state else (1 - b1) * g
            v = b2 * state["exp_avg_sq"] + (1 - b2) * g * g if "exp_avg_sq" in state else (1 - b2) * g * g
            m_hat = m / (1 - b1**step)
            v_hat = v / (1 - b2**step)
            new[name] = p - lr * m_hat / (v_hat.clamp_min(1e-30).sqrt() + group["eps"])
        elif isinstance(opt, torch.optim.SGD):
            mom, damp = group.get("momentum", 0.0), group.get("dampening", 0.0)
            d = g
            if mom:
                buf = state.get("momentum_buffer")
                d = g if buf is None else mom * buf + (1 - damp) * g
                if group.get("nesterov", False):
                    d = g + mom * d
            new[name] = p - lr * d
        else:  # pragma: no cover - refused by check_unrollable
            raise TypeError(f"cannot unroll optimizer {type(opt).__name__}; use attacker='surrogate'")
    return functional_call(tta.model, new, (x,), strict=False)


def _unrolls(tta: TTAModel, attack: MaliciousAttack) -> bool:
    return attack.attacker == "unrolled" and tta.method is not None


def _attacker_logits(tta: TTAModel, x: Tensor, attack: MaliciousAttack) -> Tensor:
    return unrolled_logits(tta, x) if _unrolls(tta, attack) else tta.differentiable_forward(x)


def victim_predict(victim: TTAModel, x: Tensor, attack: MaliciousAttack) -> Tensor:
    """The victim adapts on ``x`` and predicts it: the adapting forward (``attack.victim="adapting"``), or the
    batch predicted again with the updated state (``"updated"``; the same forward for statistics-only presets).

    Used for the attacked prediction and for the no-attack reference alike."""
    with torch.enable_grad() if victim.method is not None else torch.no_grad():
        logits = victim(x)
    if attack.victim == "updated" and victim.method is not None:
        with torch.no_grad(), keep_state(victim.model), victim.layer_frame(x.shape[0]):
            logits = victim.model(x)
    return logits.detach()


def _target_hit(logits: Tensor, y: Tensor, attack: MaliciousAttack) -> bool:
    t = attack.target_index
    return bool(logits[t].argmax() == (y[t] + 1) % logits.shape[1])


def _confirmed_on_victim(tta: TTAModel, x: Tensor, y: Tensor, attack: MaliciousAttack) -> bool:
    """Whether the victim, adapting on ``x`` from the current state of ``tta``, predicts the target label."""
    if tta.method is None or (attack.victim == "adapting" and not _unrolls(tta, attack)):
        return True  # the attacker's forward is the victim's prediction
    trial = copy.deepcopy(tta)
    return _target_hit(victim_predict(trial, x, attack), y, attack)


def _surrogate(tta: TTAModel) -> TTAModel:
    """The surrogate attacker: a copy of ``tta`` whose parameters are constants (it differentiates w.r.t. the
    malicious pixels only, and adaptive layers then take their input-gradient paths)."""
    attacker = copy.deepcopy(tta)
    attacker.model.requires_grad_(False)
    return attacker


class Crafted(NamedTuple):
    """What :func:`craft_malicious` returns: the malicious samples, the attacker's final loss, the steps taken."""

    x_malicious: Tensor
    loss: float
    steps: int


def craft_malicious(
    tta: TTAModel,
    x: Tensor,
    y: Tensor,
    attack: MaliciousAttack,
    *,
    generator: torch.Generator | None = None,
    keep_labels: Tensor | None = None,
    progress: bool = False,
) -> Crafted:
    """PGD on the last ``m`` samples of ``x`` against ``tta`` in its **current** state.

    The state of ``tta`` is not changed (attacker forwards under ``keep_state``, gradients w.r.t. the malicious
    pixels only, no optimiser step).  The victim must be about to use this state: :func:`attack_batch` handles
    episodic/``reset_every`` resets.  ``y`` are the true labels (the attacker knows the benign labels).
    """
    x, y = _check_batch(tta, x, y)
    m = attack.count(x.shape[0])
    nb = x.shape[0] - m
    x_own = x[nb:]
    x_mal = init_malicious(x_own, attack, generator)
    if m == 0:
        return Crafted(x_mal, float("nan"), 0)
    benign = x[:nb].detach()
    attacker = tta if _unrolls(tta, attack) else _surrogate(tta)
    best, best_loss = x_mal.clone(), math.inf
    sign = -1.0  # every objective is minimised
    stop_early = attack.stop_on_success and attack.objective == "targeted"
    from tqdm.auto import tqdm

    with keep_state(attacker.model), torch.enable_grad(), torch.inference_mode(False):
        for step in tqdm(range(attack.steps), desc="DIA", leave=False, disable=not progress):
            x_mal.requires_grad_(True)
            logits = _attacker_logits(attacker, torch.cat([benign, x_mal]), attack)
            loss = attack_loss(logits, y, nb, attack, keep_labels)
            (grad,) = torch.autograd.grad(loss, [x_mal])
            value = float(loss.detach())
            x_mal = x_mal.detach()
            if stop_early and _target_hit(logits.detach(), y, attack):
                if _confirmed_on_victim(tta, torch.cat([benign, x_mal]), y, attack):
                    return Crafted(x_mal, value, step)
            if attack.keep_best and value < best_loss:
                best, best_loss = x_mal.clone(), value
            grad = torch.nan_to_num(grad)
            x_mal = project_linf(x_mal + sign * attack.step_size * grad.sign(), x_own, attack.eps)
        with torch.enable_grad() if _unrolls(tta, attack) else torch.no_grad():
            logits = _attacker_logits(attacker, torch.cat([benign, x_mal]), attack)
            value = float(attack_loss(logits, y, nb, attack, keep_labels).detach())
        if value < best_loss or not attack.keep_best:
            best, best_loss = x_mal.clone(), value
    return Crafted(best.detach(), best_loss, attack.steps)


def copy_state(dst: TTAModel, src: TTAModel) -> None:
    """Make ``dst`` carry the adaptation state of ``src`` (:meth:`TTAModel.state` / :meth:`TTAModel.load_state`):
    parameters, buffers, optimiser state, method state and the wrapper's counters; the window buffer is not
    carried (a victim predicts the attacked batch on its own)."""
    state = src.state()
    state["window"] = None
    dst.load_state(state)


def attack_batch(
    tta: TTAModel,
    x: Tensor,
    y: Tensor,
    attack: MaliciousAttack,
    *,
    mode: Mode = "instant",
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> AttackOutcome:
    """Attack one batch of the deployed model ``tta`` and advance its state as the threat model says.

    ``x`` (pixels in ``[0, 1]``) and ``y``: the batch and its true labels; the last ``m`` samples are the
    attacker's.  Steps: (1) a victim copy of ``tta`` is taken (once per batch); (2) ``tta`` adapts on the
    clean batch (the no-attack reference); (3) the malicious samples are crafted against the victim's state;
    (4) the victim adapts on the poisoned batch and predicts it.  ``mode="instant"``: ``tta`` keeps the state
    of step 2; ``"cumulative"``: ``tta`` takes the victim's poisoned state (parameters, statistics, optimiser,
    method state, counters).  A call that fails leaves ``tta`` as it was.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    x, y = _check_batch(tta, x, y)
    if _unrolls(tta, attack):
        check_unrollable(tta)
    m = attack.count(x.shape[0])
    nb = x.shape[0] - m
    victim = copy.deepcopy(tta)
    before = tta.state()
    try:
        clean_logits = victim_predict(tta, x, attack)
        if int(y.max()) >= clean_logits.shape[1]:
            raise ValueError(f"label {int(y.max())} is not a class of the model's {clean_logits.shape[1]} outputs")
        keep_labels = clean_logits[:nb].argmax(1)
        if victim.will_reset:
            victim.reset()
            victim.num_adapted = 0
        crafted = craft_malicious(victim, x, y, attack, generator=generator, keep_labels=keep_labels,
                                  progress=progress)  # fmt: skip
        x_mal = crafted.x_malicious
        attacked_logits = victim_predict(victim, torch.cat([x[:nb], x_mal]), attack)
        if mode == "cumulative":
            copy_state(tta, victim)
    except BaseException:
        before["window"] = None
        tta.load_state(before)
        raise
    pred_clean, pred_att = clean_logits[:nb].argmax(1), attacked_logits[:nb].argmax(1)
    yb = y[:nb]
    targeted = attack.objective != "indiscriminate"
    t = attack.target_index
    others = torch.ones(nb, dtype=torch.bool, device=y.device)
    if targeted:
        others[t] = False
    target_label = int((y[t] + 1) % clean_logits.shape[1]) if targeted else None
    changed = float((pred_clean[others] != pred_att[others]).float().mean()) if bool(others.any()) else 0.0
    return AttackOutcome(
        x_malicious=x_mal,
        clean_logits=clean_logits,
        attacked_logits=attacked_logits,
        num_malicious=m,
        benign_error_clean=float((pred_clean != yb).float().mean()),
        benign_error_attacked=float((pred_att != yb).float().mean()),
        changed=changed,
        target_label=target_label,
        target_success=bool(pred_att[t] == target_label) if targeted else None,
        target_clean_hit=bool(pred_clean[t] == target_label) if targeted else None,
        final_loss=crafted.loss,
        linf=float((x_mal - x[nb:]).abs().max()) if m else 0.0,
        steps=crafted.steps,
    )
