"""Noise corruptions: gaussian, shot, impulse, speckle (Hendrycks & Dietterich, ICLR 2019).

All four follow the original float64 pipeline ``x = img / 255.`` -> noise -> ``clip(., 0, 1) * 255`` ->
truncation to uint8. Shot and impulse noise depend on a pixel only through its byte value and the random
draw, so their outputs are looked up in per-severity tables computed with the original arithmetic.
"""

from __future__ import annotations

import functools

import numpy as np
from scipy import special

from ._common import finish_unit

_VALUES = np.arange(256)
# floor(clip(v / 255., 0, 1) * 255) for every byte: the identity (checked in the tests).
_UNCHANGED = (np.clip(_VALUES / 255.0, 0, 1) * 255).astype(np.uint8)


def gaussian_noise(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    """``clip(x/255 + N(0, c^2), 0, 1) * 255`` per channel value."""
    z = rng.standard_normal(x.shape)
    z *= c
    z += x / 255.0
    return finish_unit(z)


def speckle_noise(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    """``clip(x + x * N(0, c^2), 0, 1) * 255`` with ``x = img / 255``."""
    xf = x / 255.0
    z = rng.standard_normal(x.shape)
    z *= c
    z *= xf
    z += xf
    return finish_unit(z)


def _alias_tables(pmf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Walker/Vose alias table of one distribution: acceptance probabilities and alias indices."""
    k = pmf.size
    scaled = pmf * k / pmf.sum()
    prob = np.ones(k)
    alias = np.arange(k)
    small = [i for i in range(k) if scaled[i] < 1.0]
    large = [i for i in range(k) if scaled[i] >= 1.0]
    while small and large:
        s = small.pop()
        lg = large.pop()
        prob[s] = scaled[s]
        alias[s] = lg
        scaled[lg] = (scaled[lg] + scaled[s]) - 1.0
        (small if scaled[lg] < 1.0 else large).append(lg)
    return prob, alias


@functools.lru_cache(maxsize=16)
def _shot_tables(c: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Alias tables of ``floor(clip(Poisson(v/255*c)/c, 0, 1) * 255)`` for every byte ``v``.

    Outcomes are the counts ``0 .. ceil(c)-1`` and "at least ceil(c)" (all of which clip to 255). Returns
    the acceptance probabilities ``(256, K)``, the byte of each column and the byte of its alias.
    """
    kmax = int(np.ceil(c))
    counts = np.arange(kmax)
    # byte produced by each outcome, computed the way the original does: poisson(.) / c, clip, * 255
    out_bytes = np.append((np.clip(counts / c, 0, 1) * 255).astype(np.uint8), np.uint8(255))
    n_out = kmax + 1
    prob = np.empty((256, n_out))
    primary = np.empty((256, n_out), dtype=np.uint8)
    alias_bytes = np.empty((256, n_out), dtype=np.uint8)
    for v in range(256):
        lam = (v / 255.0) * c
        if lam == 0:
            pmf = np.zeros(n_out)
            pmf[0] = 1.0
        else:
            pmf = np.exp(counts * np.log(lam) - lam - special.gammaln(counts + 1.0))
            pmf = np.append(pmf, special.pdtrc(kmax - 1, lam))  # P(K >= kmax)
        p, a = _alias_tables(pmf)
        prob[v] = p
        primary[v] = out_bytes
        alias_bytes[v] = out_bytes[a]
    return prob, primary, alias_bytes, n_out


def shot_noise(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    """``clip(Poisson(x/255 * c) / c, 0, 1) * 255`` per channel value, sampled exactly by alias tables."""
    prob, primary, alias_bytes, n_out = _shot_tables(float(c))
    u = rng.random(x.shape)
    u *= n_out
    col = u.astype(np.intp)
    np.minimum(col, n_out - 1, out=col)
    frac = u - col
    idx = x.astype(np.intp) * n_out + col
    accept = frac < prob.ravel()[idx]
    return np.where(accept, primary.ravel()[idx], alias_bytes.ravel()[idx])


def impulse_noise(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    """skimage ``random_noise(mode='s&p', amount=c)``: each channel value independently becomes salt (255)
    with probability ``c/2`` and pepper (0) with probability ``c/2``."""
    u = rng.random(x.shape)
    out = _UNCHANGED[x]
    out[u < c] = 0
    out[u < c / 2] = 255
    return out
