"""SaBNConfig's checks of its values (before any training)."""

from __future__ import annotations

import pytest

from tta_norm.fitting.sabn import SaBNConfig, train_sabn

from .nets import tiny_data, tiny_net


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_config_refuses_a_non_finite_learning_rate(value):
    with pytest.raises(ValueError, match="^lr must be a finite number, got"):
        SaBNConfig(lr=value)
    x, y = tiny_data(8, seed=1)
    with pytest.raises(ValueError, match="^lr must be a finite number"):  # before the training, which saved NaNs
        train_sabn(tiny_net(0), x, y, domains=("clean",), epochs=1, batch_size=4, lr=value, progress=False)
