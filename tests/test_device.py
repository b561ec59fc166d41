"""One device rule for every entry point."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tta_norm.device import resolve_device


def test_explicit_device_wins_and_auto_falls_back():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu"), nn.Linear(2, 2)) == torch.device("cpu")
    auto = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device() == auto and resolve_device("auto", nn.Linear(2, 2).to("meta")) == auto


def test_model_device_when_not_given():
    assert resolve_device(None, nn.Linear(2, 2).to("meta")) == torch.device("meta")
    assert resolve_device(None, nn.BatchNorm2d(2, affine=False).to("meta")) == torch.device("meta")  # buffers only


def test_unknown_device_is_a_value_error():
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        resolve_device("tpu")
