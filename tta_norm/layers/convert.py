"""Model converters: BatchNorm -> Ghost BN, BatchNorm -> batch-group norm, BatchNorm -> GroupNorm, BN + activation
-> GN + Proxy Norm.

``convert_to_ghost_bn``, ``convert_to_batch_group_norm`` and ``convert_to_group_norm`` replace modules in place
(like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``) and return the model (a new object only when the model
itself is a BatchNorm). They convert modules whose type is exactly ``nn.BatchNorm1d/2d/3d``; other
``_BatchNorm`` subclasses (SyncBatchNorm, lazy BN, adaptive wrappers, ghost BNs already converted) and frozen
BNs (modules with running statistics that are no ``_BatchNorm``: torchvision's ``FrozenBatchNorm2d``, timm's
``FrozenBatchNormAct2d``) are left alone, with one warning naming them (not the ghost BNs for
``convert_to_ghost_bn`` nor the ``BatchGroupNorm`` layers for ``convert_to_batch_group_norm``: they are converted
already).

``convert_to_gn_pn`` turns every BatchNorm whose output goes straight into an elementwise activation into
``GroupNormProxyAct`` (GN without affine -> affine -> activation -> proxy normalization) and removes that
activation; every other BatchNorm (e.g. ``bn2`` of a ResNet BasicBlock, which feeds the residual sum) becomes
``nn.GroupNorm`` with affine (``unfused="gn"``) or is kept (``unfused="keep"``). Frozen BNs are left as they are,
with a warning naming them. Two detection methods:

* ``method="fx"`` (default): the model is traced with ``torch.fx`` (normalization layers are leaves) and the
  graph is rewritten. Supported: a BN whose single user is ``F.relu``/``torch.relu``/``Tensor.relu`` (also the
  in-place forms), ``F.silu``, ``F.gelu``, ``F.leaky_relu``, or a call of an activation module (``nn.ReLU``,
  ``nn.SiLU``, ``nn.GELU``, ...), wherever it is written (``nn.Sequential``, ``self.relu`` in a BasicBlock,
  functional calls in ``forward``), also through ``nn.Identity`` calls in between (timm's disabled
  ``drop_block``); a dropout in between is not fused across (the fused layer has no place for it), and such
  BNs are listed in a warning. The result is an ``fx.GraphModule`` with the same submodule names and
  state-dict keys for everything that was called in ``forward``; the original model is not modified, but the
  GraphModule shares its remaining submodules (convs, linears) with it. Models that fx cannot trace (data-
  dependent control flow) raise an error that points to ``method="sequential"``. A BatchNorm module called at
  several places in ``forward`` is rejected.
* ``method="sequential"``: in place, without tracing; only a BN immediately followed by an activation module
  inside the same ``nn.Sequential`` is fused (the activation entry becomes ``nn.Identity``), never inside a
  ``Sequential`` subclass with its own ``forward`` (which need not chain its children). Any other BN is
  converted by the ``unfused`` rule and listed in a warning, because an activation applied in ``forward``
  (e.g. ``F.relu``) cannot be seen or removed without tracing.

``activation_after`` restricts fusion to the named BNs (qualified names as in ``model.named_modules()``) or those
accepted by a predicate ``(name, module) -> bool``; naming a BN that is not followed by a supported activation is an
error. A ``_BatchNorm`` subclass whose ``forward`` adds to the normalisation (timm's ``BatchNormAct2d``: dropout +
activation) is refused wherever it would be replaced (always with ``unfused="gn"``), because the replacement would
drop what it adds. Parameter count: each fused BN (2C parameters) becomes 4C (gamma, beta, gamma~, beta~); an
unfused BN becomes a GN with the same 2C (0 without affine). BN buffers disappear. State-dict keys: a fused
``bn1.weight``/``bn1.bias`` becomes ``bn1.proxy.weight``/``bn1.proxy.bias`` (plus
``bn1.proxy.proxy_weight``/``proxy_bias``); an unfused BN keeps ``weight``/``bias``. The affine values are copied
from the BN (``copy_affine=True``); running statistics are not used by GN/PN.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable, Collection
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

from ._common import has_running_stats
from .batch_group_norm import BatchGroupNorm, Grouping
from .ghost_batch_norm import GHOST_BN_FOR, Remainder, _GhostBatchNormMixin, check_ghost_batch_size
from .proxy_norm import GroupNormProxyAct, Moments, ProxyNorm, make_activation

GroupSpec = int | Callable[[int], int]
ActivationAfter = Collection[str] | Callable[[str, nn.Module], bool] | None

ACTIVATION_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.SiLU,
    nn.GELU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.Mish,
    nn.Hardswish,
    nn.Softplus,
    nn.Tanh,
    nn.Sigmoid,
)
"""Elementwise activation modules the GN+PN converter fuses after a BatchNorm."""

_RELU_FUNCTIONS = {F.relu, F.relu_, torch.relu, torch.relu_}


# ----------------------------------------------------------------------------------------------------------
# generic helpers
# ----------------------------------------------------------------------------------------------------------


def _replace_in_place(
    model: nn.Module, make: Callable[[str, nn.Module], nn.Module | None]
) -> tuple[nn.Module, list[str]]:
    """Replace every module for which ``make(name, module)`` returns a module; returns (model, replaced names).
    A module reachable under several names (one layer shared by two call sites) is built once, under its first
    name, and that one replacement is set under every name, so the call sites still share one layer. Every
    replacement is built before the first one is set: an error in ``make`` leaves the model as it was."""
    root_new = make("", model)
    if root_new is not None:
        return root_new, [""]
    plan: list[tuple[str, nn.Module]] = []
    built: dict[int, nn.Module | None] = {}
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if name == "":
            continue
        if id(module) not in built:
            built[id(module)] = make(name, module)
        new = built[id(module)]
        if new is not None:
            plan.append((name, new))
    for name, new in plan:
        model.set_submodule(name, new)
    return model, [name for name, _ in plan]


def _convert_plain_batchnorms(
    model: nn.Module,
    converter: str,
    build: Callable[[str, _BatchNorm], nn.Module],
    *,
    quiet: type | tuple[type, ...] = (),
) -> nn.Module:
    """Replace, in place, every module whose type is exactly ``nn.BatchNorm1d/2d/3d`` by ``build(name, bn)``;
    every other ``_BatchNorm`` or module with running statistics (a frozen BN) is left unchanged and named in one
    warning, except instances of ``quiet``. Returns the model (or the replacement when ``model`` itself is a
    BatchNorm)."""
    skipped: list[str] = []

    def make(name: str, module: nn.Module) -> nn.Module | None:
        if type(module) in GHOST_BN_FOR:
            return build(name, module)  # type: ignore[arg-type]
        if (isinstance(module, _BatchNorm) or has_running_stats(module)) and not isinstance(module, quiet):
            skipped.append(f"{name or '<root>'} ({type(module).__name__})")
        return None

    out, _ = _replace_in_place(model, make)
    if skipped:
        listing = ", ".join(skipped)
        warnings.warn(
            f"{converter}: left unchanged (not exactly nn.BatchNorm1d/2d/3d): {listing}", UserWarning, stacklevel=3
        )
    return out


def _warn_other_norms(model: nn.Module) -> Callable[[], None]:
    """For ``convert_to_gn_pn``, which replaces ``_BatchNorm`` layers only: the other modules with running
    statistics (frozen BNs) found now, named in one warning when the returned function is called."""
    left = [f"{n or '<root>'} ({type(m).__name__})" for n, m in model.named_modules()
            if has_running_stats(m) and not isinstance(m, _BatchNorm)]  # fmt: skip

    def warn() -> None:
        if left:
            warnings.warn(
                f"convert_to_gn_pn: left unchanged (running statistics, but not a torch BatchNorm): {', '.join(left)}",
                UserWarning,
                stacklevel=3,
            )

    return warn


def _resolve_groups(num_groups: GroupSpec, channels: int, name: str) -> int:
    g = num_groups(channels) if callable(num_groups) else num_groups
    if not isinstance(g, int) or g <= 0 or channels % g != 0:
        raise ValueError(
            f"layer {name or '<root>'!r}: num_groups={g!r} does not divide its {channels} channels; pass an int "
            "dividing every BN's channel count or a callable channels -> groups"
        )
    return g


def _plain_batchnorm(module: nn.Module) -> bool:
    """True if ``module``'s forward is exactly a BatchNorm's (no activation or dropout added, as timm's
    ``BatchNormAct2d`` adds)."""
    return type(module).forward in (_BatchNorm.forward, nn.SyncBatchNorm.forward)


def _refuse_extended(names: Collection[str], bns: dict[str, nn.Module]) -> None:
    """Replacing a BatchNorm subclass with its own forward would drop what it adds: refuse before any change."""
    bad = sorted(n for n in names if not _plain_batchnorm(bns[n]))
    if bad:
        kinds = sorted({type(bns[n]).__name__ for n in bad})
        raise ValueError(
            f"convert_to_gn_pn: {bad} ({', '.join(kinds)}) apply more than a BatchNorm in forward() (e.g. timm's "
            "BatchNormAct2d adds dropout and an activation); replacing them would drop it. Pass unfused='keep' "
            "to leave them, or replace them by nn.BatchNorm2d + activation first"
        )


def _factory(bn: _BatchNorm) -> dict[str, Any]:
    ref = bn.weight if bn.weight is not None else bn.running_mean
    return {} if ref is None else {"device": ref.device, "dtype": ref.dtype}


# ----------------------------------------------------------------------------------------------------------
# Ghost BN / batch-group norm / group norm
# ----------------------------------------------------------------------------------------------------------


def convert_to_ghost_bn(
    model: nn.Module,
    ghost_batch_size: int,
    *,
    scale_momentum: bool = True,
    remainder: Remainder = "merge",
) -> nn.Module:
    """Replace every ``nn.BatchNorm1d/2d/3d`` in ``model`` (in place) by the matching ``GhostBatchNormNd``.

    Affine Parameter objects are reused, running statistics copied, train/eval mode kept (see
    ``GhostBatchNorm2d.from_batchnorm``). Returns ``model`` (or the new module if ``model`` is a BatchNorm).
    """
    check_ghost_batch_size(ghost_batch_size)  # before any layer is replaced

    def build(name: str, bn: _BatchNorm) -> nn.Module:
        ghost_cls = GHOST_BN_FOR[type(bn)]
        return ghost_cls.from_batchnorm(bn, ghost_batch_size, scale_momentum=scale_momentum, remainder=remainder)  # type: ignore[arg-type, return-value]

    return _convert_plain_batchnorms(model, "convert_to_ghost_bn", build, quiet=_GhostBatchNormMixin)


def convert_to_batch_group_norm(
    model: nn.Module, num_groups: GroupSpec, *, grouping: Grouping = "channel"
) -> nn.Module:
    """Replace every ``nn.BatchNorm1d/2d/3d`` in ``model`` (in place) by ``BatchGroupNorm``.

    ``num_groups`` is an int or a callable ``channels -> groups``. Affine Parameters are reused; group running
    statistics are initialised from the channel ones (see ``BatchGroupNorm.from_batchnorm``).
    """

    def build(name: str, bn: _BatchNorm) -> nn.Module:
        g = _resolve_groups(num_groups, bn.num_features, name) if grouping == "channel" else num_groups
        return BatchGroupNorm.from_batchnorm(bn, g, grouping=grouping)  # type: ignore[arg-type]

    return _convert_plain_batchnorms(model, "convert_to_batch_group_norm", build, quiet=BatchGroupNorm)


def convert_to_group_norm(model: nn.Module, num_groups: GroupSpec, *, copy_affine: bool = True) -> nn.Module:
    """Replace every ``nn.BatchNorm1d/2d/3d`` in ``model`` (in place) by ``nn.GroupNorm`` (the BN's eps, affine,
    device, dtype and train/eval mode).

    ``num_groups`` is an int or a callable ``channels -> groups``. The affine values are copied from the BN
    (``copy_affine=True``); running statistics are dropped (GN normalises every sample on its own).
    """

    def build(name: str, bn: _BatchNorm) -> nn.Module:
        groups = _resolve_groups(num_groups, bn.num_features, name)
        return _gn_from_bn(bn, groups, norm_eps=None, copy_affine=copy_affine)

    return _convert_plain_batchnorms(model, "convert_to_group_norm", build)


# ----------------------------------------------------------------------------------------------------------
# BN + activation -> GN + Proxy Norm
# ----------------------------------------------------------------------------------------------------------


class _NormLeafTracer(fx.Tracer):
    """fx tracer that keeps every normalization layer (and activation module) as a single call_module node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, _NormBase | nn.GroupNorm | nn.LayerNorm | BatchGroupNorm | ProxyNorm | GroupNormProxyAct):
            return True
        if isinstance(m, ACTIVATION_MODULES):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _trace(model: nn.Module) -> fx.GraphModule:
    tracer = _NormLeafTracer()
    try:
        graph = tracer.trace(model)
    except Exception as err:  # fx raises TraceError, TypeError, RuntimeError... depending on the construct
        raise RuntimeError(
            f"torch.fx could not trace {type(model).__name__} ({type(err).__name__}: {err}). Use "
            "method='sequential' (fuses only BN -> activation modules adjacent inside an nn.Sequential), or make "
            "forward() traceable (no control flow that depends on tensor values)."
        ) from err
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    gm.train(model.training)
    return gm


def _arg(node: fx.Node, index: int, key: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(key, default)


def _only_input(node: fx.Node, source: fx.Node, allowed: set[str], max_args: int) -> bool:
    """True if ``source`` is the first argument of ``node`` and appears nowhere else in its arguments."""
    if not node.args or node.args[0] is not source or len(node.args) > max_args:
        return False
    if any(a is source for a in node.args[1:]) or any(v is source for v in node.kwargs.values()):
        return False
    return set(node.kwargs) <= allowed


def _activation_of(node: fx.Node, source: fx.Node, modules: dict[str, nn.Module]) -> nn.Module | None:
    """The activation module equivalent to ``node`` if it is an elementwise activation applied to ``source``."""
    if node.op == "call_module":
        m = modules.get(str(node.target))
        if isinstance(m, ACTIVATION_MODULES) and _only_input(node, source, set(), 1):
            return make_activation(m)
        return None
    if node.op == "call_method":
        if node.target in ("relu", "relu_") and _only_input(node, source, set(), 1):
            return nn.ReLU()
        return None
    if node.op != "call_function":
        return None
    target = node.target
    if target in _RELU_FUNCTIONS and _only_input(node, source, {"inplace"}, 2):
        return nn.ReLU()
    if target is F.silu and _only_input(node, source, {"inplace"}, 2):
        return nn.SiLU()
    if target is F.gelu and _only_input(node, source, {"approximate"}, 2):
        return nn.GELU(approximate=_arg(node, 1, "approximate", "none"))
    if target is F.leaky_relu and _only_input(node, source, {"negative_slope", "inplace"}, 3):
        return nn.LeakyReLU(negative_slope=_arg(node, 1, "negative_slope", 0.01))
    return None


def _identity_of(node: fx.Node, source: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """True if ``node`` calls an ``nn.Identity`` (e.g. timm's disabled drop_block) on ``source`` alone."""
    m = modules.get(str(node.target)) if node.op == "call_module" else None
    return (
        isinstance(m, nn.Identity) and type(m).forward is nn.Identity.forward and _only_input(node, source, set(), 1)
    )


_Pair = tuple[fx.Node, fx.Node, nn.Module, list[fx.Node]]


def _feeds_dropout(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """True if the output of ``node`` goes, through single-user ``nn.Identity`` calls, into one dropout module
    (``nn.Dropout*``, timm's ``DropPath`` / ``DropBlock2d``)."""
    while len(node.users) == 1:
        user = next(iter(node.users))
        m = modules.get(str(user.target)) if user.op == "call_module" else None
        if isinstance(m, nn.Identity):
            node = user
            continue
        return m is not None and (isinstance(m, nn.modules.dropout._DropoutNd) or type(m).__name__.startswith("Drop"))
    return False


def _fx_candidates(gm: fx.GraphModule) -> tuple[dict[str, _Pair], list[str]]:
    """BN -> activation pairs in a traced model: ({bn name: (bn node, activation node, activation, identity nodes
    between them)}, all BNs). The BN's output may pass through single-user ``nn.Identity`` calls on its way; a
    dropout in between stops the pairing (the fused layer has no place for it)."""
    modules = dict(gm.named_modules())
    bn_nodes = [
        n for n in gm.graph.nodes if n.op == "call_module" and isinstance(modules.get(str(n.target)), _BatchNorm)
    ]
    calls = Counter(str(n.target) for n in bn_nodes)
    shared = sorted(t for t, c in calls.items() if c > 1)
    if shared:
        raise ValueError(
            f"BatchNorm module(s) {shared} are called more than once in forward(); a shared BN cannot be "
            "converted per call site. Give each call its own BatchNorm."
        )
    pairs = {}
    for node in bn_nodes:
        chain: list[fx.Node] = []
        current = node
        while len(current.users) == 1:
            user = next(iter(current.users))
            if _identity_of(user, current, modules):
                chain.append(user)
                current = user
                continue
            act = _activation_of(user, current, modules)
            if act is not None:
                pairs[str(node.target)] = (node, user, act, chain)
            break
    return pairs, [str(n.target) for n in bn_nodes]


def find_bn_activations(model: nn.Module) -> dict[str, nn.Module]:
    """BatchNorms whose output goes only into an elementwise activation (directly or through ``nn.Identity``
    calls), found by tracing with ``torch.fx``.

    Returns ``{qualified BN name: activation module}`` (functional calls such as ``F.relu`` are reported as the
    equivalent module, e.g. ``nn.ReLU()``). Raises ``RuntimeError`` if the model is not fx-traceable.
    """
    pairs, _ = _fx_candidates(_trace(model))
    return {name: act for name, (_, _, act, _) in pairs.items()}


def _select(
    candidates: Collection[str], all_bns: dict[str, nn.Module], activation_after: ActivationAfter, method: str
) -> set[str]:
    if activation_after is None:
        return set(candidates)
    if callable(activation_after):
        return {n for n in candidates if activation_after(n, all_bns[n])}
    wanted = set(activation_after)
    missing = sorted(wanted - set(candidates))
    if missing:
        hint = (
            "with method='sequential' only a BN directly followed by an activation module inside an "
            "nn.Sequential (not a subclass with its own forward) is recognised; try method='fx'"
            if method == "sequential"
            else "they are not BatchNorms whose output goes only into a supported elementwise activation"
        )
        raise ValueError(f"activation_after names {missing} that cannot be fused: {hint}")
    return wanted


def _gn_pn_from_bn(
    bn: _BatchNorm,
    act: nn.Module,
    groups: int,
    *,
    norm_eps: float | None,
    proxy_eps: float,
    num_quantiles: int,
    moments: Moments,
    copy_affine: bool,
) -> GroupNormProxyAct:
    new = GroupNormProxyAct(
        bn.num_features,
        groups,
        act,
        norm_eps=bn.eps if norm_eps is None else norm_eps,
        proxy_eps=proxy_eps,
        num_quantiles=num_quantiles,
        moments=moments,
        **_factory(bn),
    )
    if copy_affine and bn.affine:
        with torch.no_grad():
            new.proxy.weight.copy_(bn.weight)
            new.proxy.bias.copy_(bn.bias)
    new.train(bn.training)
    return new


def _gn_from_bn(bn: _BatchNorm, groups: int, *, norm_eps: float | None, copy_affine: bool) -> nn.GroupNorm:
    gn = nn.GroupNorm(
        groups, bn.num_features, eps=bn.eps if norm_eps is None else norm_eps, affine=bn.affine, **_factory(bn)
    )
    if copy_affine and bn.affine:
        with torch.no_grad():
            gn.weight.copy_(bn.weight)
            gn.bias.copy_(bn.bias)
    gn.train(bn.training)
    return gn


def convert_to_gn_pn(
    model: nn.Module,
    num_groups: GroupSpec,
    *,
    method: Literal["fx", "sequential"] = "fx",
    activation_after: ActivationAfter = None,
    unfused: Literal["gn", "keep"] = "gn",
    norm_eps: float | None = None,
    proxy_eps: float = 0.03,
    num_quantiles: int = 200,
    moments: Moments = "quadrature",
    copy_affine: bool = True,
) -> nn.Module:
    """Convert a BN + activation model to GN + Proxy Norm (Labatie et al., NeurIPS 2021); see the module doc.

    Args:
        num_groups: GN groups, an int dividing every BN's channel count or a callable ``channels -> groups``
            (1 gives LN + PN).
        method: "fx" (trace and rewrite; returns an ``fx.GraphModule``) or "sequential" (in place; only
            BN -> activation module pairs inside an ``nn.Sequential`` that keeps ``Sequential.forward``).
        activation_after: restrict fusion to these BN names / this predicate (default: all detected pairs).
        unfused: BNs not fused become ``nn.GroupNorm`` with affine ("gn") or stay BatchNorm ("keep").
        norm_eps: GN epsilon, > 0 (default: each BN's eps; the paper's code uses 1e-3).
        proxy_eps, num_quantiles, moments: ``ProxyNorm`` settings (0.03, 200, "quadrature").
        copy_affine: initialise gamma/beta of the PN (or GN) from the BN's weight/bias.

    Returns the converted model (a GraphModule for "fx", ``model`` itself for "sequential").
    """
    if method not in ("fx", "sequential"):
        raise ValueError(f"method must be 'fx' or 'sequential', got {method!r}")
    if unfused not in ("gn", "keep"):
        raise ValueError(f"unfused must be 'gn' or 'keep', got {unfused!r}")
    if norm_eps is not None and not norm_eps > 0:  # nn.GroupNorm accepts 0, which divides a constant group by 0
        raise ValueError(f"norm_eps must be > 0 (or None for each BN's eps), got {norm_eps}")
    pn_kwargs: dict[str, Any] = {
        "norm_eps": norm_eps,
        "proxy_eps": proxy_eps,
        "num_quantiles": num_quantiles,
        "moments": moments,
        "copy_affine": copy_affine,
    }

    def unfused_replacement(name: str, bn: _BatchNorm) -> nn.Module | None:
        if unfused == "keep":
            return None
        return _gn_from_bn(
            bn, _resolve_groups(num_groups, bn.num_features, name), norm_eps=norm_eps, copy_affine=copy_affine
        )

    warn_other_norms = _warn_other_norms(model)
    if isinstance(model, _BatchNorm):
        _refuse_extended([""] if unfused == "gn" else [], {"": model})
        out = unfused_replacement("", model)
        return model if out is None else out

    if method == "fx":
        gm = _trace(model)
        pairs, bn_names = _fx_candidates(gm)
        all_bns = {n: gm.get_submodule(n) for n in bn_names}
        chosen = _select(pairs, all_bns, activation_after, method)
        # (a BN feeding a residual sum or several users is not fused by design; one whose way to its activation
        # runs through a dropout is a fusion this method cannot make: said so)
        modules = dict(gm.named_modules())
        blocked = [str(n.target) for n in gm.graph.nodes if n.op == "call_module" and str(n.target) in all_bns
                   and str(n.target) not in chosen and _feeds_dropout(n, modules)]  # fmt: skip
        _refuse_extended([n for n in bn_names if n in chosen or unfused == "gn"], all_bns)
        for name in bn_names:
            bn: _BatchNorm = all_bns[name]  # type: ignore[assignment]
            if name in chosen:
                bn_node, act_node, act, between = pairs[name]
                groups = _resolve_groups(num_groups, bn.num_features, name)
                gm.set_submodule(name, _gn_pn_from_bn(bn, act, groups, **pn_kwargs))
                act_node.replace_all_uses_with(bn_node)
                for node in [act_node, *reversed(between)]:
                    gm.graph.erase_node(node)
            else:
                new = unfused_replacement(name, bn)
                if new is not None:
                    gm.set_submodule(name, new)
        gm.graph.lint()
        gm.recompile()
        if blocked:
            what = "converted to GroupNorm with affine" if unfused == "gn" else "kept as BatchNorm"
            warnings.warn(
                f"convert_to_gn_pn(method='fx'): {len(blocked)} BatchNorm(s) feed a dropout, which the fused GN + "
                f"Proxy Norm layer has no place for, and were {what}: {blocked}",
                UserWarning,
                stacklevel=2,
            )
        warn_other_norms()
        return gm

    # method == "sequential": in place, adjacent (BN, activation module) entries of nn.Sequential containers
    every_bn = [(n, m) for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, _BatchNorm)]
    uses = Counter(id(m) for _, m in every_bn)
    shared = [n for n, m in every_bn if uses[id(m)] > 1]
    if shared:
        raise ValueError(
            f"BatchNorm module(s) {shared} are one module under several names, so called more than once; a shared BN "
            "cannot be converted per call site. Give each call its own BatchNorm."
        )
    seq_pairs: dict[str, tuple[nn.Sequential, str, str, nn.Module]] = {}
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, nn.Sequential) or type(parent).forward is not nn.Sequential.forward:
            continue  # a subclass with its own forward may not chain its children (e.g. act(bn(x) + x))
        children = list(parent.named_children())
        for (n1, m1), (n2, m2) in zip(children, children[1:], strict=False):
            if isinstance(m1, _BatchNorm) and isinstance(m2, ACTIVATION_MODULES):
                seq_pairs[f"{parent_name}.{n1}" if parent_name else n1] = (parent, n1, n2, m2)
    all_bns = {n: m for n, m in model.named_modules() if isinstance(m, _BatchNorm)}
    chosen = _select(seq_pairs, all_bns, activation_after, method)
    _refuse_extended([n for n in all_bns if n in chosen or unfused == "gn"], all_bns)
    plan: list[tuple[nn.Module, str, nn.Module]] = []  # every replacement is built before the first change
    for name in sorted(chosen):
        parent, n1, n2, act = seq_pairs[name]
        bn = all_bns[name]  # type: ignore[assignment]
        groups = _resolve_groups(num_groups, bn.num_features, name)
        fused = _gn_pn_from_bn(bn, make_activation(act), groups, **pn_kwargs)
        plan += [(parent, n1, fused), (parent, n2, nn.Identity())]
    rest = [n for n in all_bns if n not in chosen]
    for name in rest:
        new = unfused_replacement(name, all_bns[name])  # type: ignore[arg-type]
        if new is not None:
            parent_name, _, attr = name.rpartition(".")
            plan.append((model.get_submodule(parent_name), attr, new))
    for parent, attr, new in plan:
        setattr(parent, attr, new)
    if rest:
        what = "converted to GroupNorm with affine" if unfused == "gn" else "kept as BatchNorm"
        warnings.warn(
            f"convert_to_gn_pn(method='sequential'): {len(rest)} BatchNorm(s) are not directly followed by an "
            f"activation module inside an nn.Sequential that keeps Sequential's forward and were {what}: {rest}. "
            "If their output goes into an activation in forward() (e.g. F.relu), use method='fx' to fuse them "
            "into GN + Proxy Norm.",
            UserWarning,
            stacklevel=2,
        )
    warn_other_norms()
    return model
