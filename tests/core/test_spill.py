"""Spill folders: made with the owner's pid in the name, removed on exit and SIGTERM, swept when the owner died."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from diffspeed.core import spill
from diffspeed.core.spill import PREFIX, make_spill_dir, remove_spill_dir, sweep_stale
from diffspeed.errors import DiffspeedError

posix_only = pytest.mark.skipif(os.name != "posix", reason="pids, signals and os.kill(pid, 0) are POSIX")


def _dead_pid() -> int:
    """The pid of a process that has exited and been reaped (so os.kill(pid, 0) finds nothing)."""
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


def _owner(tmp_path: Path, script: str) -> subprocess.Popen:
    """A Python process that runs ``script`` (which may install things), makes a spill folder in tmp_path
    with a file in it, prints its path and sleeps until killed."""
    code = textwrap.dedent(script) + textwrap.dedent(f"""
        import time
        from diffspeed.core.spill import make_spill_dir
        folder = make_spill_dir({str(tmp_path)!r})
        (folder / "weights.pt").write_bytes(b"x" * 4096)
        print(folder, flush=True)
        time.sleep(120)
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)


def _folder_of(child: subprocess.Popen) -> Path:
    line = child.stdout.readline().strip()
    assert line, f"the child died first (rc {child.wait()})"
    folder = Path(line)
    assert folder.is_dir() and folder.name.startswith(f"{PREFIX}{child.pid}-")
    return folder


def test_make_and_remove(tmp_path):
    folder = make_spill_dir(tmp_path)
    assert folder.parent == tmp_path and folder.name.startswith(f"{PREFIX}{os.getpid()}-")
    assert list(folder.iterdir()) == [] and folder in spill._REGISTRY.live
    (folder / "0.pt").write_bytes(b"weights")
    remove_spill_dir(folder)
    assert not folder.exists() and folder not in spill._REGISTRY.live
    remove_spill_dir(folder)  # twice, or a folder already gone: fine
    remove_spill_dir(None)


def test_default_parent_is_the_temp_folder():
    folder = make_spill_dir()
    try:
        assert folder.parent == Path(tempfile.gettempdir())
    finally:
        remove_spill_dir(folder)


@posix_only
def test_sigterm_leaves_nothing_and_still_dies_of_sigterm(tmp_path):
    child = _owner(tmp_path, "")
    try:
        folder = _folder_of(child)
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=60) == -signal.SIGTERM  # the default behaviour, after the cleanup
    finally:
        child.kill()
    assert not folder.exists() and list(tmp_path.iterdir()) == []


@posix_only
def test_sigterm_chains_to_an_earlier_handler(tmp_path):
    """A handler installed before the first spill folder (a server's graceful shutdown) still runs; its
    orderly exit then removes the folder through atexit."""
    marker = tmp_path / "handler-ran"
    child = _owner(tmp_path, f"""
        import signal, sys
        def stop(signum, frame):
            open({str(marker)!r}, "w").close()
            sys.exit(3)
        signal.signal(signal.SIGTERM, stop)
    """)
    try:
        folder = _folder_of(child)
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=60) == 3
    finally:
        child.kill()
    assert marker.exists() and not folder.exists()


@posix_only
def test_sigkill_leaves_a_folder_that_the_next_process_sweeps(tmp_path):
    """SIGKILL (and the bench's kill of a timed-out entry) cannot be caught: the next spill folder made in
    the same parent removes the dead owner's one."""
    child = _owner(tmp_path, "")
    try:
        folder = _folder_of(child)
        child.kill()
        child.wait(timeout=60)
    finally:
        child.kill()
    assert folder.is_dir()  # the owner could not clean up
    spill._REGISTRY.swept.discard(tmp_path.resolve())  # as in a fresh process
    mine = make_spill_dir(tmp_path)
    assert not folder.exists() and list(tmp_path.iterdir()) == [mine]
    remove_spill_dir(mine)


@posix_only
def test_sweep_removes_only_dead_owners_folders(tmp_path):
    dead = tmp_path / f"{PREFIX}{_dead_pid()}-abc"
    (dead / "sub").mkdir(parents=True)
    (dead / "sub" / "0.pt").write_bytes(b"stale weights")
    live_other = tmp_path / f"{PREFIX}{os.getppid()}-def"  # pytest's parent: alive
    live_other.mkdir()
    mine = make_spill_dir(tmp_path)  # this process: alive (and already swept dead/ as its first in tmp_path)
    assert not dead.exists()
    dead.mkdir()  # a second stale one, for an explicit sweep
    unrelated = [tmp_path / f"{PREFIX}notapid-x", tmp_path / "other-123-x", tmp_path / f"{PREFIX}{_dead_pid()}"]
    for folder in unrelated:
        folder.mkdir()
    stale_file = tmp_path / f"{PREFIX}{_dead_pid()}-file"
    stale_file.write_bytes(b"not a folder")

    assert sweep_stale(tmp_path) == [dead]
    assert sorted(tmp_path.iterdir()) == sorted([live_other, mine, *unrelated, stale_file])
    remove_spill_dir(mine)


@posix_only
def test_sweep_ignores_folders_of_other_users(tmp_path, monkeypatch):
    dead = tmp_path / f"{PREFIX}{_dead_pid()}-abc"
    dead.mkdir()
    monkeypatch.setattr(os, "getuid", lambda: os.stat(dead).st_uid + 1)
    assert sweep_stale(tmp_path) == [] and dead.exists()


def test_sweep_of_a_missing_parent_is_quiet(tmp_path):
    assert sweep_stale(tmp_path / "nope") == []


@pytest.mark.parametrize("case", ["missing", "file"])
def test_bad_parent_is_one_line_naming_spill_dir(case, tmp_path):
    parent = tmp_path / "nope"
    if case == "file":
        parent.write_bytes(b"")
    with pytest.raises(DiffspeedError, match=f"^spill_dir: .*{parent}") as err:
        make_spill_dir(parent)
    assert err.value.field == "spill_dir" and "\n" not in str(err.value)


def _refuse_erofs(*args, **kwargs):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS))


def test_read_only_parent_is_one_line_naming_spill_dir(tmp_path, monkeypatch):
    """As root, chmod stops no write; a read-only file system does (simulated: mkdtemp fails with EROFS)."""
    monkeypatch.setattr(tempfile, "mkdtemp", _refuse_erofs)
    with pytest.raises(DiffspeedError) as err:
        make_spill_dir(tmp_path)
    assert str(err.value) == f"spill_dir: cannot make a folder in {tmp_path}: Read-only file system"
    assert err.value.field == "spill_dir"


def test_read_only_system_temp_folder_says_to_set_spill_dir(monkeypatch):
    monkeypatch.setattr(tempfile, "mkdtemp", _refuse_erofs)
    with pytest.raises(DiffspeedError, match=r"^spill_dir: cannot make a folder in .*\(the system temp folder; "
                                             r"set spill_dir\): Read-only file system$"):
        make_spill_dir()


@pytest.mark.skipif(not os.path.isdir("/sys/kernel"), reason="needs Linux sysfs, which refuses new folders")
def test_really_unwritable_parent():
    """A real kernel refusal, where root's writes are refused too (sysfs makes no folders on request)."""
    with pytest.raises(DiffspeedError, match="^spill_dir: cannot make a folder in /sys/kernel: ") as err:
        make_spill_dir("/sys/kernel")
    assert "\n" not in str(err.value)


def test_exit_cleanup_removes_only_this_pids_folders(tmp_path, monkeypatch):
    """A forked child inherits the registry, not the folders: its exit (or SIGTERM) cleanup must remove only
    folders named for its own pid, never its parent's."""
    folder = make_spill_dir(tmp_path)
    real = os.getpid()
    monkeypatch.setattr(os, "getpid", lambda: real + 1)  # as the child sees it
    spill._remove_live()
    assert folder.is_dir()
    monkeypatch.undo()
    spill._remove_live()
    assert not folder.exists() and folder not in spill._REGISTRY.live
