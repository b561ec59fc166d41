"""Test-time routing of batches to SaBN heads: oracle, nearest bank entry, lowest entropy, or open-set with
new heads adapted online (see :mod:`tta_norm.fitting.sabn`)."""

from __future__ import annotations

import os
from typing import Any, Literal

import torch
from torch import Tensor, nn

from tta_norm._integers import integer_index
from tta_norm._numbers import finite_number
from tta_norm.device import resolve_device
from tta_norm.fitting.sabn.bank import StatsBank, probe_statistics
from tta_norm.fitting.sabn.heads import expand_heads
from tta_norm.methods.base import softmax_entropy
from tta_norm.norm.adaptive import adaptive_layers
from tta_norm.norm.convert import keep_state, with_domain

RouteMode = Literal["oracle", "stats", "entropy", "open_set"]
ROUTE_MODES: tuple[str, ...] = ("oracle", "stats", "entropy", "open_set")


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
        finite_number("head_lr", head_lr, 0.0)
        finite_number("bank_momentum", bank_momentum, 0.0, 1.0)
        if threshold is not None:
            finite_number("threshold", threshold, 0.0)
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
                scores.append(float(softmax_entropy(logits).mean()))
        self.last_distances = torch.tensor(scores)
        return int(torch.tensor(scores).argmin())

    def route(self, x: Tensor, domain: int | None = None) -> tuple[int, dict[str, tuple[Tensor, Tensor]] | None]:
        """The head for batch ``x`` (and its probe statistics for the stats modes); adapts nothing."""
        if self.mode == "oracle":
            if domain is None:
                raise ValueError("oracle routing needs the true domain: router(x, domain=k)")
            k = integer_index(domain)
            if k is None or not 0 <= k < self.capacity:
                raise ValueError(f"domain must be an integer head index in 0..{self.capacity - 1}, got {domain!r}")
            return k, None
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
                loss = softmax_entropy(logits).mean()
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
