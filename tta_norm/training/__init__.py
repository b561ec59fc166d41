"""Supervised training: source-model preparation, augmentation, schedules and the one loop every trainer uses.

- :mod:`~tta_norm.training.source`: fine-tune (or train) a source model on its source ImageFolder, cached.
- :mod:`~tta_norm.training.loop`: :func:`fit`, the loop that source training, adversarial fine-tuning and the
  studies call with their own loss.
- :mod:`~tta_norm.training.augment`: crop + flip and cutout on whole batches.
- :mod:`~tta_norm.training.schedule`: warm-up + cosine learning rate, weight averaging.
- :mod:`~tta_norm.training.param_groups`: optimizer parameter groups with weight-decay control for gamma/beta
  and biases.
- :mod:`~tta_norm.training.small_batch`: the small-batch training study (normalisation variants of a CIFAR
  ResNet, their training recipe, clean and corruption error).
"""

from .augment import CUTOUT_FILL, augment_batch, cutout_batch
from .loop import FitResult, ThreadChooser, fit
from .param_groups import NORM_LAYER_TYPES, is_norm_layer, param_groups
from .schedule import WeightEMA, lr_at
from .source import (
    TARGET_ACCURACY,
    TrainConfig,
    TrainResult,
    default_checkpoint_path,
    evaluate_accuracy,
    prepare_source_model,
    read_checkpoint_meta,
    train_source_model,
)

__all__ = [
    "CUTOUT_FILL",
    "NORM_LAYER_TYPES",
    "TARGET_ACCURACY",
    "FitResult",
    "ThreadChooser",
    "TrainConfig",
    "TrainResult",
    "WeightEMA",
    "augment_batch",
    "cutout_batch",
    "default_checkpoint_path",
    "evaluate_accuracy",
    "fit",
    "is_norm_layer",
    "lr_at",
    "param_groups",
    "prepare_source_model",
    "read_checkpoint_meta",
    "train_source_model",
]
