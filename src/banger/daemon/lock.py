"""One bangerd per state directory: an flock on ``<state>/bangerd.lock`` held for the
daemon's whole life, taken before the socket, the database or anything else is touched.

The kernel drops an flock when its holder dies however it dies, so a SIGKILLed daemon
never leaves a stale lock. The fd is not inherited (Python opens fds close-on-exec and
subprocess closes the rest), so a QEMU that outlives the daemon does not keep the lock.
"""

from __future__ import annotations

import fcntl
import os
import time
from dataclasses import dataclass
from pathlib import Path


class AlreadyRunning(Exception):
    """Another bangerd holds the state directory's lock."""

    def __init__(self, path: Path, holder: int | None) -> None:
        who = f"pid {holder}" if holder is not None else "a process whose pid is not yet written"
        super().__init__(f"bangerd: another bangerd ({who}) already serves this state "
                         f"directory (lock {path}); not starting a second one")
        self.holder = holder


@dataclass(frozen=True)
class StateLock:
    path: Path
    fd: int

    def release(self) -> None:
        os.close(self.fd)  # drops the flock


def acquire(path: Path) -> StateLock:
    """Take the lock or raise :class:`AlreadyRunning` at once, naming the holder's pid."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AlreadyRunning(path, _holder(path)) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return StateLock(path, fd)


def _holder(path: Path, wait: float = 1.0) -> int | None:
    """The pid the holder wrote; it writes it just after taking the lock, so wait a little."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return int(path.read_text().strip())
        except (OSError, ValueError):
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)
