"""Reading an index argument strictly (domain and head indices)."""

from __future__ import annotations

import operator


def integer_index(value: object) -> int | None:
    """``value`` as an index: an ``int``, a NumPy integer or a 0-d torch integer tensor; ``None`` for a bool (``True``
    is not index 1), a float or anything else."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None
