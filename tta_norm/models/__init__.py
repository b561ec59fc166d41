"""Models for the harness: CIFAR ResNets, torchvision, timm and robustbench loaders ([0, 1] NCHW inputs)."""

from tta_norm.models.cifar_resnet import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BasicBlock,
    CifarResNet,
    InputNormalization,
    cifar_resnet,
)
from tta_norm.models.loading import (
    CheckpointError,
    build_model,
    load_model,
    load_state,
    read_checkpoint,
)
from tta_norm.models.sources import (
    ModelSource,
    find_release_checkpoint,
    resolve_model_source,
)
from tta_norm.models.wrappers import LogitSubset, NormalizedModel

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BasicBlock",
    "CheckpointError",
    "CifarResNet",
    "InputNormalization",
    "LogitSubset",
    "ModelSource",
    "NormalizedModel",
    "build_model",
    "cifar_resnet",
    "find_release_checkpoint",
    "load_model",
    "load_state",
    "read_checkpoint",
    "resolve_model_source",
]
