"""SaBN heads: train the shared + per-domain affine on source domains, export a head as a plain BatchNorm model,
and build test domains from the training-time shift families (see :mod:`tta_norm.fitting.sabn`)."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
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
from tta_norm.fitting.sabn.bank import StatsBank, collect_bank
from tta_norm.norm.adaptive import adaptive_layers
from tta_norm.norm.convert import with_domain
from tta_norm.training import fit

DEFAULT_DOMAINS: tuple[str, ...] = ("clean",) + SHIFT_OPS


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
        finite_number("lr", self.lr)
        if self.epochs < 0 or self.batch_size < 1 or self.bank_batches < 1 or self.lr <= 0:
            raise ValueError("need epochs >= 0, batch_size >= 1, bank_batches >= 1 and lr > 0")


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
        return write_atomically(path, lambda tmp: torch.save(payload, tmp))


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
    step = [0]

    def loss_fn(idx: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        k = step[0] % k_domains
        step[0] += 1
        x = augment.apply(to_model_input(images[idx], device), config.domains[k], gen)
        y = y_all[idx].to(device)
        with with_domain(net, k if k_domains > 1 else None):
            logits = net(x)
        loss = F.cross_entropy(logits, y)
        dom = config.domains[k]
        return loss, {f"loss_{dom}": loss.detach() * len(idx), f"acc_{dom}": (logits.argmax(1) == y).sum(),
                      f"n_{dom}": torch.tensor(len(idx))}  # fmt: skip

    def per_domain(record: dict) -> None:  # sums / samples seen -> means over each domain's own samples
        for dom in config.domains:
            share = record.pop(f"n_{dom}", 0.0)
            for key in (f"loss_{dom}", f"acc_{dom}"):
                if key in record:
                    record[key] = record[key] / share

    run = fit(opt, loss_fn, n=len(images), batch_size=config.batch_size, epochs=config.epochs,
              generator=gen, on_epoch_end=per_domain, progress=progress, desc="sabn train")  # fmt: skip
    history = run.history
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
    mode -- for deployment with a known domain.  Every other tensor of the model is taken from ``state`` too
    (a state trained with ``train="all"`` also changed the convolutions)."""
    import copy

    out = copy.deepcopy(model).eval()
    norms = {name for name, m in out.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    with torch.no_grad():
        for key, tensor in out.state_dict().items():
            if key.rpartition(".")[0] not in norms and key in state:
                tensor.copy_(state[key])
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
