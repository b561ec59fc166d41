"""Training-time normalization variants (issue 5).

* Ghost batch normalization: ``GhostBatchNorm1d/2d/3d`` (drop-in ``nn.BatchNormNd`` subclasses) and
  ``convert_to_ghost_bn`` (Hoffer et al. 2017; Summers & Dinneen, ICLR 2020).
* Batch-group normalization (BN + GN for very small batches): ``BatchGroupNorm`` and
  ``convert_to_batch_group_norm`` (Summers & Dinneen 2020; Zhou et al. 2020).
* Proxy Normalization: ``ProxyNorm``, ``GroupNormProxyAct`` and the BN + activation -> GN + PN converter
  ``convert_to_gn_pn`` / ``find_bn_activations`` (Labatie et al., NeurIPS 2021).

The optimizer parameter-group helper for weight decay on gamma/beta lives in ``tta_norm.training``.
"""

from .batch_group_norm import BatchGroupNorm
from .convert import (
    ACTIVATION_MODULES,
    convert_to_batch_group_norm,
    convert_to_ghost_bn,
    convert_to_gn_pn,
    find_bn_activations,
)
from .ghost_batch_norm import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d, ghost_chunk_sizes
from .proxy_norm import GroupNormProxyAct, ProxyNorm, normal_quantiles, relu_gaussian_moments

__all__ = [
    "ACTIVATION_MODULES",
    "BatchGroupNorm",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "GroupNormProxyAct",
    "ProxyNorm",
    "convert_to_batch_group_norm",
    "convert_to_ghost_bn",
    "convert_to_gn_pn",
    "find_bn_activations",
    "ghost_chunk_sizes",
    "normal_quantiles",
    "relu_gaussian_moments",
]
