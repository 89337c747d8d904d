"""The one exception type diffspeed raises for bad input: it names the field, the value and what is allowed."""

from __future__ import annotations


class DiffspeedError(ValueError):
    """A user-facing error: ``str(err)`` is one clear line; ``field`` names the offending input if known."""

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.field = field


def check_range(field: str, value, lo, hi, *, kind: type = int) -> None:
    """Raise ``DiffspeedError`` unless ``lo <= value <= hi`` and ``value`` is a ``kind`` (bools rejected)."""
    if isinstance(value, bool) or not isinstance(value, (kind, int) if kind is float else kind):
        raise DiffspeedError(f"{field} must be a {kind.__name__} in [{lo}, {hi}], got {value!r}", field=field)
    if not lo <= value <= hi:
        raise DiffspeedError(f"{field} must be in [{lo}, {hi}], got {value!r}", field=field)
