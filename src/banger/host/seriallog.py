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
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from banger.model.layout import Layout

log = logging.getLogger(__name__)

# How often the logs are looked at. Every console byte is a trapped port write, so a
# guest manages at most a few MiB/s (about 0.7 MiB/s measured under TCG here): the
# file overshoots the cap by a small fraction of it.
INTERVAL = 0.2


def rotate_if_over(path: Path, old: Path, cap: int) -> bool:
    """If ``path`` is bigger than ``cap`` bytes, move its last ``cap`` bytes (plus what
    arrives during the copy) to ``old``, replacing it, and truncate ``path``; True if it
    did."""
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
        src.seek(size - cap)
        try:
            with tmp.open("wb") as dst:
                # Up to the end as it is now, not as it was at fstat: the guest kept
                # writing. Streamed: the cap may be large.
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
                # Right after the last read: the window where a write is lost.
                os.ftruncate(src.fileno(), 0)
            os.replace(tmp, old)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    log.info("serial log %s passed %d bytes: older output moved to %s", path, cap, old)
    return True


def new_boot(path: Path, old: Path) -> None:
    """Before QEMU starts: the previous boot's log becomes ``old``, so each boot starts
    with an empty ``path`` (readiness looks for this boot's sshd marker, and the last
    boot's output is still there to read after a crash)."""
    with contextlib.suppress(FileNotFoundError):
        if path.stat().st_size > 0:
            os.replace(path, old)


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
