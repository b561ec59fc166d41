"""Old names that keep working after a rename: each use emits a ``DeprecationWarning`` that names the new one."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def warn_renamed(old: str, new: str, stacklevel: int = 3) -> None:
    """Warn that ``old`` is deprecated in favour of ``new`` (``stacklevel`` 3: the caller of the old name's
    function)."""
    warnings.warn(f"{old} is deprecated; use {new}", DeprecationWarning, stacklevel=stacklevel)


def renamed_keywords(**new_for_old: str) -> Callable[[F], F]:
    """Decorator: keyword arguments under their old names (``old="new"``) are passed on under the new ones."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            for old, new in new_for_old.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{fn.__qualname__}() got both {old}= and {new}=; pass {new}= only")
                    warn_renamed(f"{fn.__qualname__}({old}=...)", f"{new}=")
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return call  # type: ignore[return-value]

    return decorate


def renamed_attribute(old: str, new: str) -> property:
    """A property ``old`` that reads and writes attribute ``new``."""

    def get(self: Any) -> Any:
        warn_renamed(f"{type(self).__name__}.{old}", f".{new}")
        return getattr(self, new)

    def set(self: Any, value: Any) -> None:
        warn_renamed(f"{type(self).__name__}.{old}", f".{new}")
        setattr(self, new, value)

    return property(get, set, doc=f"Deprecated name of ``{new}``.")
