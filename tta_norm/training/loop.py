"""The supervised training loop every trainer of the package calls with its own loss.

:func:`fit` owns what all of them share: a seeded permutation per epoch, mini-batches of indices, the learning
rate per step, ``zero_grad`` / ``backward`` / ``step``, an optional scheduler, a time budget, progress and a
per-epoch record. What differs (augmentation, adversarial examples, several domains, the loss) lives in the
caller's ``loss_fn``, which receives the batch's indices and returns the loss.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

LossFn = Callable[[Tensor], "Tensor | tuple[Tensor, dict[str, Tensor]]"]


@dataclass
class FitResult:
    """What :func:`fit` did: optimizer steps taken, steps planned, one record per (possibly partial) epoch
    (``train_loss`` plus each summed quantity ``loss_fn`` returned, divided by the samples seen), and whether
    ``max_minutes`` stopped it early."""

    steps: int
    total: int
    history: list[dict] = field(default_factory=list)
    stopped_early: bool = False


def fit(
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    *,
    n: int,
    batch_size: int,
    epochs: int,
    generator: torch.Generator,
    drop_last: bool = False,
    lr: Callable[[int, int], float] | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    after_step: Callable[[int, Tensor, dict[str, Tensor]], None] | None = None,
    on_epoch_end: Callable[[dict], None] | None = None,
    max_minutes: float | None = None,
    index_device: torch.device | str | None = None,
    progress: bool = True,
    desc: str = "train",
) -> FitResult:
    """Take ``optimizer`` steps for ``epochs`` passes over ``n`` samples in batches of ``batch_size``.

    Each epoch draws ``torch.randperm(n, generator=generator)`` (moved to ``index_device``) and calls
    ``loss_fn(indices)``; ``loss_fn`` may draw further numbers from the same generator (augmentation), so the
    whole run is a function of the generator's seed. It returns the loss, or ``(loss, sums)`` where ``sums`` maps
    names to per-batch sums (e.g. correct predictions) accumulated per epoch. ``lr(step, total)`` sets every
    param group's learning rate before the step; ``scheduler.step()`` runs after it; ``after_step(step, loss,
    sums)`` after that (weight averaging, logging). ``drop_last`` skips a final partial batch. ``max_minutes``
    stops after the step that exceeds the budget (the schedule is not stretched; the result says so). The
    caller sets the model's mode (``fit`` never calls ``train()``/``eval()``).
    Gradients are enabled for ``loss_fn`` and the backward pass even when the caller runs under ``no_grad``."""
    from tqdm.auto import tqdm

    steps_per_epoch = n // batch_size if drop_last else math.ceil(n / batch_size)
    total = steps_per_epoch * epochs
    result = FitResult(steps=0, total=total)
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc=desc, unit="step", disable=not progress, leave=False)
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=generator)
        if index_device is not None:
            perm = perm.to(index_device)
        loss_sum: Tensor | float = 0.0
        sums: dict[str, Tensor] = {}
        seen = 0
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            if lr is not None:
                for group in optimizer.param_groups:
                    group["lr"] = lr(result.steps, total)
            with torch.enable_grad():
                out = loss_fn(idx)
                loss, batch_sums = out if isinstance(out, tuple) else (out, {})
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            loss_sum = loss_sum + loss.detach() * len(idx)
            for k, v in batch_sums.items():
                sums[k] = sums[k] + v if k in sums else v
            seen += len(idx)
            result.steps += 1
            if after_step is not None:
                after_step(result.steps - 1, loss, batch_sums)
            bar.update(1)
            if max_minutes is not None and time.perf_counter() - t0 > 60 * max_minutes:
                result.stopped_early = True
                break
        record = {"epoch": epoch + 1, "train_loss": float(loss_sum) / max(1, seen)}
        record.update({k: float(v) / max(1, seen) for k, v in sums.items()})
        record["time_s"] = round(time.perf_counter() - t0, 1)
        bar.set_postfix(loss=f"{record['train_loss']:.3f}")
        if on_epoch_end is not None:
            on_epoch_end(record)
        result.history.append(record)
        if result.stopped_early:
            break
    bar.close()
    return result


class ThreadChooser:
    """Per-epoch choice of the CPU thread count when ``threads`` is None (CPU only).

    On a machine shared with other jobs, torch's OpenMP threads can be descheduled at every barrier: measured
    with the load average at 10 on 2 cores, one ResNet-20 training step ran 10x faster with 1 thread than
    with 2. The first ``2 * PROBE`` steps of each epoch alternate blocks of 1 thread and the default count;
    the faster median wins for the rest of the epoch. The data order and augmentation do not depend on it."""

    PROBE = 3

    def __init__(self, threads: int | None, device: torch.device) -> None:
        self.default = torch.get_num_threads()
        self.fixed = threads
        self.auto = threads is None and device.type == "cpu" and self.default > 1
        self.candidates = (1, self.default)
        self.times: dict[int, list[float]] = {}
        self.k = 0
        self.t0 = 0.0
        if threads is not None:
            torch.set_num_threads(threads)

    def new_epoch(self) -> None:
        self.k = 0
        self.times = {c: [] for c in self.candidates}

    def before_step(self) -> None:
        if self.auto and self.k < 2 * self.PROBE:
            torch.set_num_threads(self.candidates[self.k // self.PROBE])
            self.t0 = time.perf_counter()

    def after_step(self) -> None:
        if not self.auto or self.k >= 2 * self.PROBE:
            return
        self.times[self.candidates[self.k // self.PROBE]].append(time.perf_counter() - self.t0)
        self.k += 1
        if self.k == 2 * self.PROBE:
            best = min(self.candidates, key=lambda c: float(np.median(self.times[c])))
            torch.set_num_threads(best)

    def restore(self) -> None:
        torch.set_num_threads(self.default)
