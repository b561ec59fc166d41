"""Content fingerprints of what a grid cell's result depends on: the model's weights and the test data.

A stored result is reused only when its key matches, and the key includes these fingerprints, so a result
computed with other weights (another model, checkpoint or fine-tuning) or other images (another data set,
``n_examples``, corruption list, a changed generator or release file) is never taken for the current one.
Fingerprints hash the *content* (tensors, pixels, labels), not paths, so the same data found in two cache
directories or on two machines has the same identity.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of the model's state dict: names, dtypes, shapes and values in name order."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def model_identity(name: str, checkpoint: str | None, model: torch.nn.Module) -> dict[str, Any]:
    """The model part of a cell key: its name, the configured checkpoint and the weights' content hash."""
    return {"name": name, "checkpoint": checkpoint, "weights_sha256": model_fingerprint(model)}


def array_fingerprint(*arrays: np.ndarray | torch.Tensor) -> str:
    """SHA-256 (first 16 hex digits) of arrays or tensors: dtype, shape and bytes of each, in order."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else a)
        h.update(f"{a.dtype}:{a.shape};".encode())
        h.update(a.data)
    return h.hexdigest()[:16]


def data_identity(bench: Any) -> dict[str, Any]:
    """The data part of a cell key: data set name, where each domain came from (release, regenerated, clean)
    and the content hash of each domain's images and labels exactly as the cells see them."""
    domains = {}
    for key, data in bench.domains.items():
        name = "@".join(str(k) for k in key) if isinstance(key, tuple) else str(key)
        domains[name] = {"n": int(len(data)), "sha256": array_fingerprint(data.images, data.labels)}
    provenance = getattr(bench, "provenance", None) or {}
    return {
        "dataset": getattr(bench, "dataset", None),
        "provenance": sorted(set(provenance.values())),
        "domains": dict(sorted(domains.items())),
    }
