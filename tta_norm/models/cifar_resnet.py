"""CIFAR ResNets (He et al. 2016, section 4.2) compatible with the ``akamaster/pytorch_resnet_cifar10``
checkpoints.

Architecture (see ``../shared/models/README.md``): 3x3 conv (16) + BN + ReLU; three stages of ``n`` basic
blocks with 16/32/64 channels (``depth = 6n + 2``; stride 2 in the first block of stages 2 and 3);
"option A" shortcut = identity, subsampled with ``x[:, :, ::2, ::2]`` and zero-padded with ``planes //
4`` channels on each side when the shape changes; global average pooling; linear 64 -> ``num_classes``.
Parameter names ``conv1``, ``bn1``, ``layer{1,2,3}.{i}.conv1/bn1/conv2/bn2``, ``linear`` match the
checkpoints (after stripping ``module.``).

The model takes float NCHW images in [0, 1] and normalizes them inside with the ImageNet mean/std the
checkpoints were trained with. The mean/std are non-persistent buffers, so state dicts hold only the
network weights."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class InputNormalization(nn.Module):
    """``(x - mean) / std`` per channel; x is float NCHW in [0, 1]. Non-persistent buffers."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        super().__init__()
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a 1-channel image would broadcast silently (the check is skipped while torch.fx traces the model)
        if not isinstance(x, torch.fx.Proxy) and (x.dim() != 4 or x.shape[1] != self.mean.shape[1]):
            hint = "; for a single image add the batch dimension: x.unsqueeze(0)" if x.dim() == 3 else ""
            raise ValueError(
                f"expected images of shape (N, {self.mean.shape[1]}, H, W) in [0, 1], got {tuple(x.shape)}{hint}"
            )
        return (x - self.mean) / self.std


class _ShortcutA(nn.Module):
    """Parameter-free "option A" shortcut: spatial subsampling by 2 and zero channel padding."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = _ShortcutA(planes // 4)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet with ``depth = 6n + 2`` layers and input normalization inside."""

    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(
                f"CIFAR ResNet depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, 110), got {depth}"
            )
        n = (depth - 2) // 6
        self.depth = depth
        self.normalize = InputNormalization(mean, std)
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes = 16
        stages = []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled 64-d features of images in [0, 1]."""
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = self.layer3(self.layer2(self.layer1(out)))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(x))


def cifar_resnet(depth: int, num_classes: int = 10) -> CifarResNet:
    """Randomly initialized CIFAR ResNet-``depth`` (20, 32, 44, 56, ...) taking [0, 1] NCHW inputs."""
    return CifarResNet(depth=depth, num_classes=num_classes)
