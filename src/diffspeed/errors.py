"""The one exception type diffspeed raises: it names the field, the value and what is allowed.

``DiffspeedError`` is bad input (usage, validation, unknown names, hostile files): the CLI exits with 2.
``DiffspeedRuntimeError`` is a failure while doing valid work (out of memory, a failed write, NaN output):
the CLI exits with 1. Both print one line, never a traceback (unless ``--debug``).
"""

from __future__ import annotations


class DiffspeedError(ValueError):
    """A user-facing error: ``str(err)`` is one clear line; ``field`` names the offending input if known."""

    exit_code = 2

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.field = field


class DiffspeedRuntimeError(DiffspeedError):
    """Valid input, failed work: ``str(err)`` says what failed and what to try."""

    exit_code = 1


def check_range(field: str, value, lo, hi, *, kind: type = int) -> None:
    """Raise ``DiffspeedError`` unless ``lo <= value <= hi`` and ``value`` is a ``kind`` (bools rejected)."""
    if isinstance(value, bool) or not isinstance(value, (kind, int) if kind is float else kind):
        raise DiffspeedError(f"{field} must be a {kind.__name__} in [{lo}, {hi}], got {value!r}", field=field)
    if not lo <= value <= hi:
        raise DiffspeedError(f"{field} must be in [{lo}, {hi}], got {value!r}", field=field)


def check_side(field: str, value) -> None:
    """An image width or height: an int in [64, 2048] and a multiple of 8 (the VAE downsamples by 8)."""
    check_range(field, value, 64, 2048)
    if value % 8:
        raise DiffspeedError(f"{field}: {value} is not a multiple of 8 (the VAE downsamples by 8)", field=field)
