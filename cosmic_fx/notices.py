"""One-time warnings for conditions that do not change within a process (an untransformed model
given to the backend, a recompile budget that cannot fit)."""

from __future__ import annotations

import warnings

__all__ = ["warn_once"]

_WARNED: set[str] = set()


def warn_once(message: str, key: str | None = None) -> None:
    """Warn once per process for each ``key`` (the message itself when no key is given)."""
    key = key or message
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, stacklevel=3)
