"""Following a VM's log as it grows (`vm logs -f`), across the serial log's rotations.

A :class:`LogFollower` hands out what was written to a log since its last read, a chunk
at a time, so whoever follows holds no more than :data:`CHUNK` bytes (plus the backlog
it starts with, at most ``tail_limit``). The serial log is rotated by copy-and-truncate
(:mod:`banger.host.seriallog`); every read of the live file happens under
:data:`~banger.host.seriallog.ROTATIONS`' lock, so a truncation is never mistaken for
new output: after one, the follower reads the rest of what it had not read from
``serial.log.1`` (where the rotation's record says it sits), then the new file from its
start — no byte lost that the rotation kept, none repeated. A follower that fell behind
by more than the rotation kept (a flooding guest, a slow client) reports how many bytes
it skipped and goes on from the oldest byte kept. A new boot renames the log
(``new_boot``): the follower reads the old file to its end, then the new one.

The lock is only ever tried, never waited on (:meth:`LogFollower.read` answers
:data:`BUSY`), so an event loop can call it: a rotation copying megabytes holds it.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from banger.host.seriallog import ROTATIONS

# One read, one event on the wire: large enough to keep up with a console (a guest under
# TCG writes ~0.7 MiB/s), small enough to bound what a stream holds.
CHUNK = 64 * 1024

BUSY: Final = "busy"


@dataclass(frozen=True)
class Skipped:
    """Output the follower could not read: it was rotated away before it got there.
    ``count`` is None when more than one rotation passed (how much is not known)."""

    count: int | None


Read = bytes | Skipped | Literal["busy"]


def _last_lines(data: bytes, lines: int) -> bytes:
    """The last ``lines`` lines of ``data`` (a last line without its newline counts)."""
    if lines <= 0:
        return b""
    end = len(data) - 1 if data.endswith(b"\n") else len(data)
    cut = end
    for _ in range(lines):
        cut = data.rfind(b"\n", 0, cut)
        if cut < 0:
            return data
    return data[cut + 1:]


def _pread_tail(fd: int, size: int, limit: int) -> bytes:
    start = max(0, size - limit)
    return os.pread(fd, size - start, start)


class LogFollower:
    """Follows ``path``; ``rotated`` is where its rotations put older output (None: a log
    that is never rotated, such as the VMM's)."""

    def __init__(self, path: Path, rotated: Path | None) -> None:
        self.path = path
        self.rotated = rotated
        self._fd: int | None = None
        self._pos = 0
        self._seq = 0
        self._old: int | None = None  # the rotated copy still to read, from its offset
        self._old_left = 0

    # ---- the start: what is there -------------------------------------------------------

    def backlog(self, tail_limit: int, lines: int | None = None) -> bytes | Literal["busy"]:
        """Opens the log and answers its last ``tail_limit`` bytes (reaching back into the
        rotated file), or only its last ``lines`` lines of those; following goes on from
        there."""
        if not ROTATIONS.lock.acquire(blocking=False):
            return BUSY
        try:
            self._open()
            size = os.fstat(self._fd).st_size if self._fd is not None else 0
            current = _pread_tail(self._fd, size, tail_limit) if self._fd is not None else b""
            self._pos = size
            older = b""
            if len(current) < tail_limit and self.rotated is not None:
                with contextlib.suppress(FileNotFoundError):
                    fd = os.open(self.rotated, os.O_RDONLY | os.O_CLOEXEC)
                    try:
                        older = _pread_tail(fd, os.fstat(fd).st_size,
                                            tail_limit - len(current))
                    finally:
                        os.close(fd)
        finally:
            ROTATIONS.lock.release()
        data = older + current
        return data if lines is None else _last_lines(data, lines)

    def _open(self) -> None:
        """Under the lock: the log as it is now, and the rotations it has had."""
        try:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self._fd = None
        self._pos = 0
        rot = ROTATIONS.last(self.path)
        self._seq = rot.seq if rot else 0

    # ---- then: what is new --------------------------------------------------------------

    def read(self) -> Read:
        """What was written since the last read (at most :data:`CHUNK` bytes; b"" if
        nothing), a :class:`Skipped`, or :data:`BUSY` (a rotation is copying: ask again
        in a moment)."""
        if self._old is not None:
            return self._read_old()
        if not ROTATIONS.lock.acquire(blocking=False):
            return BUSY
        try:
            got = self._read_locked()
        finally:
            ROTATIONS.lock.release()
        if got == b"" and self._old is not None:  # a rotation just now: its copy first
            return self._read_old()
        return got

    def _read_old(self) -> bytes:
        assert self._old is not None
        data = os.read(self._old, min(CHUNK, self._old_left))
        self._old_left -= len(data)
        if not data or self._old_left <= 0:
            os.close(self._old)
            self._old = None
        return data

    def _read_locked(self) -> Read:
        if self._fd is None:
            self._open()
            if self._fd is None:
                return b""
        try:
            ino = os.stat(self.path).st_ino
        except FileNotFoundError:
            ino = None
        if ino != os.fstat(self._fd).st_ino:
            # A new boot renamed the log (rotations do not): read the old one to its
            # end, then the new one from its start.
            data = os.pread(self._fd, CHUNK, self._pos)
            self._pos += len(data)
            if data:
                return data
            os.close(self._fd)
            self._open()
            return self._read_locked() if self._fd is not None else b""
        rot = ROTATIONS.last(self.path)
        if rot is not None and rot.seq != self._seq:
            return self._rotated(rot.seq, rot.start, rot.end)
        size = os.fstat(self._fd).st_size
        if size < self._pos:  # truncated by someone else than our rotations: start again
            skipped = Skipped(None)
            self._pos = 0
            return skipped
        data = os.pread(self._fd, CHUNK, self._pos)
        self._pos += len(data)
        return data

    def _rotated(self, seq: int, start: int, end: int) -> Read:
        """Under the lock, the log just rotated (``seq``: its copy holds the old bytes
        ``start``..``end``): go on in the copy from where this follower was."""
        one = seq == self._seq + 1
        self._seq = seq
        pos, self._pos = self._pos, 0  # the live file starts again at 0
        skipped: Skipped | None = None
        if not one:
            skipped, offset = Skipped(None), 0
        elif pos < start:
            skipped, offset = Skipped(start - pos), 0
        else:
            offset = pos - start  # past the copy's end: the lost window, already read
        if offset < end - start and self.rotated is not None:
            with contextlib.suppress(FileNotFoundError):
                self._old = os.open(self.rotated, os.O_RDONLY | os.O_CLOEXEC)
                os.lseek(self._old, offset, os.SEEK_SET)
                self._old_left = end - start - offset
        return skipped if skipped is not None else b""

    def close(self) -> None:
        for fd in (self._fd, self._old):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd = self._old = None
