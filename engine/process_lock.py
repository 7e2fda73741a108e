"""A lock a process holds for its whole life: one engine per run, one runner per study.

`hold` takes an `fcntl.flock` on a lock file and writes the holder's pid into it. The kernel
drops the lock when the process dies, even by SIGKILL, so a crash never leaves a stale lock.
(A child made by a bare `fork` inherits it; such children must not outlive the holder.)
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable
from pathlib import Path

from engine.errors import UserError

# path of the lock file -> fd held by this process, so a lock survives the object that took
# it and taking it twice in one process is a no-op instead of a conflict with ourselves.
_HELD: dict[str, int] = {}


def hold(path: Path, busy: Callable[[int | None], str], wait: float = 0.5) -> None:
    """Hold the lock on `path` for the rest of this process's life; UserError(busy(pid)) if
    another process has it. `is_held` probes take it for microseconds, so a conflict is
    retried for `wait` seconds before it is believed."""
    key = str(Path(path).resolve())
    if key in _HELD:
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise UserError(busy(holder_pid(path))) from None
            time.sleep(0.02)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[key] = fd


def release(path: Path) -> None:
    """Give the lock back early (normally process exit does it)."""
    fd = _HELD.pop(str(Path(path).resolve()), None)
    if fd is not None:
        os.close(fd)  # closing the last fd of the open file releases the flock


def is_held(path: Path) -> bool:
    """Whether some process (this one included) holds the lock on `path` right now."""
    if str(Path(path).resolve()) in _HELD:
        return True
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def holder_pid(path: Path) -> int | None:
    """The pid the holder wrote into the lock file (None if unknown)."""
    try:
        return int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return None
