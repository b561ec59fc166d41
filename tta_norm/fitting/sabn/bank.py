"""SaBN's per-domain statistics bank: probe statistics of every adaptive norm layer's input, pooled per domain,
and the distance a router compares them with (see :mod:`tta_norm.fitting.sabn`)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from tta_norm.device import resolve_device
from tta_norm.fitting._data import ImageArray, as_image_tensor, to_model_input
from tta_norm.fitting.augment import ShiftAugment
from tta_norm.norm.convert import keep_state, with_domain
from tta_norm.norm.probe import record_inputs
from tta_norm.stats.estimators import batch_mean_var


def symmetric_kl(mean_a: Tensor, var_a: Tensor, mean_b: Tensor, var_b: Tensor, eps: float = 1e-5) -> Tensor:
    """Symmetric KL divergence between Gaussians, elementwise (broadcasting): ``KL(a||b) + KL(b||a)``."""
    va, vb = var_a + eps, var_b + eps
    return 0.5 * (va / vb + vb / va - 2.0 + (mean_a - mean_b).square() * (1.0 / va + 1.0 / vb))


def probe_inputs(model: nn.Module) -> contextlib.AbstractContextManager[dict[str, tuple[Tensor, Tensor]]]:
    """Within the block, every forward records the batch mean and (biased) variance of each adaptive norm
    layer's input, ``{layer name: (mean (C,), var (C,))}``, overwritten by the next forward."""
    return record_inputs(model, lambda x: tuple(t.detach() for t in batch_mean_var(x)))


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
