"""The daemon's scratch directories: where its temporary copies live, and their sweep.

Temporary copies that banger makes on the host (a repo staged for a work disk, copies of
``[[file_sync]]`` files on their way to a guest, a guest's fresh ssh host key) go into two
directories of the daemon's own instead of the shared ``/tmp`` and ``/dev/shm``:

- ``<state>/tmp`` on disk;
- ``/dev/shm/banger-<uid>-<hash of the state dir>`` in RAM (big repos stage there).

Both are created 0700 and verified (a real directory, not a symlink, owned by the daemon's
uid, no access for others) before use. A daemon killed with SIGKILL cannot clean up after
itself; :func:`sweep`, run at daemon start once the daemon holds its state directory,
removes whatever such a daemon left in them.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pwd
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SHM = Path("/dev/shm")


class ScratchError(Exception):
    """A scratch directory exists but is not safely ours."""


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
        return private_dir(self.disk_dir)

    def ram(self) -> Path | None:
        """The RAM scratch directory, created and verified; None (use the disk) when there
        is no /dev/shm or the name is taken by something that is not ours."""
        if not self.shm.is_dir():
            return None
        try:
            return private_dir(self.ram_dir)
        except ScratchError as exc:
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
                private_dir(d)
            except ScratchError as exc:
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


def private_dir(path: Path) -> Path:
    """Create ``path`` (mode 0700) if missing, and check it is a real directory owned by
    us that nobody else can enter; raises :class:`ScratchError` naming what is wrong."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise ScratchError(f"{path} is a symlink (to {os.readlink(path)}), not banger's "
                           f"directory: remove it")
    if not stat.S_ISDIR(st.st_mode):
        raise ScratchError(f"{path} is not a directory: remove it")
    if st.st_uid != os.geteuid():
        raise ScratchError(f"{path} belongs to uid {st.st_uid} ({_user(st.st_uid)}), not "
                           f"to uid {os.geteuid()}: remove it")
    if st.st_mode & 0o077:
        # Ours, but opened up (a umask, a hand-made directory): close it before use.
        os.chmod(path, 0o700)
    return path


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return "no such user"
