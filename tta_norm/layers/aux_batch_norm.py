"""Per-branch batch normalization for adversarial training: AuxBN and SaAuxBN (Gong et al., WACV 2022, SaBN).

* :class:`AuxBatchNorm2d`: one ``BatchNorm2d`` per branch (statistics **and** affine separate), e.g. branch 0
  for clean and branch 1 for adversarial inputs (Xie et al.'s auxiliary BN, the SaBN paper's baseline).
* :class:`SaAuxBatchNorm2d`: separate statistics per branch (``BatchNorm2d(affine=False)``), then the shared
  "sandwich" affine and then the branch's own affine:
  ``y = g_i * (g_sa * x_hat + b_sa) + b_i``.

The branch is a plain attribute ``branch`` (an int) of every layer, set for a whole model by
:func:`set_branch` or the :func:`use_branch` context manager; it must be known at inference (oracle routing,
as in SaBN's code).  :func:`convert_to_aux_bn` replaces a trained model's ``BatchNorm2d`` layers so that the
converted model starts equal to it on every branch (running statistics copied to every branch; AuxBN copies the
affine to every branch; SaAuxBN puts it in the shared affine and starts the branch affines at the identity),
which makes fine-tuning from a BN checkpoint possible.  Fresh layers initialise the affine parameters as SaBN's
code does: ``N(1, 0.02)`` weights and zero biases for the SaAuxBN embeddings, PyTorch's default for AuxBN.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from ._common import check_channels


class _BranchNorm(nn.Module):
    """``num_branches`` ``BatchNorm2d`` layers (``bns``) and the selected ``branch``; subclasses add affines."""

    def __init__(self, num_features: int, num_branches: int, eps: float, momentum: float | None, affine: bool):
        super().__init__()
        if num_branches < 1:
            raise ValueError(f"num_branches must be >= 1, got {num_branches}")
        self.num_features = num_features
        self.num_branches = num_branches
        self.branch = 0
        self.bns = nn.ModuleList(
            nn.BatchNorm2d(num_features, eps, momentum, affine=affine) for _ in range(num_branches)
        )

    def _check_branch(self) -> int:
        b = int(self.branch)
        if not 0 <= b < self.num_branches:
            raise ValueError(f"{type(self).__name__}: branch {b} out of range for {self.num_branches} branches")
        return b


class AuxBatchNorm2d(_BranchNorm):
    """``num_branches`` independent ``BatchNorm2d`` layers; ``branch`` selects the one applied."""

    def __init__(self, num_features: int, num_branches: int = 2, eps: float = 1e-5, momentum: float | None = 0.1):
        super().__init__(num_features, num_branches, eps, momentum, affine=True)

    def forward(self, x: Tensor) -> Tensor:
        check_channels(x, self.num_features, type(self).__name__)
        return self.bns[self._check_branch()](x)

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d, num_branches: int = 2) -> AuxBatchNorm2d:
        layer = cls(bn.num_features, num_branches, bn.eps, bn.momentum)
        for b in layer.bns:
            b.load_state_dict(bn.state_dict())
        return layer.to(bn.running_mean.device if bn.running_mean is not None else "cpu").train(bn.training)

    def extra_repr(self) -> str:
        return f"{self.num_features}, num_branches={self.num_branches}, branch={self.branch}"


class SaAuxBatchNorm2d(_BranchNorm):
    """Separate statistics per branch, shared sandwich affine ``(g_sa, b_sa)``, per-branch affine ``(g_i, b_i)``.

    Parameters: ``shared_weight``/``shared_bias`` ``(C,)`` and ``branch_weight``/``branch_bias``
    ``(num_branches, C)``; buffers of the per-branch ``BatchNorm2d(affine=False)`` in ``bns``.
    """

    def __init__(self, num_features: int, num_branches: int = 2, eps: float = 1e-5, momentum: float | None = 0.1):
        super().__init__(num_features, num_branches, eps, momentum, affine=False)
        self.shared_weight = nn.Parameter(torch.empty(num_features).normal_(1.0, 0.02))
        self.shared_bias = nn.Parameter(torch.zeros(num_features))
        self.branch_weight = nn.Parameter(torch.empty(num_branches, num_features).normal_(1.0, 0.02))
        self.branch_bias = nn.Parameter(torch.zeros(num_branches, num_features))

    def forward(self, x: Tensor) -> Tensor:
        check_channels(x, self.num_features, type(self).__name__)
        b = self._check_branch()
        x_hat = self.bns[b](x)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        weight = self.branch_weight[b] * self.shared_weight
        bias = self.branch_weight[b] * self.shared_bias + self.branch_bias[b]
        return torch.addcmul(bias.view(shape), x_hat, weight.view(shape))

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d, num_branches: int = 2) -> SaAuxBatchNorm2d:
        layer = cls(bn.num_features, num_branches, bn.eps, bn.momentum)
        device = bn.running_mean.device if bn.running_mean is not None else torch.device("cpu")
        layer = layer.to(device)
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
            layer.branch_weight.fill_(1.0)
            layer.branch_bias.zero_()
        return layer.train(bn.training)

    def extra_repr(self) -> str:
        return f"{self.num_features}, num_branches={self.num_branches}, branch={self.branch}"


def convert_to_aux_bn(model: nn.Module, kind: str = "saaux", num_branches: int = 2) -> list[str]:
    """Replace every ``nn.BatchNorm2d`` of ``model`` in place by an AuxBN (``kind="aux"``) or SaAuxBN
    (``"saaux"``) layer built from it, in the same train/eval mode (the model's function is unchanged on every
    branch).  Returns the names of the replaced layers.  A ``BatchNorm2d`` subclass with its own ``forward``
    (timm's ``BatchNormAct2d``) is refused before anything changes."""
    if kind not in ("aux", "saaux"):
        raise ValueError(f"kind must be 'aux' or 'saaux', got {kind!r}")
    cls = AuxBatchNorm2d if kind == "aux" else SaAuxBatchNorm2d
    found = [(n, m) for n, m in model.named_modules() if type(m) is nn.BatchNorm2d]
    extended = [f"{n} ({type(m).__name__})" for n, m in model.named_modules()
                if isinstance(m, nn.BatchNorm2d) and type(m).forward is not nn.BatchNorm2d.forward]  # fmt: skip
    if extended:
        raise ValueError(
            f"convert_to_aux_bn: {extended} are BatchNorm2d subclasses with their own forward (e.g. timm's "
            "BatchNormAct2d adds an activation); an AuxBN built from them would drop it. Replace them by "
            "nn.BatchNorm2d + activation first"
        )
    if not found:
        raise ValueError(f"model {type(model).__name__} has no nn.BatchNorm2d layer to convert")
    for name, bn in found:
        model.set_submodule(name, cls.from_batchnorm(bn, num_branches))
    return [n for n, _ in found]


def branch_layers(model: nn.Module) -> list[_BranchNorm]:
    return [m for m in model.modules() if isinstance(m, _BranchNorm)]


def set_branch(model: nn.Module, branch: int) -> None:
    """Route every AuxBN/SaAuxBN layer of ``model`` to ``branch`` (0 = clean, 1 = adversarial by convention)."""
    layers = branch_layers(model)
    if not layers:
        raise ValueError("the model has no AuxBN/SaAuxBN layer")
    for m in layers:
        if not 0 <= branch < m.num_branches:
            raise ValueError(f"branch {branch} out of range for {m.num_branches} branches")
        m.branch = branch


@contextlib.contextmanager
def use_branch(model: nn.Module, branch: int) -> Iterator[None]:
    """Within the block, every AuxBN/SaAuxBN layer of ``model`` uses ``branch``; restored afterwards."""
    layers = branch_layers(model)
    saved = [m.branch for m in layers]
    set_branch(model, branch)
    try:
        yield
    finally:
        for m, b in zip(layers, saved, strict=True):
            m.branch = b
