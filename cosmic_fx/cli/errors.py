"""The one exception the commands raise for a failure the user can fix."""

from __future__ import annotations

__all__ = ["CLIError"]


class CLIError(Exception):
    """A failure to report on stderr with exit code 1 (no traceback)."""
