"""Spill folders: temporary folders that hold weights moved out of memory, and their cleanup.

``precision`` (``originals="disk"``) keeps the original weights in one while a recipe is applied, and
``staged`` (``release``) parks components in one during a call. They are large (23 MB for tiny-sd,
gigabytes for SDXL), so none may outlive its process: each is removed by its owner, at normal exit
(``atexit``), and on SIGTERM; one left by a process that could not clean up (SIGKILL, a crash, a power
cut) is swept by the next process that makes one in the same parent folder. The owner's pid is in the
folder's name (``diffspeed-originals-<pid>-<random>``), which is how a sweep tells a dead owner's
folder from a live one's.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import tempfile
import threading
from pathlib import Path

from diffspeed.errors import DiffspeedError

PREFIX = "diffspeed-originals-"
_NAME = re.compile(re.escape(PREFIX) + r"(\d+)-")


class _Registry:
    """The live spill folders of this process.

    The conventions keep optimization state out of module globals; this is the documented exception. A
    signal handler and ``atexit`` are process-wide, so what they clean up must be too. It holds paths only,
    and no lock: the SIGTERM handler runs between two bytecodes of the main thread, which may be inside
    any lock, and ``set.add`` / ``set.discard`` / ``list(set)`` are each atomic under the GIL.
    """

    def __init__(self):
        self.live: set[Path] = set()
        self.swept: set[Path] = set()  # parents swept once by this process
        self.hooked = False  # atexit (and, where possible, SIGTERM) installed
        self.previous = None  # the SIGTERM handler ours replaced


_REGISTRY = _Registry()


def make_spill_dir(parent: str | Path | None = None) -> Path:
    """A new, empty spill folder in ``parent`` (None: the system temp folder), registered for cleanup.

    Raises a one-line :class:`DiffspeedError` naming ``spill_dir`` when ``parent`` is missing, not a folder,
    or not writable (a read-only file system included).
    """
    where = Path(parent).expanduser() if parent is not None else Path(tempfile.gettempdir())
    shown = f"{where}" if parent is not None else f"{where} (the system temp folder; set spill_dir)"
    if not where.exists():
        raise DiffspeedError(f"spill_dir: no such folder: {shown}", field="spill_dir")
    if not where.is_dir():
        raise DiffspeedError(f"spill_dir: {shown} is not a folder", field="spill_dir")
    _hook_once()
    if where.resolve() not in _REGISTRY.swept:
        _REGISTRY.swept.add(where.resolve())
        sweep_stale(where)
    try:
        path = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=where))
    except OSError as err:  # EROFS, EACCES, ENOSPC: mkdtemp is the honest writability test (root ignores modes)
        raise DiffspeedError(f"spill_dir: cannot make a folder in {shown}: {err.strerror or err}",
                             field="spill_dir") from err
    _REGISTRY.live.add(path)
    return path


def remove_spill_dir(path: str | Path | None) -> None:
    """Delete a spill folder made by :func:`make_spill_dir` and forget it; a missing one is fine."""
    if path is None:
        return
    path = Path(path)
    shutil.rmtree(path, ignore_errors=True)
    _REGISTRY.live.discard(path)


def sweep_stale(parent: str | Path | None = None) -> list[Path]:
    """Remove spill folders in ``parent`` (None: the system temp folder) whose owner process is gone.

    Only folders of this user are touched, and only when the pid in their name is not running; one of a
    live process (this one included) is never removed. Returns what was removed.
    """
    where = Path(parent).expanduser() if parent is not None else Path(tempfile.gettempdir())
    removed = []
    try:
        entries = list(os.scandir(where))
    except OSError:  # an unreadable parent: nothing to sweep, and make_spill_dir reports it if it matters
        return removed
    for entry in entries:
        match = _NAME.match(entry.name)
        if match is None or not entry.is_dir(follow_symlinks=False) or not _ours(entry):
            continue
        if _alive(int(match.group(1))):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        if not os.path.lexists(entry.path):
            removed.append(Path(entry.path))
    return removed


def _ours(entry: os.DirEntry) -> bool:
    try:
        return entry.stat(follow_symlinks=False).st_uid == os.getuid()
    except OSError:
        return False


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):  # another user's live process; a pid beyond any
        return True
    return True


def _remove_live() -> None:
    """Remove this process's live spill folders. A forked child inherits the registry but not the folders:
    those carry their owner's pid in their name, and only this pid's are removed."""
    mine = f"{PREFIX}{os.getpid()}-"
    for path in list(_REGISTRY.live):
        if path.name.startswith(mine):
            remove_spill_dir(path)


def _hook_once() -> None:
    """atexit always; SIGTERM where the signal can be caught here (the main thread of the main interpreter)
    and nobody made the process ignore it."""
    if _REGISTRY.hooked:
        return
    _REGISTRY.hooked = True
    atexit.register(_remove_live)
    if threading.current_thread() is not threading.main_thread():
        return  # signal.signal would raise; atexit and the next process's sweep still clean up
    previous = signal.getsignal(signal.SIGTERM)
    if previous is signal.SIG_IGN:
        return  # the process survives SIGTERM, so its folders must too
    _REGISTRY.previous = previous
    signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum, frame) -> None:
    """Chain to a handler installed before ours (a server's graceful shutdown: the process goes on, and
    atexit cleans up when it ends); with none, clean up and die of SIGTERM as the default would."""
    previous = _REGISTRY.previous
    if callable(previous):
        previous(signum, frame)
        return
    _remove_live()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)
