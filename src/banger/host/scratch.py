"""The daemon's scratch directories: where its temporary copies live, and their sweep.

Temporary copies that banger makes on the host (a repo staged for a work disk, copies of
``[[file_sync]]`` files on their way to a guest, a guest's fresh ssh host key) go into two
directories of the daemon's own instead of the shared ``/tmp`` and ``/dev/shm``:

- ``<state>/tmp`` on disk;
- ``/dev/shm/banger-<uid>-<hash of the state dir>`` in RAM (big repos stage there).

Both are created 0700 and verified before use (:func:`banger.local.trust.private_dir`:
a real directory, not a symlink, owned by the daemon's uid, no access for others). A
daemon killed with SIGKILL cannot clean up after itself; :meth:`Scratch.sweep`, run at
daemon start once the daemon holds its state directory, removes whatever such a daemon
left in them.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from banger.local.trust import UnsafeDirectory, private_dir

log = logging.getLogger(__name__)

SHM = Path("/dev/shm")
_FIX = "remove it (banger makes it again, its own)"


@dataclass(frozen=True)
class Scratch:
    """The scratch directories of the daemon whose state directory is ``state_dir``."""

    state_dir: Path
    shm: Path = SHM

    @property
    def disk_dir(self) -> Path:
        return self.state_dir / "tmp"

    @property
    def ram_dir(self) -> Path:
        digest = hashlib.sha256(str(self.state_dir.absolute()).encode()).hexdigest()[:12]
        return self.shm / f"banger-{os.geteuid()}-{digest}"

    def disk(self) -> Path:
        """``<state>/tmp``, created and verified."""
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        return private_dir(self.disk_dir, what="scratch directory", fix=_FIX)

    def ram(self) -> Path | None:
        """The RAM scratch directory, created and verified; None (use the disk) when there
        is no /dev/shm or the name is taken by something that is not ours."""
        if not self.shm.is_dir():
            return None
        try:
            return private_dir(self.ram_dir, what="scratch directory", fix=_FIX)
        except UnsafeDirectory as exc:
            log.warning("not staging in RAM: %s", exc)
            return None

    def sweep(self) -> list[Path]:
        """Remove everything in both directories (what a killed daemon left); returns what
        was removed. Only call it while no other daemon uses this state directory."""
        removed: list[Path] = []
        for d in (self.disk_dir, self.ram_dir):
            if not d.exists() and not d.is_symlink():
                continue
            try:
                private_dir(d, what="scratch directory", fix=_FIX)
            except UnsafeDirectory as exc:
                log.warning("not sweeping: %s", exc)
                continue
            for entry in os.scandir(d):
                path = Path(entry.path)
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                removed.append(path)
        return removed
