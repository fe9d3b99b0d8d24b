"""Caps and rotates the serial logs that QEMU writes.

QEMU appends (``append=on``: ``O_APPEND``) everything a guest prints on its console to the
VM's ``serial.log``, for as long as the guest runs: a guest decides how big that file
gets. :class:`SerialLogCap` is a daemon thread that looks at every VM's serial log a few
times a second and, once one is over the cap, copies its last ``cap`` bytes to
``serial.log.1`` (replacing the previous one) and truncates it to zero, so the two files
together stay under about twice the cap. Deleting a VM removes its directory, both
files with it.

Why copy-and-truncate and not rename: QEMU holds the file open and the daemon cannot
make it reopen a new one; because QEMU writes with ``O_APPEND``, its next write after
the truncation lands at the new end of the file (offset 0), never past a hole. The
bytes the guest writes between the last read of the copy and the truncation (a
microseconds-wide window) are lost; everything else is kept. The guest never waits on
any of this: QEMU writes to a file, not a pipe. The serial output is written by QEMU,
not the daemon, so it survives a daemon restart; while no daemon runs nothing caps it,
and the first pass of the next daemon does.

:data:`ROTATIONS` records, per log, where the last rotation's copy sits in the log as it
was before its truncation, under a lock held for the whole copy-and-truncate: a reader
that follows the log (`vm logs -f`) reads under the same lock, so it tells a truncation
from a write, and picks up exactly where it was in ``serial.log.1``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from banger.model.layout import Layout

log = logging.getLogger(__name__)

# How often the logs are looked at. Every console byte is a trapped port write, so a
# guest manages at most a few MiB/s (about 0.7 MiB/s measured under TCG here): the
# file overshoots the cap by a small fraction of it.
INTERVAL = 0.2


@dataclass(frozen=True)
class Rotation:
    """The last rotation of one log by this process: the ``seq``-th; its copy holds the
    log's bytes ``start`` to ``end`` (``end``: the log's size when it was truncated)."""

    seq: int
    start: int
    end: int


class Rotations:
    """The last :class:`Rotation` of each log, and the lock every rotation holds from its
    first read to its record: under it a reader sees the log and the record agree."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._last: dict[Path, Rotation] = {}

    def last(self, path: Path) -> Rotation | None:
        """Call with :attr:`lock` held."""
        return self._last.get(path)

    def _record(self, path: Path, start: int, end: int) -> None:
        prev = self._last.get(path)
        self._last[path] = Rotation(seq=prev.seq + 1 if prev else 1, start=start, end=end)


ROTATIONS = Rotations()


def rotate_if_over(path: Path, old: Path, cap: int) -> bool:
    """If ``path`` is bigger than ``cap`` bytes, move its last ``cap`` bytes (plus what
    arrives during the copy) to ``old``, replacing it, and truncate ``path``; True if it
    did."""
    with ROTATIONS.lock:
        return _rotate_if_over(path, old, cap)


def _rotate_if_over(path: Path, old: Path, cap: int) -> bool:
    try:
        # Opened for writing: the truncation below goes to this very file even if it is
        # renamed meanwhile (new_boot at a VM start).
        src = path.open("r+b")
    except FileNotFoundError:
        return False
    tmp = old.with_name(old.name + ".tmp")
    with src:
        size = os.fstat(src.fileno()).st_size
        if size <= cap:
            return False
        start = end = size - cap
        src.seek(start)
        try:
            with tmp.open("wb") as dst:
                # Up to the end as it is now, not as it was at fstat: the guest kept
                # writing. Streamed: the cap may be large.
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
                    end += len(chunk)
                # Right after the last read: the window where a write is lost.
                os.ftruncate(src.fileno(), 0)
            os.replace(tmp, old)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        ROTATIONS._record(path, start, end)
    log.info("serial log %s passed %d bytes: older output moved to %s", path, cap, old)
    return True


def new_boot(path: Path, old: Path) -> None:
    """Before QEMU starts: the previous boot's log becomes ``old``, so each boot starts
    with an empty ``path`` (readiness looks for this boot's sshd marker, and the last
    boot's output is still there to read after a crash)."""
    with ROTATIONS.lock, contextlib.suppress(FileNotFoundError):
        if path.stat().st_size > 0:
            os.replace(path, old)
            # A new file: its rotations count from none (a follower tells it by its inode).
            ROTATIONS._last.pop(path, None)


class SerialLogCap:
    """Keeps the serial log of every VM directory in ``layout`` under ``cap()`` bytes (read
    each pass, so a config change applies without a restart)."""

    def __init__(self, layout: Layout, cap: Callable[[], int],
                 interval: float = INTERVAL) -> None:
        self.layout = layout
        self.cap = cap
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> None:
        """One pass over every VM directory."""
        try:
            entries = list(os.scandir(self.layout.vms_dir))
        except FileNotFoundError:
            return
        cap = self.cap()
        for entry in entries:
            # A VM deleted under our feet is not an error.
            paths = self.layout.vm(entry.name)
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                rotate_if_over(paths.serial_log, paths.serial_log_rotated, cap)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="serial-log-cap",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.check()
            except Exception:  # a bad pass must not end the cap for good
                log.exception("serial log cap pass failed")
            self._stop.wait(self.interval)
