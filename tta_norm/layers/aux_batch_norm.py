"""Per-domain batch normalization for adversarial training: AuxBN and SaAuxBN (Gong et al., WACV 2022, SaBN).

* :class:`AuxBatchNorm2d`: one ``BatchNorm2d`` per domain (statistics **and** affine separate), e.g. domain 0
  for clean and domain 1 for adversarial inputs (Xie et al.'s auxiliary BN, the SaBN paper's baseline).
* :class:`SaAuxBatchNorm2d`: separate statistics per domain (``BatchNorm2d(affine=False)``), then the shared
  "sandwich" affine and then the domain's own affine:
  ``y = g_i * (g_sa * x_hat + b_sa) + b_i``.

The domain is a plain attribute ``domain`` (an int) of every layer, set for a whole model by
:func:`set_domain` or the :func:`use_domain` context manager; it must be known at inference (oracle routing,
as in SaBN's code).  :func:`convert_to_aux_bn` replaces a trained model's ``BatchNorm2d`` layers (and
``SyncBatchNorm`` ones, whose domains are then ``SyncBatchNorm`` layers) so that the converted model starts equal
to it on every domain (running statistics copied to every domain; AuxBN copies the
affine to every domain; SaAuxBN puts it in the shared affine and starts the domain affines at the identity),
which makes fine-tuning from a BN checkpoint possible.  Fresh layers initialise the affine parameters as SaBN's
code does: ``N(1, 0.02)`` weights and zero biases for the SaAuxBN embeddings, PyTorch's default for AuxBN.

The names of the adaptive norm layer's SaBN heads are used throughout (``num_domains``, ``domain``,
``domain_weight`` / ``domain_bias``).  The earlier names (``num_branches``, ``branch``, ``branch_weight`` /
``branch_bias``, ``set_branch``, ``use_branch``, ``branch_layers``) still work, with a ``DeprecationWarning``;
state dicts saved under them load.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from tta_norm._deprecation import renamed_attribute, renamed_keywords, warn_renamed
from tta_norm._integers import integer_index

from ._common import check_channels, has_running_stats

_SourceBN = nn.BatchNorm2d | nn.SyncBatchNorm  # what an AuxBN/SaAuxBN layer is built from


def _placement(bn: _SourceBN) -> dict[str, Any]:
    """The device and floating dtype of ``bn``'s tensors (a converted layer computes where and as it did)."""
    tensors = [t for t in (*bn.parameters(), *bn.buffers()) if t.is_floating_point()]
    return {"device": tensors[0].device, "dtype": tensors[0].dtype} if tensors else {}


class _DomainNorm(nn.Module):
    """``num_domains`` ``BatchNorm2d`` layers (``bns``) and the selected ``domain``; subclasses add affines."""

    is_norm_layer = True  # its own affines (SaAuxBN) are norm parameters for tta_norm.training.param_groups

    def __init__(
        self, num_features: int, num_domains: int, eps: float, momentum: float | None, affine: bool,
        track_running_stats: bool = True,
    ) -> None:  # fmt: skip
        super().__init__()
        if num_domains < 1:
            raise ValueError(f"num_domains must be >= 1, got {num_domains}")
        self.num_features = num_features
        self.num_domains = num_domains
        self.domain = 0
        self.bns = nn.ModuleList(nn.BatchNorm2d(num_features, eps, momentum, affine, track_running_stats)
                                 for _ in range(num_domains))  # fmt: skip

    num_branches = renamed_attribute("num_branches", "num_domains")
    branch = renamed_attribute("branch", "domain")

    def _synchronised_like(self, bn: _SourceBN) -> None:
        """Per-domain ``SyncBatchNorm`` layers (same settings and process group) if ``bn`` is one: the domains
        then gather their statistics across processes as the source did."""
        if isinstance(bn, nn.SyncBatchNorm):
            self.bns = nn.ModuleList(
                nn.SyncBatchNorm(b.num_features, b.eps, b.momentum, b.affine, b.track_running_stats,
                                 process_group=bn.process_group)
                for b in self.bns
            )  # fmt: skip

    def _check_domain(self) -> int:
        k = int(self.domain)
        if not 0 <= k < self.num_domains:
            raise ValueError(f"{type(self).__name__}: domain {k} out of range for {self.num_domains} domains")
        return k

    def extra_repr(self) -> str:
        return f"{self.num_features}, num_domains={self.num_domains}, domain={self.domain}"


class AuxBatchNorm2d(_DomainNorm):
    """``num_domains`` independent ``BatchNorm2d`` layers (``SyncBatchNorm`` when built from one); ``domain``
    selects the one applied."""

    @renamed_keywords(num_branches="num_domains")
    def __init__(
        self, num_features: int, num_domains: int = 2, eps: float = 1e-5, momentum: float | None = 0.1,
        affine: bool = True, track_running_stats: bool = True,
    ) -> None:  # fmt: skip
        super().__init__(num_features, num_domains, eps, momentum, affine, track_running_stats)

    def forward(self, x: Tensor) -> Tensor:
        check_channels(x, self.num_features, type(self).__name__)
        return self.bns[self._check_domain()](x)

    @classmethod
    @renamed_keywords(num_branches="num_domains")
    def from_batchnorm(cls, bn: nn.BatchNorm2d | nn.SyncBatchNorm, num_domains: int = 2) -> AuxBatchNorm2d:
        layer = cls(bn.num_features, num_domains, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        layer._synchronised_like(bn)
        layer = layer.to(**_placement(bn))
        for b in layer.bns:
            b.load_state_dict(bn.state_dict())
        return layer.train(bn.training)


class SaAuxBatchNorm2d(_DomainNorm):
    """Separate statistics per domain, shared sandwich affine ``(g_sa, b_sa)``, per-domain affine ``(g_i, b_i)``.

    Parameters: ``shared_weight``/``shared_bias`` ``(C,)`` and ``domain_weight``/``domain_bias``
    ``(num_domains, C)``; buffers of the per-domain ``BatchNorm2d(affine=False)`` in ``bns``.
    """

    @renamed_keywords(num_branches="num_domains")
    def __init__(
        self, num_features: int, num_domains: int = 2, eps: float = 1e-5, momentum: float | None = 0.1,
        track_running_stats: bool = True,
    ) -> None:  # fmt: skip
        super().__init__(num_features, num_domains, eps, momentum, False, track_running_stats)
        self.shared_weight = nn.Parameter(torch.empty(num_features).normal_(1.0, 0.02))
        self.shared_bias = nn.Parameter(torch.zeros(num_features))
        self.domain_weight = nn.Parameter(torch.empty(num_domains, num_features).normal_(1.0, 0.02))
        self.domain_bias = nn.Parameter(torch.zeros(num_domains, num_features))

    branch_weight = renamed_attribute("branch_weight", "domain_weight")
    branch_bias = renamed_attribute("branch_bias", "domain_bias")

    def forward(self, x: Tensor) -> Tensor:
        check_channels(x, self.num_features, type(self).__name__)
        k = self._check_domain()
        x_hat = self.bns[k](x)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        weight = self.domain_weight[k] * self.shared_weight
        bias = self.domain_weight[k] * self.shared_bias + self.domain_bias[k]
        return torch.addcmul(bias.view(shape), x_hat, weight.view(shape))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        for old, new in (("branch_weight", "domain_weight"), ("branch_bias", "domain_bias")):
            if prefix + old in state_dict and prefix + new not in state_dict:
                warn_renamed(f"state dict key {prefix + old!r}", repr(prefix + new), stacklevel=4)
                state_dict[prefix + new] = state_dict.pop(prefix + old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    @renamed_keywords(num_branches="num_domains")
    def from_batchnorm(cls, bn: nn.BatchNorm2d | nn.SyncBatchNorm, num_domains: int = 2) -> SaAuxBatchNorm2d:
        layer = cls(bn.num_features, num_domains, bn.eps, bn.momentum, bn.track_running_stats)
        layer._synchronised_like(bn)
        layer = layer.to(**_placement(bn))
        with torch.no_grad():
            for b in layer.bns:
                if bn.running_mean is not None:
                    b.running_mean.copy_(bn.running_mean)
                    b.running_var.copy_(bn.running_var)
                    b.num_batches_tracked.copy_(bn.num_batches_tracked)
            if bn.affine:
                layer.shared_weight.copy_(bn.weight)
                layer.shared_bias.copy_(bn.bias)
            else:
                layer.shared_weight.fill_(1.0)
                layer.shared_bias.zero_()
            layer.domain_weight.fill_(1.0)
            layer.domain_bias.zero_()
        return layer.train(bn.training)


def _base_of(module: nn.Module) -> type[_BatchNorm] | None:
    """``nn.SyncBatchNorm`` or ``nn.BatchNorm2d`` if ``module`` is one of them (or a subclass), else None."""
    for base in (nn.SyncBatchNorm, nn.BatchNorm2d):
        if isinstance(module, base):
            return base
    return None


def _represented_exactly(module: nn.Module) -> bool:
    """True if an AuxBN/SaAuxBN layer built from ``module`` computes what it computes: a ``BatchNorm2d`` or
    ``SyncBatchNorm``, or a subclass keeping their forward and input check, whose state is exactly that of a
    BatchNorm with its eps, momentum, affine and track_running_stats (not so: a parametrized weight, an extra
    parameter or buffer, running statistics kept beside ``track_running_stats=False``)."""
    base = _base_of(module)
    if base is None or type(module).forward is not base.forward:
        return False
    if type(module)._check_input_dim is not base._check_input_dim:  # type: ignore[attr-defined]
        return False
    bn: _BatchNorm = module  # type: ignore[assignment]
    ref = nn.BatchNorm2d(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, device="meta")
    shapes = {k: v.shape for k, v in bn.state_dict().items()}
    return shapes == {k: v.shape for k, v in ref.state_dict().items()}


@renamed_keywords(num_branches="num_domains")
def convert_to_aux_bn(model: nn.Module, kind: str = "saaux", num_domains: int = 2) -> list[str]:
    """Replace every ``nn.BatchNorm2d`` and ``nn.SyncBatchNorm`` of ``model`` in place by an AuxBN
    (``kind="aux"``) or SaAuxBN (``"saaux"``) layer built from it, in the same train/eval mode (the model's function
    is unchanged on every domain; a SyncBatchNorm's domains are SyncBatchNorms).  A subclass is converted too when
    it keeps the base ``forward`` and holds exactly a BatchNorm's state.  Returns the names of the replaced layers.
    Other layers with running statistics (BatchNorm1d/3d, frozen or parametrized BNs) are left as they are, named in
    a warning.  Refused before anything changes: a model that is itself a BatchNorm (use
    ``AuxBatchNorm2d.from_batchnorm``), a model converted already, and a ``BatchNorm2d``/``SyncBatchNorm``
    subclass with its own ``forward`` (timm's ``BatchNormAct2d``)."""
    if kind not in ("aux", "saaux"):
        raise ValueError(f"kind must be 'aux' or 'saaux', got {kind!r}")
    cls = AuxBatchNorm2d if kind == "aux" else SaAuxBatchNorm2d
    if isinstance(model, _BatchNorm):
        raise ValueError(
            f"convert_to_aux_bn: the model is itself a {type(model).__name__} and layers are replaced in place; "
            f"use {cls.__name__}.from_batchnorm(bn) or convert a module holding it"
        )
    converted = [n for n, m in model.named_modules() if isinstance(m, _DomainNorm)]
    if converted:
        raise ValueError(
            f"convert_to_aux_bn: the model already has AuxBN/SaAuxBN layers ({', '.join(converted[:3])}"
            f"{', ...' if len(converted) > 3 else ''}); converting it again would nest them"
        )
    extended = [f"{n} ({type(m).__name__})" for n, m in model.named_modules()
                if (base := _base_of(m)) is not None and type(m).forward is not base.forward]  # fmt: skip
    if extended:
        raise ValueError(
            f"convert_to_aux_bn: {extended} are BatchNorm2d/SyncBatchNorm subclasses with their own forward (e.g. "
            "timm's BatchNormAct2d adds an activation); an AuxBN built from them would drop it. Replace them by "
            "nn.BatchNorm2d + activation first"
        )
    found = [(n, m) for n, m in model.named_modules(remove_duplicate=False) if _represented_exactly(m)]
    chosen = {id(m) for _, m in found}
    left = [f"{n} ({type(m).__name__})" for n, m in model.named_modules()
            if id(m) not in chosen and (isinstance(m, _BatchNorm) or has_running_stats(m))]  # fmt: skip
    if not found:
        also = f"; left: {', '.join(left)}" if left else ""
        raise ValueError(f"model {type(model).__name__} has no nn.BatchNorm2d layer to convert{also}")
    built: dict[int, nn.Module] = {}  # a BN shared by several call sites becomes one shared layer
    for _, bn in found:
        if id(bn) not in built:
            built[id(bn)] = cls.from_batchnorm(bn, num_domains)  # type: ignore[arg-type]
    for name, bn in found:
        model.set_submodule(name, built[id(bn)])
    if left:
        warnings.warn(
            "convert_to_aux_bn: left unconverted (running statistics, but not a BatchNorm2d or SyncBatchNorm an AuxBN "
            f"layer represents exactly): {', '.join(left)}",
            UserWarning,
            stacklevel=3,
        )
    return [n for n, _ in found]


def domain_layers(model: nn.Module) -> list[_DomainNorm]:
    """Every AuxBN/SaAuxBN layer of ``model``."""
    return [m for m in model.modules() if isinstance(m, _DomainNorm)]


def set_domain(model: nn.Module, domain: int) -> None:
    """Route every AuxBN/SaAuxBN layer of ``model`` to ``domain`` (0 = clean, 1 = adversarial by convention)."""
    layers = domain_layers(model)
    if not layers:
        raise ValueError("the model has no AuxBN/SaAuxBN layer")
    fewest = min(m.num_domains for m in layers)
    k = integer_index(domain)
    if k is None or not 0 <= k < fewest:
        raise ValueError(f"domain {domain!r} out of range: an integer in 0..{fewest - 1} (the fewest domains of "
                         "a layer)")  # fmt: skip
    for m in layers:  # checked for every layer first: a bad domain changes none
        m.domain = k


@contextlib.contextmanager
def use_domain(model: nn.Module, domain: int) -> Iterator[None]:
    """Within the block, every AuxBN/SaAuxBN layer of ``model`` uses ``domain``; restored afterwards."""
    layers = domain_layers(model)
    saved = [m.domain for m in layers]
    set_domain(model, domain)
    try:
        yield
    finally:
        for m, k in zip(layers, saved, strict=True):
            m.domain = k


def branch_layers(model: nn.Module) -> list[_DomainNorm]:
    """Deprecated name of :func:`domain_layers`."""
    warn_renamed("branch_layers", "domain_layers")
    return domain_layers(model)


def set_branch(model: nn.Module, branch: int) -> None:
    """Deprecated name of :func:`set_domain`."""
    warn_renamed("set_branch", "set_domain")
    set_domain(model, branch)


def use_branch(model: nn.Module, branch: int) -> contextlib.AbstractContextManager[None]:
    """Deprecated name of :func:`use_domain`."""
    warn_renamed("use_branch", "use_domain")
    return use_domain(model, branch)
