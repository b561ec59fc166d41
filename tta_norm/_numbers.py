"""Reading a numeric setting strictly (learning rates, step sizes, probabilities)."""

from __future__ import annotations

import math


def finite_number(name: str, value: object, low: float = -math.inf, high: float = math.inf) -> float:
    """``value`` as a ``float`` when it is a finite ``int`` or ``float`` (not a ``bool``) in ``[low, high]``;
    otherwise a one-line ``ValueError`` naming ``name`` (NaN passes every comparison, so ranges alone miss it)."""
    bounded = "" if (low, high) == (-math.inf, math.inf) else f" in [{low:g}, {high:g}]"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number{bounded}, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be a finite number{bounded}, got {value!r}")
    return float(value)
