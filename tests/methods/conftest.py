"""Fixtures of the methods tests over the shared ones (tests/conftest.py): the released ResNet-20 and a corrupted
CIFAR-10 stream; every test here writes to a throw-away cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _methods_cache(_isolated_cache):
    """Fisher and TTN caches written by these tests go to the throw-away cache."""


@pytest.fixture(scope="session")
def resnet20(resnet20_checkpoint):
    from tta_norm.models import load_model

    return load_model("resnet20", resnet20_checkpoint, device="cpu").eval()


@pytest.fixture(scope="session")
def cifar_stream(mirror_test_small):
    """The 300 test images shuffled (seed 0) and corrupted with gaussian noise, severity 5: float NCHW + labels."""
    from corruptions import corrupt
    from tta_norm.data.tensors import to_float_nchw

    perm = np.random.default_rng(0).permutation(len(mirror_test_small.labels))
    images = np.ascontiguousarray(mirror_test_small.images[perm])
    noisy = corrupt(images, "gaussian_noise", 5, seed=0)
    x = to_float_nchw(torch.from_numpy(np.ascontiguousarray(noisy)))
    clean = to_float_nchw(torch.from_numpy(images))
    return x, torch.as_tensor(mirror_test_small.labels[perm]), clean
