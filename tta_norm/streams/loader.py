"""Batch iterator over a :class:`~tta_norm.streams.plan.StreamPlan`, with loading overlapped with compute.

A background thread gathers the uint8 rows of the next batches (one vectorized ``take`` per domain present in
the batch, memory-mapped arrays welcome; pinned memory on CUDA) and queues them; the consumer moves them to the
device and scales to float [0, 1] NCHW. NumPy's gather releases the GIL, so loading runs while the model
computes. There is no per-sample Python work.

The float conversion stays on the consumer's thread on purpose: a torch kernel called from the loader thread
starts a second OpenMP team that competes with the model's team for the same cores, and each preempted
thread stalls the model's parallel region at its barrier. Measured with ResNet-20 on 2 cores (batch 200,
``tbn``, 20,000 images): converting in the loader thread made the harness 25 % slower than the bare forward;
converting on the consumer's thread (0.3 ms per batch) leaves +2 %.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Mapping
from typing import NamedTuple

import numpy as np
import torch

from tta_norm.data.tensors import to_float_nchw
from tta_norm.streams.plan import DomainKey, StreamPlan, check_batch_size, domain_name


class Batch(NamedTuple):
    """One stream batch. ``x``: float32 NCHW in [0, 1] on the device; ``y``: int64 labels on the device;
    ``domain``: int64 domain ids (index into ``plan.domains``) on the CPU; ``step``: batch number;
    ``segment``: segment index; ``reset``: first batch of a segment that starts with a model reset;
    ``start``: stream position of the first sample."""

    x: torch.Tensor
    y: torch.Tensor
    domain: torch.Tensor
    step: int
    segment: int
    reset: bool
    start: int


_DONE = object()


class StreamLoader:
    """Iterate over ``plan`` in batches of ``batch_size`` (default ``plan.spec.batch_size``).

    ``data[key]`` is an object with ``images`` (uint8 N x H x W x C) and ``labels`` (int64), e.g.
    :class:`tta_norm.data.ArrayDataset`, for every key in ``plan.domains``. Shapes and row indices are checked
    up front. ``prefetch`` batches are prepared ahead by one background thread (0 = synchronous)."""

    def __init__(
        self,
        plan: StreamPlan,
        data: Mapping[DomainKey, object],
        *,
        device: torch.device | str | None = None,
        batch_size: int | None = None,
        prefetch: int = 2,
    ) -> None:
        self.plan = plan
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.batch_size = check_batch_size(plan.spec.batch_size if batch_size is None else batch_size)
        self.prefetch = prefetch
        self.images: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        shape = None
        for d, key in enumerate(plan.domains):
            if key not in data:
                raise KeyError(f"no data for domain {domain_name(key)}")
            imgs, labs = data[key].images, np.asarray(data[key].labels, dtype=np.int64)
            if imgs.dtype != np.uint8 or imgs.ndim != 4:
                raise ValueError(f"{domain_name(key)}: images must be uint8 NHWC, got {imgs.dtype} {imgs.shape}")
            if shape is not None and imgs.shape[1:] != shape:
                raise ValueError(f"{domain_name(key)}: image shape {imgs.shape[1:]} differs from {shape}")
            shape = imgs.shape[1:]
            rows = plan.index[plan.domain == d]
            if len(rows) and (rows.max() >= len(imgs) or rows.max() >= len(labs)):
                raise IndexError(
                    f"{domain_name(key)}: the plan uses row {rows.max()} but the data has {len(imgs)} images "
                    f"and {len(labs)} labels"
                )
            self.images.append(imgs)
            self.labels.append(labs)
        self.shape = shape
        self.batches = plan.batches(self.batch_size)
        self._resets = {seg.index for seg in plan.segments if seg.reset}

    def __len__(self) -> int:
        return len(self.batches)

    def _gather(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dom = self.plan.domain[start:stop]
        idx = self.plan.index[start:stop]
        n = stop - start
        first = int(dom[0])
        if (dom == first).all():
            x = np.take(self.images[first], idx, axis=0)
            y = self.labels[first][idx]
        else:
            x = np.empty((n,) + self.shape, dtype=np.uint8)
            y = np.empty(n, dtype=np.int64)
            for d in np.unique(dom):
                mask = dom == d
                x[mask] = np.take(self.images[d], idx[mask], axis=0)
                y[mask] = self.labels[d][idx[mask]]
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        if self.device.type == "cuda":
            xt, yt = xt.pin_memory(), yt.pin_memory()
        return xt, yt, torch.from_numpy(np.array(dom, dtype=np.int64))

    def _finish(self, item, b: int) -> Batch:
        (xt, yt, dt), (start, _stop, seg) = item, self.batches[b]
        if self.device.type != "cpu":
            xt, yt = xt.to(self.device, non_blocking=True), yt.to(self.device, non_blocking=True)
        xt = to_float_nchw(xt)  # on the consumer's thread: see the module docstring
        first_of_segment = b == 0 or self.batches[b - 1][2] != seg
        return Batch(xt, yt, dt, b, seg, first_of_segment and seg in self._resets, start)

    def __iter__(self) -> Iterator[Batch]:
        if self.prefetch <= 0:
            for b, (start, stop, _seg) in enumerate(self.batches):
                yield self._finish(self._gather(start, stop), b)
            return
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop_event = threading.Event()

        def put(item: object) -> bool:
            """Queue ``item`` unless the consumer has stopped (then ``False``): never blocks past a stop."""
            while not stop_event.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def worker() -> None:
            try:
                for start, stop, _seg in self.batches:
                    if not put(self._gather(start, stop)):
                        return
                put(_DONE)
            except BaseException as err:  # surface loader errors in the consumer
                put(err)

        thread = threading.Thread(target=worker, name="tta-norm-stream-loader", daemon=True)
        thread.start()
        try:
            for b in range(len(self.batches)):
                item = q.get()
                if isinstance(item, BaseException):
                    raise item
                yield self._finish(item, b)
            tail = q.get()
            if isinstance(tail, BaseException):
                raise tail
        finally:
            stop_event.set()
            thread.join(timeout=5)
