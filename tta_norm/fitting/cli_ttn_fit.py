"""``tta-norm ttn-fit``: TTN post-training on labelled source data (see :mod:`tta_norm.fitting.cli`)."""

from tta_norm.fitting.cli import ttn_fit_add_arguments as add_arguments
from tta_norm.fitting.cli import ttn_fit_run as run

__all__ = ["add_arguments", "run"]
