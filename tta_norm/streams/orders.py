"""Sample orders inside one stream segment: pure functions of (labels, parameters, numpy Generator).

- :func:`iid_order`: a uniform random permutation.
- :func:`label_sorted_order`: all samples of class 0, then class 1, ... (random order inside each class);
  the ``correlated`` setting with delta = 0 of Marsden & Doebler's benchmark (REFERENCE part 1, section 1.3).
- :func:`dirichlet_order`: temporally class-correlated order of NOTE (Gong et al., NeurIPS 2022,
  ``learner/dnn.py``), as used by Marsden & Doebler's ``sort_by_dirichlet`` (REFERENCE part 1, section 1.3).
  Our implementation of the published algorithm:

  1. There are as many chunks as classes (C). For each class k in turn: shuffle its indices, draw proportions
     p ~ Dir(delta * 1_C) over the chunks, set p_j = 0 for every chunk that already holds >= N / C samples,
     renormalize, and split the shuffled class-k indices across the chunks at the cumulative proportions
     (``floor(cumsum(p) * n_k)``).
  2. If some chunk ends with fewer than ``min_chunk`` (10) samples, redo step 1 (the original gives up after
     120 s of wall time; we count attempts instead, so the result never depends on machine speed: by default
     ``min(20000, 10**8 // C**2)`` of them (at least 10), since an attempt costs about C**2 draws, which bounds
     a failing search at about a minute for any C; C = 200 classes of 50 images at delta 0.01, ImageNet-R/A
     sized, took 5 to 464 attempts over 5 seeds; fewer than ``min_chunk * C`` samples fail at once).  Chunk
     sizes are counted from the cut points, and the split itself is built only for the draw that is kept.
  3. Emit the chunks in order; inside a chunk, the classes in a random order, each as one contiguous run.

  One deviation: if every chunk still open has zero mass (possible when tiny delta underflows), the class is
  spread uniformly over the open chunks; the original would divide by zero.

  Small delta puts most of a class into one chunk (long single-class runs); large delta spreads every class
  over all chunks (runs of about N / C^2 samples).
"""

from __future__ import annotations

import numpy as np


def iid_order(n: int, rng: np.random.Generator) -> np.ndarray:
    """A uniform random permutation of ``range(n)`` (int64)."""
    return rng.permutation(n).astype(np.int64)


def label_sorted_order(labels: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    """Indices sorted by label; ties in random order if ``rng`` is given, else in index order."""
    labels = np.asarray(labels)
    if rng is None:
        return np.argsort(labels, kind="stable").astype(np.int64)
    perm = rng.permutation(len(labels))
    return perm[np.argsort(labels[perm], kind="stable")].astype(np.int64)


def dirichlet_order(
    labels: np.ndarray,
    delta: float,
    rng: np.random.Generator,
    *,
    num_classes: int | None = None,
    min_chunk: int = 10,
    max_attempts: int | None = None,
) -> np.ndarray:
    """NOTE's Dirichlet class-correlated order of ``labels`` (see the module docstring); returns indices.

    ``num_classes`` defaults to ``max(labels) + 1`` (as in the original). Raises ``ValueError`` if no split
    with every chunk >= ``min_chunk`` is found in ``max_attempts`` draws (default: see the module docstring),
    at once if there are fewer than ``min_chunk * num_classes`` samples."""
    labels = np.asarray(labels, dtype=np.int64)
    if delta <= 0:
        raise ValueError(f"Dirichlet concentration must be > 0 (use label_sorted_order for 0), got {delta}")
    n = len(labels)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    c = int(num_classes if num_classes is not None else labels.max() + 1)
    if labels.min() < 0 or labels.max() >= c:  # (such samples fell in no chunk: a shorter stream, silently)
        raise ValueError(f"labels {int(labels.min())}..{int(labels.max())} are not all in 0..{c - 1} "
                         f"(num_classes {c}); every sample must belong to a class")  # fmt: skip
    if n < min_chunk * c:
        raise ValueError(
            f"a Dirichlet order needs >= {min_chunk} samples per chunk and one chunk per class: {n} samples over "
            f"{c} classes cannot be split (need >= {min_chunk * c}); use more samples or the iid/sorted order"
        )
    if max_attempts is None:
        max_attempts = min(20_000, max(10, 10**8 // c**2))
    cap = n / c
    class_idx = [np.flatnonzero(labels == k) for k in range(c)]
    concentration = np.full(c, float(delta))
    for _ in range(max_attempts):
        sizes = np.zeros(c, dtype=np.int64)
        split: list[tuple[np.ndarray, np.ndarray]] = []  # per class: its shuffled indices and the cut points
        for k in range(c):
            idx = rng.permutation(class_idx[k])
            p = rng.dirichlet(concentration)
            p = p * (sizes < cap)
            total = p.sum()
            if total <= 0 or not np.isfinite(total):  # every open chunk got (numerically) zero mass
                p = (sizes < cap).astype(float)
                total = p.sum()
            cuts = (np.cumsum(p / total) * len(idx)).astype(np.int64)[:-1]
            sizes += np.diff(cuts, prepend=0, append=len(idx))
            split.append((idx, cuts))
        if sizes.min() >= min_chunk:
            break
    else:
        raise ValueError(
            f"could not build a Dirichlet(delta={delta}) order of {n} samples over {c} classes with every chunk "
            f">= {min_chunk} samples in {max_attempts} attempts; use more samples or another delta"
        )
    parts = [np.split(idx, cuts) for idx, cuts in split]  # parts[class][chunk], built once, for the kept split
    parts = [[parts[k][j] for k in range(c)] for j in range(c)]  # parts[chunk][class]
    out = []
    for j in range(c):
        for k in rng.permutation(c):
            out.append(parts[j][k])
    return np.concatenate(out).astype(np.int64)


def class_runs(labels_in_order: np.ndarray) -> np.ndarray:
    """Lengths of the maximal runs of equal consecutive labels."""
    y = np.asarray(labels_in_order)
    if len(y) == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, y[1:] != y[:-1]])
    return np.diff(np.r_[starts, len(y)]).astype(np.int64)
