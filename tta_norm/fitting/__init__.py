"""Fitting after training, before deployment: what some presets need learned on source data, and sweeps.

* :mod:`tta_norm.fitting.ttn`: TTN post-training of the channel-wise test weights (Lim et al., ICLR 2023).
* :mod:`tta_norm.fitting.sabn`: SaBN heads training and test-time routing (Gong et al., WACV 2022).
* :mod:`tta_norm.fitting.iew`: the inference-example-weighing sweep (Summers & Dinneen, ICLR 2020).
* :mod:`tta_norm.fitting.augment`: the shift-simulating augmentations they share.
* the ``ttn-fit`` and ``sabn-train`` subcommands: :mod:`tta_norm.cli.ttn_fit`, :mod:`tta_norm.cli.sabn_train`.

Names are imported lazily, so that the command-line modules stay light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SHIFT_OPS": "augment",
    "ShiftAugment": "augment",
    "TTNConfig": "ttn",
    "TTNPrior": "ttn",
    "TTNResult": "ttn",
    "fit_ttn": "ttn",
    "shift_sensitivity_prior": "ttn",
    "SaBNConfig": "sabn",
    "SaBNResult": "sabn",
    "SaBNRouter": "sabn",
    "StatsBank": "sabn",
    "train_sabn": "sabn",
    "IEWSweep": "iew",
    "sweep_example_weight": "iew",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"tta_norm.fitting.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'tta_norm.fitting' has no attribute {name!r}")
