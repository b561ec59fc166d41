"""Sandwich BN heads: training on source domains, a per-domain statistics bank, and test-time routing.

SaBN (Gong, Chen, Chen, Wang -- "Sandwich Batch Normalization", WACV 2022) follows the shared BN affine with an
independent affine per domain: ``y = g_k * (gamma * x_hat + beta) + b_k`` (``AdaptiveNorm.domain_weight`` /
``domain_bias``, shape ``(K, C)``, identity init; ``domain=k`` selects head k, ``None`` the shared affine only).

**Training** (:func:`train_sabn`).  The source data is split into ``K`` domains: ``"clean"`` plus groups of
training-time shift augmentations (:mod:`tta_norm.adaptation.augment`; default ``clean, color, blur, noise``).
Batches cycle through the domains (one domain per batch, one magnitude per batch) and are classified with
``domain=k``; the loss is the cross-entropy (Adam, lr 1e-3: with lr 1e-2 the heads overfitted and were worse
than the shared affine alone on held-out images of their own domain).  What is trained: ``"heads"`` (the K
heads), ``"affine"`` (heads + shared gamma/beta, default) or ``"all"`` parameters.  The normalisation
statistics are those of ``preset`` (default ``"sabn"``: the source running statistics, so a head is a learned
per-domain correction of the normalised features -- with fixed statistics a per-channel affine can express any
per-channel re-standardisation; ``"tbn"`` uses batch statistics instead).

**Statistics bank** (:class:`StatsBank`).  For every domain, the pooled mean and variance of the input of every
adaptive norm layer in a *probe* forward pass: the model with the shared affine only (``domain=None``) and no
state commit.  Test batches are probed the same way.

**Routing** (:class:`SaBNRouter`; no public SaBN code routes, all of this is our design):

* ``"oracle"``: the caller passes the true domain index;
* ``"stats"``: the head whose bank entry is nearest to the batch's probe statistics, with the distance
  ``D(batch, k) = sum_layers mean_channels SKL(N(mu_b, var_b) || N(mu_k, var_k))``, the symmetric KL divergence
  ``SKL = (var_b / var_k + var_k / var_b - 2 + (mu_b - mu_k)^2 (1 / var_b + 1 / var_k)) / 2`` between per-channel
  Gaussians (variances + ``eps``);
* ``"entropy"``: the head with the lowest mean prediction entropy on the batch (K extra forward passes);
* ``"open_set"``: as ``"stats"``, but when the nearest distance exceeds ``threshold`` a new head is spawned
  (initialised to the identity, i.e. equal to the shared affine), its bank entry is the batch's statistics,
  and while batches keep routing to it its bank entry follows them (EMA, ``bank_momentum``) and the head is
  adapted online by entropy minimisation (SGD on that head only, ``head_lr``).  Capacity for new heads is
  reserved when the model is built (``max_new_domains``).  The threshold should come from
  :func:`calibrate_threshold` (a quantile of the distances of held-out source batches of each known domain to
  their own entry, at the test batch size); without one, half the smallest distance between two stored domains
  is used, which spawns eagerly.

Probe statistics of very small batches are noisy (at batch size 1 they are one image's spatial statistics,
whose variance is lower than a domain's pooled variance), so stats routing is more reliable at larger batches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tta_norm.adaptation._data import ImageArray, as_image_tensor, as_labels, resolve_device, to_model_input
from tta_norm.adaptation.augment import SHIFT_OPS, ShiftAugment
from tta_norm.norm.adaptive import adaptive_layers
from tta_norm.norm.convert import keep_state, with_domain
from tta_norm.stats.estimators import batch_mean_var

DEFAULT_DOMAINS: tuple[str, ...] = ("clean",) + SHIFT_OPS
RouteMode = Literal["oracle", "stats", "entropy", "open_set"]
ROUTE_MODES: tuple[str, ...] = ("oracle", "stats", "entropy", "open_set")


def parse_domains(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"clean,color"`` -> ``("clean", "color")``; each domain is ``"clean"`` or a shift op, no repeats."""
    domains = tuple(s.strip() for s in (text.split(",") if isinstance(text, str) else text) if s.strip())
    bad = [d for d in domains if d != "clean" and d not in SHIFT_OPS]
    if bad or not domains or len(set(domains)) != len(domains):
        raise ValueError(f"bad SaBN domains {domains}; use distinct names from {('clean',) + SHIFT_OPS}")
    return domains


@dataclass
class SaBNConfig:
    """Hyper-parameters of :func:`train_sabn` (our choices)."""

    domains: tuple[str, ...] = DEFAULT_DOMAINS
    preset: str = "sabn"
    epochs: int = 2
    batch_size: int = 64
    lr: float = 1e-3
    train: Literal["heads", "affine", "all"] = "affine"
    bank_batches: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        self.domains = parse_domains(self.domains)
        if self.train not in ("heads", "affine", "all"):
            raise ValueError(f"train must be 'heads', 'affine' or 'all', got {self.train!r}")
        if self.train == "heads" and len(self.domains) < 2:
            raise ValueError("train='heads' needs at least 2 domains (K = 1 has no heads, only the shared affine)")
        if self.epochs < 0 or self.batch_size < 1 or self.bank_batches < 1 or self.lr <= 0:
            raise ValueError("need epochs >= 0, batch_size >= 1, bank_batches >= 1 and lr > 0")


# ------------------------------------------------------------------------------------------ statistics bank


def symmetric_kl(mean_a: Tensor, var_a: Tensor, mean_b: Tensor, var_b: Tensor, eps: float = 1e-5) -> Tensor:
    """Symmetric KL divergence between Gaussians, elementwise (broadcasting): ``KL(a||b) + KL(b||a)``."""
    va, vb = var_a + eps, var_b + eps
    return 0.5 * (va / vb + vb / va - 2.0 + (mean_a - mean_b).square() * (1.0 / va + 1.0 / vb))


@contextlib.contextmanager
def probe_inputs(model: nn.Module) -> Iterator[dict[str, tuple[Tensor, Tensor]]]:
    """Within the block, every forward records the batch mean and (biased) variance of each adaptive norm
    layer's input, ``{layer name: (mean (C,), var (C,))}``, overwritten by the next forward."""
    found: dict[str, tuple[Tensor, Tensor]] = {}
    handles = []
    for name, layer in adaptive_layers(model):

        def hook(_m, args, _name=name):
            found[_name] = tuple(t.detach() for t in batch_mean_var(args[0]))

        handles.append(layer.register_forward_pre_hook(hook))
    try:
        yield found
    finally:
        for h in handles:
            h.remove()


def probe_statistics(model: nn.Module, x: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    """The probe statistics of a batch: one forward with the shared affine only, no gradient, no state commit."""
    with torch.no_grad(), keep_state(model), with_domain(model, None), probe_inputs(model) as found:
        model(x)
    return dict(found)


@dataclass
class StatsBank:
    """Per-domain probe statistics: ``mean[layer]``, ``var[layer]`` of shape ``(K, C)``."""

    mean: dict[str, Tensor]
    var: dict[str, Tensor]
    names: list[str] = field(default_factory=list)

    @property
    def num_domains(self) -> int:
        return next(iter(self.mean.values())).shape[0] if self.mean else 0

    def distances(self, stats: dict[str, tuple[Tensor, Tensor]]) -> Tensor:
        """``D(batch, k)`` for every stored domain ``k``, shape ``(K,)`` (see the module docstring)."""
        total = None
        for layer, (m, v) in stats.items():
            if layer not in self.mean:
                continue
            bm, bv = self.mean[layer].to(m.device), self.var[layer].to(m.device)
            d = symmetric_kl(m.unsqueeze(0), v.unsqueeze(0), bm, bv).mean(1)
            total = d if total is None else total + d
        if total is None:
            raise ValueError("the statistics share no layer with the bank")
        return total

    def pairwise(self) -> Tensor:
        """``(K, K)`` distances between the stored domains."""
        k = self.num_domains
        out = torch.zeros(k, k)
        for layer in self.mean:
            m, v = self.mean[layer], self.var[layer]
            out += symmetric_kl(m[:, None], v[:, None], m[None], v[None]).mean(-1).cpu()
        return out

    def append(self, stats: dict[str, tuple[Tensor, Tensor]], name: str = "") -> int:
        """Add a domain from probe statistics; returns its index."""
        for layer in self.mean:
            m, v = stats[layer]
            self.mean[layer] = torch.cat([self.mean[layer], m.detach().to(self.mean[layer]).unsqueeze(0)])
            self.var[layer] = torch.cat([self.var[layer], v.detach().to(self.var[layer]).unsqueeze(0)])
        self.names.append(name or f"new{len(self.names)}")
        return self.num_domains - 1

    def update(self, k: int, stats: dict[str, tuple[Tensor, Tensor]], momentum: float) -> None:
        """EMA of domain ``k``'s entry toward ``stats`` (the batch's probe statistics)."""
        for layer in self.mean:
            m, v = stats[layer]
            self.mean[layer][k].lerp_(m.detach().to(self.mean[layer]), momentum)
            self.var[layer][k].lerp_(v.detach().to(self.var[layer]), momentum)

    def clone(self) -> StatsBank:
        return StatsBank({k: v.clone() for k, v in self.mean.items()}, {k: v.clone() for k, v in self.var.items()},
                         list(self.names))  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "var": self.var, "names": list(self.names)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StatsBank:
        return cls(dict(d["mean"]), dict(d["var"]), list(d.get("names", [])))


def pooled(stats_list: list[dict[str, tuple[Tensor, Tensor]]]) -> dict[str, tuple[Tensor, Tensor]]:
    """Pool equal-size batches' statistics: mean of means, and ``mean(var + mean^2) - pooled_mean^2``."""
    out = {}
    for layer in stats_list[0]:
        means = torch.stack([s[layer][0] for s in stats_list])
        vars_ = torch.stack([s[layer][1] for s in stats_list])
        mu = means.mean(0)
        out[layer] = (mu, (vars_ + means.square()).mean(0) - mu.square())
    return out


def collect_bank(
    model: nn.Module,
    images: ImageArray,
    domains: Sequence[str],
    *,
    batches: int = 8,
    batch_size: int = 64,
    seed: int = 0,
    augment: ShiftAugment | None = None,
    device: torch.device | str | None = None,
) -> StatsBank:
    """The statistics bank of ``domains`` from ``batches`` probe batches each (seeded images and magnitudes)."""
    device = resolve_device(device, model)
    images = as_image_tensor(images)
    augment = augment or ShiftAugment()
    gen = torch.Generator().manual_seed(seed + 7)
    mean: dict[str, list[Tensor]] = {}
    var: dict[str, list[Tensor]] = {}
    for dom in domains:
        per_batch = []
        for _ in range(batches):
            idx = torch.randperm(len(images), generator=gen)[:batch_size]
            x = augment.apply(to_model_input(images[idx], device), dom, gen)
            per_batch.append(probe_statistics(model, x))
        for layer, (m, v) in pooled(per_batch).items():
            mean.setdefault(layer, []).append(m.cpu())
            var.setdefault(layer, []).append(v.cpu())
    return StatsBank({k: torch.stack(v) for k, v in mean.items()}, {k: torch.stack(v) for k, v in var.items()},
                     list(domains))  # fmt: skip


def calibrate_threshold(
    model: nn.Module,
    bank: StatsBank,
    images: ImageArray,
    *,
    batch_size: int,
    batches: int = 8,
    quantile: float = 0.95,
    seed: int = 0,
    augment: ShiftAugment | None = None,
    device: torch.device | str | None = None,
) -> float:
    """Open-set threshold: the ``quantile`` of ``D(batch, own domain)`` over ``batches`` held-out batches of
    ``batch_size`` images per known domain (``bank.names`` must be the domains' names)."""
    device = resolve_device(device, model)
    images = as_image_tensor(images)
    augment = augment or ShiftAugment()
    gen = torch.Generator().manual_seed(seed + 11)
    own = []
    for k, dom in enumerate(bank.names):
        for _ in range(batches):
            idx = torch.randperm(len(images), generator=gen)[:batch_size]
            x = augment.apply(to_model_input(images[idx], device), dom, gen)
            own.append(float(bank.distances(probe_statistics(model, x))[k]))
    return float(torch.tensor(own).quantile(quantile))


# -------------------------------------------------------------------------------------------------- training


@dataclass
class SaBNResult:
    """What :func:`train_sabn` returns: the adapted state (CPU), the statistics bank, config and history."""

    state_dict: dict[str, Tensor]
    bank: StatsBank
    config: SaBNConfig
    history: list[dict[str, float]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> Path:
        """``{"state_dict", "meta", "bank"}``; loadable by ``adapt(model, preset, num_domains=K, init_state=path)``
        and :meth:`SaBNRouter.from_file`."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "state_dict": self.state_dict,
            "meta": {**self.meta, "config": dataclasses.asdict(self.config), "history": self.history,
                     "preset": self.config.preset, "domains": list(self.config.domains)},  # fmt: skip
            "bank": self.bank.to_dict(),
        }
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save(payload, tmp)
        os.replace(tmp, path)
        return path


def _trainable(model: nn.Module, what: str) -> list[nn.Parameter]:
    if what == "all":
        return [p for p in model.parameters()]
    params = []
    for _, layer in adaptive_layers(model):
        if layer.spec.num_domains > 1:
            params += [layer.domain_weight, layer.domain_bias]
        if what == "affine" and layer.weight is not None:
            params += [layer.weight, layer.bias]
    if not params:
        raise ValueError(f"nothing to train with train={what!r}")
    return params


def train_sabn(
    model: nn.Module,
    source_images: ImageArray,
    source_labels: Tensor | Sequence[int],
    *,
    config: SaBNConfig | None = None,
    device: torch.device | str | None = None,
    augment: ShiftAugment | None = None,
    progress: bool = True,
    **overrides: Any,
) -> SaBNResult:
    """Train shared + K SaBN heads of a source model (with BatchNorms) on source domains; the model is not modified.

    ``source_images``: uint8 NHWC or float NCHW in [0, 1]; keyword ``overrides`` replace :class:`SaBNConfig`
    fields.  Step ``s`` uses domain ``s mod K`` for its whole batch.  Returns a :class:`SaBNResult` whose
    ``save(path)`` writes the state and the statistics bank."""
    from tqdm.auto import tqdm

    import tta_norm

    config = dataclasses.replace(config or SaBNConfig(), **overrides)
    device = resolve_device(device, model)
    augment = augment or ShiftAugment()
    images = as_image_tensor(source_images)
    y_all = as_labels(source_labels, len(images))
    k_domains = len(config.domains)
    t0 = time.perf_counter()
    tta = tta_norm.adapt(model, config.preset, device=device, num_domains=k_domains)
    net = tta.model
    params = _trainable(net, config.train)
    net.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=config.lr)
    gen = torch.Generator().manual_seed(config.seed)
    steps = math.ceil(len(images) / config.batch_size)
    history = []
    step = 0
    bar = tqdm(total=config.epochs * steps, desc="sabn train", unit="step", disable=not progress)
    for epoch in range(config.epochs):
        order = torch.randperm(len(images), generator=gen)
        loss_sum = [0.0] * k_domains
        correct = [0] * k_domains
        count = [0] * k_domains
        for lo in range(0, len(images), config.batch_size):
            k = step % k_domains
            idx = order[lo : lo + config.batch_size]
            x = augment.apply(to_model_input(images[idx], device), config.domains[k], gen)
            y = y_all[idx].to(device)
            with torch.enable_grad(), with_domain(net, k if k_domains > 1 else None):
                logits = net(x)
                loss = F.cross_entropy(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
            opt.step()
            loss_sum[k] += float(loss.detach()) * len(idx)
            correct[k] += int((logits.argmax(1) == y).sum())
            count[k] += len(idx)
            step += 1
            bar.update(1)
        rec = {"epoch": epoch + 1}
        for k, dom in enumerate(config.domains):
            if count[k]:
                rec[f"loss_{dom}"] = loss_sum[k] / count[k]
                rec[f"acc_{dom}"] = correct[k] / count[k]
        history.append(rec)
    bar.close()
    net.requires_grad_(False)
    bank = collect_bank(net, images, config.domains, batches=config.bank_batches, batch_size=config.batch_size,
                        seed=config.seed, augment=augment, device=device)  # fmt: skip
    state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    meta = {"n_images": len(images), "wall_time_s": round(time.perf_counter() - t0, 1), "device": str(device)}
    return SaBNResult(state, bank, config, history, meta)


def export_head(model: nn.Module, state: dict[str, Tensor], k: int | None) -> nn.Module:
    """A copy of the source ``model`` (plain BatchNorms) whose BN affine is SaBN head ``k`` folded in:
    ``gamma' = g_k gamma``, ``beta' = g_k beta + b_k`` (``k=None``: the shared affine).  Valid for a state
    trained with source statistics (the ``sabn`` preset), where SaBN with head k *is* this BatchNorm in eval
    mode -- for deployment with a known domain."""
    import copy

    out = copy.deepcopy(model).eval()
    with torch.no_grad():
        for name, bn in out.named_modules():
            if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
                continue
            gamma, beta = state[f"{name}.weight"], state[f"{name}.bias"]
            if k is not None and f"{name}.domain_weight" in state:
                gk, bk = state[f"{name}.domain_weight"][k], state[f"{name}.domain_bias"][k]
                gamma, beta = gk * gamma, gk * beta + bk
            bn.weight.copy_(gamma)
            bn.bias.copy_(beta)
            bn.running_mean.copy_(state[f"{name}.source_mean"])
            bn.running_var.copy_(state[f"{name}.source_var"])
    return out


# --------------------------------------------------------------------------------------------------- routing


def expand_heads(state: dict[str, Tensor], capacity: int) -> dict[str, Tensor]:
    """Pad every layer's ``(K, C)`` heads with identity rows up to ``capacity`` rows (reserved new heads); a
    state without heads (K = 1) gets ``capacity`` identity heads."""
    out = dict(state)
    for key, value in state.items():
        if key.endswith(".domain_weight") or key.endswith(".domain_bias"):
            k, c = value.shape
            if capacity < k:
                raise ValueError(f"capacity {capacity} < {k} stored heads")
            fill = torch.ones if key.endswith("weight") else torch.zeros
            out[key] = torch.cat([value, fill(capacity - k, c, dtype=value.dtype)])
        elif key.endswith(".source_mean") and capacity > 1:  # a K = 1 state has no heads: add identity heads
            prefix = key[: -len("source_mean")]
            if prefix + "domain_weight" not in state:
                out[prefix + "domain_weight"] = torch.ones(capacity, value.shape[0], dtype=value.dtype)
                out[prefix + "domain_bias"] = torch.zeros(capacity, value.shape[0], dtype=value.dtype)
    return out


class SaBNRouter(nn.Module):
    """Route each test batch to a SaBN head and call the wrapped :class:`~tta_norm.api.TTAModel` with it.

    ``router(x)`` returns the logits; ``router(x, domain=k)`` is required in ``"oracle"`` mode and ignored
    otherwise.  ``routes`` records the chosen head per batch, ``last_distances`` the last distance vector.
    ``reset()`` resets the wrapped model and forgets spawned heads.  See the module docstring for the modes.
    """

    def __init__(
        self,
        tta: nn.Module,
        bank: StatsBank | None = None,
        mode: RouteMode = "stats",
        *,
        num_known: int | None = None,
        threshold: float | None = None,
        head_lr: float = 0.01,
        bank_momentum: float = 0.1,
    ) -> None:
        super().__init__()
        if mode not in ROUTE_MODES:
            raise ValueError(f"unknown routing mode {mode!r}; choose from {ROUTE_MODES}")
        if mode in ("stats", "open_set") and bank is None:
            raise ValueError(f"mode {mode!r} needs a statistics bank")
        self.tta = tta
        self.mode = mode
        layers = [layer for _, layer in adaptive_layers(tta.model)]
        self.capacity = max(layer.spec.num_domains for layer in layers)
        self.num_known = num_known if num_known is not None else (bank.num_domains if bank else self.capacity)
        if self.num_known > self.capacity:
            raise ValueError(f"{self.num_known} known domains but the model has {self.capacity} heads")
        self._initial_bank = bank.clone() if bank is not None else None
        self.bank = bank.clone() if bank is not None else None
        if threshold is None and mode == "open_set":
            pw = self.bank.pairwise()
            off = pw[~torch.eye(len(pw), dtype=torch.bool)]
            if not len(off):
                raise ValueError("open_set routing with one stored domain needs an explicit threshold")
            threshold = 0.5 * float(off.min())
        self.threshold = threshold
        self.head_lr = head_lr
        self.bank_momentum = bank_momentum
        self.active = self.num_known
        self.routes: list[int] = []
        self.last_distances: Tensor | None = None
        heads = [layer for layer in layers if layer.spec.num_domains > 1]
        self._head_weights: list[nn.Parameter] = [layer.domain_weight for layer in heads]
        self._head_biases: list[nn.Parameter] = [layer.domain_bias for layer in heads]
        self._head_params = self._head_weights + self._head_biases
        if mode == "open_set":
            if self.capacity <= self.num_known:
                raise ValueError("open_set routing needs reserved heads: build with max_new_domains >= 1")

    # -- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_state(
        cls,
        model: nn.Module,
        payload: dict[str, Any],
        mode: RouteMode = "stats",
        *,
        preset: str | None = None,
        method: str | None = None,
        max_new_domains: int = 0,
        device: torch.device | str | None = None,
        threshold: float | None = None,
        head_lr: float = 0.01,
        bank_momentum: float = 0.1,
        **adapt_kwargs: Any,
    ) -> SaBNRouter:
        """Build the adapted model from a :meth:`SaBNResult.save` payload, with ``max_new_domains`` reserved
        heads, and wrap it.  ``preset`` defaults to the one the heads were trained with."""
        import tta_norm

        bank = StatsBank.from_dict(payload["bank"])
        k = bank.num_domains
        if max_new_domains and mode != "open_set":
            raise ValueError("max_new_domains only applies to mode='open_set'")
        capacity = k + max_new_domains
        state = expand_heads(payload["state_dict"], capacity)
        preset = preset or payload.get("meta", {}).get("preset", "sabn")
        tta = tta_norm.adapt(model, preset, method, device=device, num_domains=capacity, init_state=state,
                             **adapt_kwargs)  # fmt: skip
        return cls(tta, bank, mode, num_known=k, threshold=threshold, head_lr=head_lr, bank_momentum=bank_momentum)

    @classmethod
    def from_file(cls, model: nn.Module, path: str | os.PathLike, mode: RouteMode = "stats", **kwargs: Any):
        """:meth:`from_state` from a file written by :meth:`SaBNResult.save`."""
        return cls.from_state(model, torch.load(path, map_location="cpu", weights_only=True), mode, **kwargs)

    # -- routing --------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Reset the wrapped model (heads back to their loaded values) and forget spawned heads."""
        self.tta.reset()
        self.bank = self._initial_bank.clone() if self._initial_bank is not None else None
        self.active = self.num_known
        self.routes = []
        self.last_distances = None

    def _entropy_route(self, x: Tensor) -> int:
        model = self.tta.model
        scores = []
        with torch.no_grad(), keep_state(model):
            for k in range(self.active):
                with with_domain(model, k):
                    logits = model(x)
                p = logits.log_softmax(1)
                scores.append(float(-(p.exp() * p).sum(1).mean()))
        self.last_distances = torch.tensor(scores)
        return int(torch.tensor(scores).argmin())

    def route(self, x: Tensor, domain: int | None = None) -> tuple[int, dict[str, tuple[Tensor, Tensor]] | None]:
        """The head for batch ``x`` (and its probe statistics for the stats modes); adapts nothing."""
        if self.mode == "oracle":
            if domain is None:
                raise ValueError("oracle routing needs the true domain: router(x, domain=k)")
            return int(domain), None
        if self.mode == "entropy":
            return self._entropy_route(x), None
        stats = probe_statistics(self.tta.model, x)
        d = self.bank.distances(stats)[: self.active]
        self.last_distances = d.detach().cpu()
        return int(d.argmin()), stats

    def forward(self, x: Tensor, domain: int | None = None) -> Tensor:
        device = resolve_device(None, self.tta.model)
        x = x.to(device) if x.device != device else x
        k, stats = self.route(x, domain)
        spawned_now = False
        if self.mode == "open_set" and float(self.last_distances[k]) > self.threshold and self.active < self.capacity:
            k = self.bank.append(stats)
            self._reset_head(k)
            self.active += 1
            spawned_now = True
        self.routes.append(k)
        if self.mode == "open_set" and k >= self.num_known:
            if not spawned_now:
                self.bank.update(k, stats, self.bank_momentum)
            return self._adapt_head(x, k)
        return self.tta(x, domain=k)

    def _reset_head(self, k: int) -> None:
        """Head ``k`` back to the identity (the composed affine equals the shared one)."""
        with torch.no_grad():
            for p in self._head_weights:
                p[k].fill_(1.0)
            for p in self._head_biases:
                p[k].fill_(0.0)

    def _adapt_head(self, x: Tensor, k: int) -> Tensor:
        """Predict with head ``k`` and take one entropy-minimisation SGD step on that head only."""
        with torch.inference_mode(False), torch.enable_grad():
            for p in self._head_params:
                p.requires_grad_(True)
            try:
                logits = self.tta.differentiable_forward(x.clone(), domain=k, adapt=True)
                lp = logits.log_softmax(1)
                loss = -(lp.exp() * lp).sum(1).mean()
                grads = torch.autograd.grad(loss, self._head_params, allow_unused=True)
            finally:
                for p in self._head_params:
                    p.requires_grad_(False)
        if torch.isfinite(loss):
            with torch.no_grad():
                for p, g in zip(self._head_params, grads, strict=True):
                    if g is not None:
                        p[k].sub_(self.head_lr * g[k])
        return logits.detach()


def synthetic_domains(
    images: ImageArray,
    labels: Tensor | Sequence[int],
    domains: Sequence[str],
    *,
    seed: int = 0,
    augment: ShiftAugment | None = None,
) -> dict[tuple[str, int], Any]:
    """Test domains from the training-time shift families: each domain applies its op with *one* magnitude
    (drawn from ``seed``) to all ``images``; keys ``(name, 1)`` as the stream builders expect, values
    :class:`tta_norm.data.ArrayDataset` (uint8 NHWC)."""
    from tta_norm.data import ArrayDataset

    augment = augment or ShiftAugment()
    x = to_model_input(as_image_tensor(images), torch.device("cpu"))
    y = as_labels(labels, len(x)).numpy()
    out = {}
    for i, dom in enumerate(domains):
        gen = torch.Generator().manual_seed(seed * 1000 + i)
        xs = augment.apply(x, dom, gen)
        u8 = (xs * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
        out[(dom, 1)] = ArrayDataset(u8, y, None, f"synthetic:{dom}")
    return out


__all__ = [
    "DEFAULT_DOMAINS",
    "ROUTE_MODES",
    "SaBNConfig",
    "SaBNResult",
    "SaBNRouter",
    "StatsBank",
    "calibrate_threshold",
    "collect_bank",
    "expand_heads",
    "export_head",
    "parse_domains",
    "probe_statistics",
    "symmetric_kl",
    "synthetic_domains",
    "train_sabn",
]
