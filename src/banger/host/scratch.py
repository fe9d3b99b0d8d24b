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

    def sweep(self, vms_dir: Path | None = None) -> list[Path]:
        """Remove everything in both directories (what a killed daemon left), and the
        temporaries in each VM directory under ``vms_dir``; returns what was removed.
        Only call it while no other daemon uses this state directory."""
        removed: list[Path] = _sweep_vm_dirs(vms_dir) if vms_dir is not None else []
        for d in (self.disk_dir, self.ram_dir):
            if not d.exists() and not d.is_symlink():
                continue
            try:
                private_dir(d, what="scratch directory", fix=_FIX)
            except UnsafeDirectory as exc:
                log.warning("not sweeping: %s", exc)
                continue
            removed += [_remove(entry) for entry in os.scandir(d)]
        return removed


def _remove(entry: os.DirEntry[str]) -> Path:
    path = Path(entry.path)
    if entry.is_dir(follow_symlinks=False):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return path


def _is_temporary(name: str) -> bool:
    """A VM directory's temporaries: every one banger makes there is a dot-name (a repo
    staged there when too big for RAM ``.workspace-*``, ``.workspace-pending-*``, a work
    disk's ``.work.ext4.staging-*`` and ``.work.ext4.tmp``, ``.root.qcow2.tmp``) or ends
    in ``.tmp`` (``serial.log.1.tmp``, ``handles.tmp``); what a VM keeps never is."""
    return name.startswith(".") or name.endswith(".tmp")


def _sweep_vm_dirs(vms_dir: Path) -> list[Path]:
    # A daemon killed while it built a work disk leaves a copy of the repo (any size) and
    # a disk-sized image there; nothing else would remove them before the VM is deleted.
    removed: list[Path] = []
    try:
        vm_dirs = [e for e in os.scandir(vms_dir) if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return removed
    for vm_dir in vm_dirs:
        removed += [_remove(e) for e in os.scandir(vm_dir.path) if _is_temporary(e.name)]
    return removed
