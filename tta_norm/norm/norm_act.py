"""``AdaptiveNormAct``: an :class:`AdaptiveNorm` followed by dropout and an activation (timm's norm + act layers).

timm builds most of its convolutional networks (EfficientNet, MobileNetV3, RegNet, DenseNet, ...) with
``BatchNormAct2d``, a ``BatchNorm2d`` subclass whose ``forward`` is ``act(drop(batch_norm(x)))``.  Replacing it
by a plain adaptive norm would silently remove the activation; this layer keeps the original ``drop`` and
``act`` modules and applies them after the adaptive normalisation, so every preset sees the activation path
of the trained network (``source`` equals the layer in ``eval()`` mode, ``tbn`` the layer in ``train()``
mode with dropout off).
"""

from __future__ import annotations

from typing import Any, cast

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from tta_norm.norm.adaptive import AdaptiveNorm
from tta_norm.norm.spec import NormSpec


class AdaptiveNormAct(AdaptiveNorm):
    """``act(drop(AdaptiveNorm(x)))``: statistics and affine as :class:`AdaptiveNorm` (it is one, so every
    method and context manager that steers adaptive layers steers it too), then the modules ``drop`` and
    ``act`` (``nn.Identity`` when not given).  ``drop`` follows the model's ``train()``/``eval()`` mode like
    any dropout; the norm part ignores the mode."""

    def __init__(
        self,
        num_features: int,
        spec: NormSpec | None = None,
        *,
        drop: nn.Module | None = None,
        act: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_features, spec, **kwargs)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    @classmethod
    def from_batchnorm(cls, bn: _BatchNorm, spec: NormSpec, name: str = "") -> AdaptiveNormAct:
        """Build from a trained norm + act layer (timm's ``BatchNormAct2d``/``SyncBatchNormAct``): statistics,
        affine and epsilon as :meth:`AdaptiveNorm.from_batchnorm`; the layer's own ``drop`` and ``act``
        modules (shared, not copied; a missing one is the identity)."""
        layer = cast(AdaptiveNormAct, super().from_batchnorm(bn, spec, name=name))
        for attr in ("drop", "act"):
            module = getattr(bn, attr, None)
            if module is not None:
                setattr(layer, attr, module)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(x)))
