"""Training helpers: optimizer parameter groups with weight-decay control for gamma/beta and biases."""

from .param_groups import NORM_LAYER_TYPES, is_norm_layer, param_groups

__all__ = ["NORM_LAYER_TYPES", "is_norm_layer", "param_groups"]
