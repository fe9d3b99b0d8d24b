"""What the daemon would otherwise accumulate forever: its log file and the durable op log.

At start (under the state lock, before any op runs): ops a dead daemon left "running" are
marked interrupted, finished ops past the retention are pruned, and an oversized
``bangerd.log`` is rotated. While running, a thread re-checks the log size every minute
(a stat) and prunes ops once a day.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from banger.store.vms import OperationLog

log = logging.getLogger("bangerd.housekeeping")

LOG_MAX_BYTES = 10 * 1024 * 1024  # then bangerd.log becomes bangerd.log.1 (one old copy)
OPS_KEEP_SECONDS = 30 * 86400     # finished ops are kept 30 days ...
OPS_KEEP_COUNT = 1000             # ... and at most the 1000 latest
LOG_CHECK_EVERY = 60.0
OPS_PRUNE_EVERY = 86400.0

INTERRUPTED = ("interrupted: bangerd stopped (crashed or was killed) while this operation "
               "ran; its VM was reconciled by the next bangerd")


def rotate_log(path: Path, max_bytes: int = LOG_MAX_BYTES) -> bool:
    """Move ``path`` to ``<path>.1`` (replacing the older copy) once it is over
    ``max_bytes``; whether it did.

    The CLI points an autostarted daemon's stdout and stderr at this file, so after the
    rename those fds are re-pointed at a fresh file: the old copy stops growing.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    if st.st_size <= max_bytes:
        return False
    os.replace(path, path.with_name(path.name + ".1"))
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        for target in (1, 2):
            try:
                tst = os.fstat(target)
            except OSError:
                continue
            if (tst.st_dev, tst.st_ino) == (st.st_dev, st.st_ino):
                os.dup2(fd, target)
    finally:
        os.close(fd)
    log.info("rotated %s (%d bytes) to %s.1", path, st.st_size, path.name)
    return True


class Housekeeping:
    def __init__(self, log_path: Path, oplog: OperationLog,
                 clock: Callable[[], float] = time.time) -> None:
        self.log_path = log_path
        self.oplog = oplog
        self.clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def at_start(self) -> None:
        """Run once the state lock is held and before the first operation."""
        rotate_log(self.log_path)
        n = self.oplog.interrupt_running(INTERRUPTED)
        if n:
            log.warning("marked %d operation(s) left running by a dead bangerd interrupted", n)
        self.prune_ops()

    def prune_ops(self) -> int:
        n = self.oplog.prune(older_than=self.clock() - OPS_KEEP_SECONDS, keep=OPS_KEEP_COUNT)
        if n:
            log.info("pruned %d finished operation(s) past the retention", n)
        return n

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="housekeeping", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        next_prune = time.monotonic() + OPS_PRUNE_EVERY
        while not self._stop.wait(LOG_CHECK_EVERY):
            try:
                rotate_log(self.log_path)
                if time.monotonic() >= next_prune:
                    next_prune = time.monotonic() + OPS_PRUNE_EVERY
                    self.prune_ops()
            except Exception:  # housekeeping must never take the daemon down
                log.exception("housekeeping failed; retrying in %.0f s", LOG_CHECK_EVERY)
