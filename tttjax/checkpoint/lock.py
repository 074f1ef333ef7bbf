"""One writer per run_dir: `run.lock`, held with flock and naming its holder (host, pid).

The training run holds it from start to end (`Trainer`). The kernel drops an flock when its
process dies, so the lock of a killed run is stale and is taken over; a live holder is refused by
name. Re-entrant within a process. In a multi-process job only process 0 holds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import time
from pathlib import Path

import jax

from tttjax.errors import UserError
from tttjax.rundir import LOCK_FILE

log = logging.getLogger(__name__)

_held: dict[Path, list] = {}  # lock file -> [fd, count] of this process


class RunDirError(UserError):
    """The run_dir cannot be used: another live run holds it, or it is not a writable directory."""


def _holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 1024).decode(errors="replace").strip()


def acquire(run_dir) -> None:
    """Takes the lock of `run_dir` (creating the directory); RunDirError if it is held or not writable."""
    if jax.process_index() != 0:
        return
    run_dir = Path(run_dir).absolute()
    path = run_dir / LOCK_FILE
    if path in _held:
        _held[path][1] += 1
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise RunDirError(f"run_dir {run_dir}: not a writable directory ([Errno {e.errno}] {e.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        for _ in range(20):  # a holder that started a moment ago may not have written its name yet
            if holder:
                break
            time.sleep(0.05)
            holder = _holder(fd)
        os.close(fd)
        raise RunDirError(f"run_dir {run_dir} is in use by another run ({holder or 'holder unknown'}; {path}): "
                          f"wait for it or stop it, or choose another run_dir") from None
    stale = _holder(fd)
    if stale:
        log.warning("taking over the lock of %s, whose process is gone (%s)", run_dir, stale)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()}\n".encode(), 0)
    except OSError as e:
        os.close(fd)
        raise RunDirError(f"run_dir {run_dir}: cannot write {path} ([Errno {e.errno}] {e.strerror})") from None
    _held[path] = [fd, 1]


@contextlib.contextmanager
def holding(run_dir):
    """Yields whether the lock could be taken (released after): a reader that finds a live writer
    leaves the run dir alone instead of failing."""
    try:
        acquire(run_dir)
    except RunDirError:
        yield False
        return
    try:
        yield True
    finally:
        release(run_dir)


def release(run_dir, *, remove_dir: bool = False) -> None:
    """Gives back one `acquire`; the last one empties the file (a clean exit leaves no stale holder).
    `remove_dir`: a run refused at start-up removes the run_dir it created, if it holds only the lock."""
    run_dir = Path(run_dir).absolute()
    path = run_dir / LOCK_FILE
    entry = _held.get(path)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] == 0:
        del _held[path]
        try:
            os.ftruncate(entry[0], 0)
            if remove_dir and [p.name for p in run_dir.iterdir()] == [LOCK_FILE]:
                path.unlink()  # still holding the flock: nobody else can have taken it
                run_dir.rmdir()
        finally:
            os.close(entry[0])  # drops the flock
