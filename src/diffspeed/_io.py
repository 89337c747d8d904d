"""Safe writes: a file appears whole under its name or not at all (images, reports, checkpoints, caches).

The content goes to a temporary name in the target's folder (the same file system, so the rename is atomic)
and is renamed into place once complete; a failure removes the temporary file and the folders the write made.
No torch here: the CLI's cheap paths and the hardware probe's cache use it too.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

from diffspeed.errors import DiffspeedRuntimeError


def write_beside(dst: Path, write: Callable[[Path], None], *, field: str) -> None:
    """Safe write: ``write(partial)`` fills a temporary file in ``dst``'s folder, renamed onto ``dst`` only once
    ``write`` returns (so it may verify the file first); ``dst`` is never half written.

    On any failure the temporary file goes, and so do the folders made here for ``dst`` (never ones that were
    there before). An ``OSError`` becomes one :class:`DiffspeedRuntimeError` line naming ``dst`` and the real
    cause (read-only file system, disk full): the cleanup's own errors never replace it.
    """
    made: list[Path] = []
    # the temporary name keeps dst's suffix: diffusers picks its reader by suffix when write() verifies
    partial = dst.with_name(f".{dst.stem}.{os.getpid()}.partial{dst.suffix}")
    try:
        made = _missing_folders(dst.parent)
        for folder in reversed(made):  # outermost first
            folder.mkdir(exist_ok=True)
        write(partial)
        os.replace(partial, dst)
    except BaseException as err:
        _remove_quietly(partial, made)
        if isinstance(err, OSError):
            raise DiffspeedRuntimeError(f"{field}: cannot write {dst}: {err.strerror or err}", field=field) from err
        raise


def write_text_beside(dst: Path, text: str, *, field: str) -> None:
    """:func:`write_beside` for a text file."""
    write_beside(Path(dst), lambda partial: partial.write_text(text), field=field)


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and its ancestors that do not exist yet, innermost first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _remove_quietly(partial: Path, folders: list[Path]) -> None:
    """Best-effort cleanup after a failed write: on a read-only file system even ``unlink`` of a missing file
    fails (EROFS), and that must not hide why the write failed. ``rmdir`` only removes empty folders."""
    with contextlib.suppress(OSError):
        partial.unlink(missing_ok=True)
    for folder in folders:  # innermost first
        with contextlib.suppress(OSError):
            folder.rmdir()
