"""A tiny real bench grid (torch-only model, a fake two-domain benchmark) for engine tests."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from tta_norm.bench import BenchConfig
from tta_norm.data.benchmark import CorruptionBenchmark
from tta_norm.data.readers import ArrayDataset


def tiny_model(seed: int = 0, num_classes: int = 10) -> nn.Module:
    """conv + BN + ReLU + pool + linear, built from torch modules only (pickles without this module); 10 logits,
    as the ``cifar10`` benchmark it runs on needs (its labels use only 0..2)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))  # fmt: skip
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.2, 0.2)
        model[1].running_var.uniform_(0.5, 1.5)
    return model.eval()


def fake_benchmark(n: int = 24, seed: int = 0) -> CorruptionBenchmark:
    rng = np.random.default_rng(seed)
    domains, provenance = {}, {}
    for i, name in enumerate(("fog", "gaussian_noise")):
        images = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
        labels = rng.integers(0, 3, n)
        domains[(name, 5)] = ArrayDataset(images, labels, ("a", "b", "c"), f"fake-{i}")
        provenance[(name, 5)] = "regenerated"
    return CorruptionBenchmark("cifar10", domains, provenance, "fake", ["fake benchmark"])


def bench_config(output: str, **extra) -> BenchConfig:
    fields = {"name": "tiny", "corruptions": ["fog", "gaussian_noise"], "methods": ["source", "tbn", "tbn+tent"],
              "batch_sizes": [12], "seeds": [0, 1], "device": "cpu", "output": output, "plots": False}  # fmt: skip
    fields.update(extra)
    cfg = BenchConfig(**fields)
    cfg.validate()
    return cfg
