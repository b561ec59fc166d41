"""Models for the harness: CIFAR ResNets, torchvision and robustbench loaders ([0, 1] NCHW inputs)."""

from tta_norm.models.cifar_resnet import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BasicBlock,
    CifarResNet,
    InputNormalization,
    cifar_resnet,
)
from tta_norm.models.loading import (
    NormalizedModel,
    find_release_checkpoint,
    load_model,
    load_state,
    read_checkpoint,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BasicBlock",
    "CifarResNet",
    "InputNormalization",
    "NormalizedModel",
    "cifar_resnet",
    "find_release_checkpoint",
    "load_model",
    "load_state",
    "read_checkpoint",
]
