"""``tta-norm sabn-train``: SaBN heads on source domains (see :mod:`tta_norm.fitting.cli`)."""

from tta_norm.fitting.cli import sabn_train_add_arguments as add_arguments
from tta_norm.fitting.cli import sabn_train_run as run

__all__ = ["add_arguments", "run"]
