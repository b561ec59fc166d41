"""Test streams: which sample of which domain comes at every position, where the model is reset, and batches.

A stream is a pure function of (the labels of each domain, the domain schedule, :class:`StreamSpec`, seed): every
method evaluated with the same seed sees exactly the same sample order (:meth:`StreamPlan.fingerprint` proves
it in reports). The order never depends on the batch size; batches never straddle two segments.

Settings (Marsden & Doebler's online TTA benchmark, ``mariodoebler/test-time-adaptation``; REFERENCE part 1,
section 1.3):

- ``continual``: the corruptions one after the other in benchmark order (default severity 5), the model is
  reset only before the first one and gets no shift signal.
- ``reset_each_shift``: same order, model reset before every domain.
- ``mixed`` (``mixed_domains``): all domains pooled and ordered together (one segment); per-domain error is
  recovered from the domain ids.
- ``gradual``: every corruption visited with severities 1-2-3-4-5-4-3-2-1 (one segment per visit, no reset);
  papers report the "mean error at 5" over the severity-5 visits.

Orders inside a segment (:mod:`tta_norm.streams.orders`): ``iid`` (shuffled), ``sorted`` (by label) and
``dirichlet`` (NOTE's class-correlated order with concentration ``delta``). ``mixed`` + ``dirichlet`` is the
``mixed_domains_correlated`` setting.

Optional clean blocks (``clean_interleaved``): a visit of the clean test set after every corruption
(Marsden & Doebler's forgetting protocol), to measure forgetting as the change of clean error over time.

Randomness: one ``numpy.random.SeedSequence(seed)`` spawns an independent generator per visit (and one for
the mixed pool), so a visit's order does not depend on the other visits' sizes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from tta_norm.streams.orders import dirichlet_order, iid_order, label_sorted_order

DomainKey = tuple[str, int]  # (corruption, severity); the clean test set is ("clean", 0)
CLEAN: DomainKey = ("clean", 0)

SETTINGS = ("continual", "reset_each_shift", "mixed", "gradual")
ORDERS = ("iid", "sorted", "dirichlet")
GRADUAL_SEVERITIES = (1, 2, 3, 4, 5, 4, 3, 2, 1)
_SETTING_ALIASES = {"mixed_domains": "mixed", "reset": "reset_each_shift"}
_ORDER_ALIASES = {"shuffled": "iid", "label_sorted": "sorted", "correlated": "sorted", "noniid": "dirichlet"}


def domain_name(key: DomainKey) -> str:
    """``"gaussian_noise@5"``; ``"clean"`` for the clean set."""
    return key[0] if key == CLEAN or key[1] == 0 else f"{key[0]}@{key[1]}"


@dataclass(frozen=True)
class StreamSpec:
    """How to build a stream. ``delta`` is used by ``order="dirichlet"`` only.

    ``n_per_domain``: a seeded random subset of that many samples per visit (all if ``None``).
    ``clean_interleaved``: add a clean block after every corruption (not with ``mixed``), of
    ``n_clean`` samples (``n_per_domain``, or all, if ``None``)."""

    setting: str = "continual"
    order: str = "iid"
    delta: float = 0.1
    batch_size: int = 200
    n_per_domain: int | None = None
    clean_interleaved: bool = False
    n_clean: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "setting", _SETTING_ALIASES.get(self.setting, self.setting))
        object.__setattr__(self, "order", _ORDER_ALIASES.get(self.order, self.order))
        if self.setting not in SETTINGS:
            raise ValueError(f"unknown setting {self.setting!r}; choose from {SETTINGS}")
        if self.order not in ORDERS:
            raise ValueError(f"unknown order {self.order!r}; choose from {ORDERS}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        for name in ("n_per_domain", "n_clean"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1 (or None: all), got {value!r}")
        if self.order == "dirichlet" and not self.delta > 0:
            raise ValueError(f"dirichlet order needs delta > 0, got {self.delta}")
        if self.clean_interleaved and self.setting == "mixed":
            raise ValueError("clean_interleaved blocks need a sequential setting, not 'mixed'")


def check_batch_size(batch_size: int) -> int:
    """``batch_size`` if it is an integer >= 1, else ``ValueError`` (a negative one gave an empty stream)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    return batch_size


def domain_schedule(
    corruptions: Sequence[str],
    severities: Sequence[int] = (5,),
    setting: str = "continual",
    *,
    clean_interleaved: bool = False,
) -> list[DomainKey]:
    """The sequence of domain visits.

    ``continual`` / ``reset_each_shift`` / ``mixed``: ``[(c, s) for c in corruptions for s in severities]``
    (corruption-major, as Marsden & Doebler loop). ``gradual``: per corruption the severities 1-2-3-4-5-4-3-2-1
    when a single severity is given, else ``severities`` as the per-corruption sequence. With
    ``clean_interleaved`` a :data:`CLEAN` visit follows every corruption's visits."""
    setting = _SETTING_ALIASES.get(setting, setting)
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; choose from {SETTINGS}")
    if not corruptions:
        raise ValueError("no corruptions given")
    for s in severities:
        if not 1 <= int(s) <= 5:
            raise ValueError(f"severities must be in 1..5, got {s}")
    per = list(severities)
    if setting == "gradual" and len(per) == 1:
        per = list(GRADUAL_SEVERITIES)
    out: list[DomainKey] = []
    for c in corruptions:
        out += [(c, int(s)) for s in per]
        if clean_interleaved:
            out.append(CLEAN)
    return out


@dataclass(frozen=True)
class Segment:
    """Stream positions ``[start, stop)``: one domain visit (``key``; ``None`` for the mixed pool).
    ``reset``: the model is reset to its source state before this segment."""

    index: int
    key: DomainKey | None
    start: int
    stop: int
    reset: bool

    @property
    def name(self) -> str:
        return "mixed" if self.key is None else domain_name(self.key)


@dataclass(frozen=True)
class StreamPlan:
    """Per stream position: ``domain`` (index into ``domains``) and ``index`` (row in that domain's data)."""

    domains: tuple[DomainKey, ...]
    domain: np.ndarray
    index: np.ndarray
    segments: tuple[Segment, ...]
    spec: StreamSpec
    seed: int

    def __len__(self) -> int:
        return int(len(self.index))

    @property
    def domain_names(self) -> list[str]:
        return [domain_name(k) for k in self.domains]

    def segment_of_position(self) -> np.ndarray:
        """Segment index of every stream position."""
        out = np.empty(len(self), dtype=np.int64)
        for seg in self.segments:
            out[seg.start : seg.stop] = seg.index
        return out

    def batches(self, batch_size: int | None = None) -> list[tuple[int, int, int]]:
        """``(start, stop, segment index)`` of every batch; the last batch of a segment may be smaller."""
        bs = check_batch_size(self.spec.batch_size if batch_size is None else batch_size)
        out = []
        for seg in self.segments:
            out += [(s, min(s + bs, seg.stop), seg.index) for s in range(seg.start, seg.stop, bs)]
        return out

    def labels(self, labels: Mapping[DomainKey, np.ndarray]) -> np.ndarray:
        """Labels in stream order."""
        out = np.empty(len(self), dtype=np.int64)
        for d, key in enumerate(self.domains):
            mask = self.domain == d
            out[mask] = np.asarray(labels[key])[self.index[mask]]
        return out

    def fingerprint(self) -> str:
        """SHA-1 of the (domain key, row) sequence and segment layout: equal iff the streams are identical."""
        h = hashlib.sha1()
        h.update(repr(self.domains).encode())
        h.update(np.ascontiguousarray(self.domain, dtype=np.int64).tobytes())
        h.update(np.ascontiguousarray(self.index, dtype=np.int64).tobytes())
        h.update(repr([(s.start, s.stop, s.reset) for s in self.segments]).encode())
        return h.hexdigest()


def _order(labels: np.ndarray, spec: StreamSpec, rng: np.random.Generator, num_classes: int) -> np.ndarray:
    if spec.order == "iid":
        return iid_order(len(labels), rng)
    if spec.order == "sorted":
        return label_sorted_order(labels, rng)
    return dirichlet_order(labels, spec.delta, rng, num_classes=num_classes)


def build_stream(
    labels: Mapping[DomainKey, np.ndarray],
    schedule: Sequence[DomainKey],
    spec: StreamSpec | None = None,
    seed: int = 0,
) -> StreamPlan:
    """The stream for ``schedule`` (see :func:`domain_schedule`) over domains with the given ``labels``.

    ``labels[key]`` are the labels of that domain's rows; the plan refers to rows by index, so the data can be
    loaded (or memory-mapped) separately. Deterministic in ``seed``; independent of ``spec.batch_size``."""
    spec = spec or StreamSpec()
    schedule = list(schedule)
    if spec.clean_interleaved and CLEAN not in schedule:
        raise ValueError("spec.clean_interleaved is set but the schedule has no clean visits")
    missing = [k for k in dict.fromkeys(schedule) if k not in labels]
    if missing:
        raise KeyError(f"no labels for domains {missing}")
    if spec.setting == "mixed" and len(set(schedule)) != len(schedule):
        raise ValueError("the mixed setting pools each domain once; the schedule repeats domains")
    domains = tuple(dict.fromkeys(schedule))
    empty = [k for k in domains if len(labels[k]) == 0]
    if empty:  # (a visit of no rows scored nothing, and a first one took the stream's reset with it)
        raise ValueError(f"domain(s) {[domain_name(k) for k in empty]} have no samples; a stream visits each one")
    num_classes = int(max(int(np.max(labels[k])) for k in domains) + 1)
    seqs = np.random.SeedSequence(seed).spawn(len(schedule) + 1)

    dom_parts, idx_parts, lab_parts = [], [], []
    for v, key in enumerate(schedule):
        rng = np.random.default_rng(seqs[v])
        y = np.asarray(labels[key])
        rows = np.arange(len(y), dtype=np.int64)
        limit = spec.n_clean if key == CLEAN and spec.n_clean is not None else spec.n_per_domain
        if limit is not None and limit < len(rows):
            rows = np.sort(rng.choice(len(rows), size=limit, replace=False)).astype(np.int64)
        if spec.setting != "mixed":
            rows = rows[_order(y[rows], spec, rng, num_classes)]
        dom_parts.append(np.full(len(rows), domains.index(key), dtype=np.int64))
        idx_parts.append(rows)
        lab_parts.append(y[rows])

    if spec.setting == "mixed":
        domain = np.concatenate(dom_parts)
        index = np.concatenate(idx_parts)
        perm = _order(np.concatenate(lab_parts), spec, np.random.default_rng(seqs[-1]), num_classes)
        domain, index = domain[perm], index[perm]
        segments = (Segment(0, None, 0, len(index), True),)
    else:
        domain = np.concatenate(dom_parts)
        index = np.concatenate(idx_parts)
        segs, pos = [], 0
        for v, (key, part) in enumerate(zip(schedule, idx_parts, strict=True)):
            reset = v == 0 or spec.setting == "reset_each_shift"
            segs.append(Segment(v, key, pos, pos + len(part), reset))
            pos += len(part)
        segments = tuple(segs)
    return StreamPlan(domains, domain, index, segments, spec, int(seed))
