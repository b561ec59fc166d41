"""Stream and image inputs that dropped samples or rescaled images silently."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tta_norm.data.tensors import to_float_nchw
from tta_norm.streams import StreamSpec
from tta_norm.streams.orders import dirichlet_order


def test_dirichlet_order_refuses_labels_outside_its_classes():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="not all in 0..9"):  # 40 of 240 samples were dropped
        dirichlet_order(np.repeat(np.arange(12), 20), 0.1, rng, num_classes=10)
    with pytest.raises(ValueError, match="not all in"):
        dirichlet_order(np.r_[np.arange(300) % 10, -1, -1], 0.1, rng)
    assert sorted(dirichlet_order(np.arange(300) % 10, 0.1, rng)) == list(range(300))


def test_batch_sizes_and_sample_counts_must_be_positive_integers():
    for bad in ({"n_per_domain": 0}, {"n_per_domain": -3}, {"n_per_domain": True}, {"n_clean": 5.5}):
        with pytest.raises(ValueError, match="must be an integer >= 1"):
            StreamSpec(**bad)


def test_to_float_nchw_takes_uint8_only():
    img = torch.full((1, 2, 2, 3), 255, dtype=torch.uint8)
    assert to_float_nchw(img).max() == 1.0 and to_float_nchw(img).shape == (1, 3, 2, 2)
    with pytest.raises(TypeError, match="uint8"):
        to_float_nchw(torch.rand(1, 2, 2, 3))  # it returned values in [0, 1/255]


def test_a_domain_without_samples_is_refused():
    """An empty first visit took the stream's reset flag with it; an empty visit scored nothing, silently."""
    from tta_norm.streams import build_stream

    labels = {("fog", 5): np.zeros(0, dtype=np.int64), ("snow", 5): np.arange(10) % 2}
    with pytest.raises(ValueError, match="fog@5.*no samples"):
        build_stream(labels, [("fog", 5), ("snow", 5)], StreamSpec(batch_size=4))
