"""Training-time normalization variants.

* Ghost batch normalization: ``GhostBatchNorm1d/2d/3d`` (drop-in ``nn.BatchNormNd`` subclasses) and
  ``convert_to_ghost_bn`` (Hoffer et al. 2017; Summers & Dinneen, ICLR 2020).
* Batch-group normalization (BN + GN for very small batches): ``BatchGroupNorm`` and
  ``convert_to_batch_group_norm`` (Summers & Dinneen 2020; Zhou et al. 2020); plain GroupNorm in place of BN:
  ``convert_to_group_norm``.
* Proxy Normalization: ``ProxyNorm``, ``GroupNormProxyAct`` and the BN + activation -> GN + PN converter
  ``convert_to_gn_pn`` / ``find_bn_activations`` (Labatie et al., NeurIPS 2021).

* Per-domain BN for adversarial training: ``AuxBatchNorm2d``, ``SaAuxBatchNorm2d`` (sandwich BN), the converter
  ``convert_to_aux_bn`` and domain routing ``set_domain`` / ``use_domain`` (Gong et al., WACV 2022; the earlier
  names ``set_branch`` / ``use_branch`` still work, with a ``DeprecationWarning``).

The optimizer parameter-group helper for weight decay on gamma/beta lives in ``tta_norm.training``.
"""

from .aux_batch_norm import (
    AuxBatchNorm2d,
    SaAuxBatchNorm2d,
    convert_to_aux_bn,
    domain_layers,
    set_domain,
    use_domain,
)
from .aux_batch_norm import set_branch as set_branch  # the deprecated names, importable but not listed
from .aux_batch_norm import use_branch as use_branch
from .batch_group_norm import BatchGroupNorm
from .convert import (
    ACTIVATION_MODULES,
    convert_to_batch_group_norm,
    convert_to_ghost_bn,
    convert_to_gn_pn,
    convert_to_group_norm,
    find_bn_activations,
)
from .ghost_batch_norm import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d, ghost_chunk_sizes
from .proxy_norm import GroupNormProxyAct, ProxyNorm, normal_quantiles, relu_gaussian_moments

__all__ = [
    "ACTIVATION_MODULES",
    "AuxBatchNorm2d",
    "BatchGroupNorm",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "GroupNormProxyAct",
    "ProxyNorm",
    "SaAuxBatchNorm2d",
    "convert_to_aux_bn",
    "convert_to_batch_group_norm",
    "convert_to_ghost_bn",
    "convert_to_gn_pn",
    "convert_to_group_norm",
    "domain_layers",
    "find_bn_activations",
    "ghost_chunk_sizes",
    "normal_quantiles",
    "relu_gaussian_moments",
    "set_domain",
    "use_domain",
]
