"""A VM's disks: the copy-on-write root overlay and the ext4 work disk.

Owns how they are made without mounting anything and without root: ``qemu-img`` for
the qcow2 overlay (O(1) in the base size), ``mkfs.ext4 -d`` from a staging directory for
the work disk, run inside a user namespace (``unshare -r``) when banger is not root so
the files are recorded as root's (sshd refuses an authorized_keys owned by another uid).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from banger.host.runner import CommandError, run

WORK_LABEL = "banger-work"
# Directories whose contents are private to root inside the guest.
PRIVATE_DIRS = frozenset({".ssh", ".gnupg", ".banger"})
_SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")
# How mkfs.ext4 -d says the files do not fit in the image (blocks or inodes).
_OUT_OF_SPACE = re.compile(r"Could not allocate|No free space", re.I)
# How a tool says the host filesystem under the image is full (ENOSPC's strerror).
_HOST_FULL = os.strerror(errno.ENOSPC)


class DiskError(Exception):
    """A disk image could not be created."""


class HostDiskFull(DiskError):
    """The filesystem the image is written to ran out of space."""


def host_disk_full(where: Path) -> HostDiskFull:
    """The error for a full host filesystem at ``where``, with what is free on it now."""
    probe = where
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        st = os.statvfs(probe)
        free = f"{(st.f_bavail * st.f_frsize) >> 20} MiB free"
    except OSError as exc:
        free = f"free space unknown: {exc.strerror}"
    return HostDiskFull(f"the host disk holding {where} is full ({free}); free space or "
                        f"move BANGER_HOME")


@contextlib.contextmanager
def _host_full_as_error(where: Path) -> Iterator[None]:
    """Turn a write that failed for lack of host space into :class:`HostDiskFull`."""
    try:
        yield
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        raise host_disk_full(Path(exc.filename).parent if exc.filename else where) from exc
    except CommandError as exc:
        if _HOST_FULL not in exc.stderr:
            raise
        raise host_disk_full(where) from exc


def tool(name: str) -> str:
    """Absolute path of a system tool; sbin is searched too (not on a user's PATH)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), *_SBIN])
    found = shutil.which(name, path=path)
    if found is None:
        raise DiskError(f"{name} not found (install e2fsprogs / qemu-utils)")
    return found


def backing_of(overlay: Path) -> Path | None:
    """The backing file a qcow2 overlay records, read from its header (qcow2 spec:
    offset 8, u64 backing_file_offset; 16, u32 backing_file_size), no process needed."""
    try:
        with overlay.open("rb") as f:
            head = f.read(20)
            if len(head) < 20 or head[:4] != b"QFI\xfb":
                return None
            offset = int.from_bytes(head[8:16], "big")
            size = int.from_bytes(head[16:20], "big")
            if offset == 0 or not 0 < size <= 1023:
                return None
            f.seek(offset)
            name = f.read(size)
    except OSError:
        return None
    return Path(os.fsdecode(name)) if len(name) == size else None


def create_overlay(base: Path, overlay: Path) -> None:
    """Create a qcow2 overlay backed by the raw image ``base``; refuses to overwrite."""
    base = base.absolute()
    if not base.is_file():
        raise DiskError(f"base image {base} does not exist")
    if overlay.exists():
        raise FileExistsError(f"{overlay} already exists")
    tmp = overlay.with_name(f".{overlay.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        # The backing path is stored absolute so the overlay works from any cwd.
        with _host_full_as_error(overlay.parent):
            run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(base),
                 str(tmp)])
        os.replace(tmp, overlay)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def build_work_disk(path: Path, size_bytes: int,
                    files: Mapping[str, tuple[bytes, int]],
                    trees: Mapping[str, Path] | None = None) -> None:
    """Make a sparse ext4 image at ``path`` holding ``files`` (relative path -> content,
    mode), everything owned by uid 0; the filesystem root becomes the guest's /root.

    ``trees`` maps a relative path to a directory written there whole (modes, mtimes and
    symlinks kept, e.g. a staged repo as "repo"). Trees are moved, not copied, and so are
    consumed (copied only when they sit on different filesystems from the first one).
    """
    if size_bytes < 8 << 20:
        raise DiskError(f"work disk size {size_bytes} is below the 8 MiB minimum")
    if path.exists():
        raise FileExistsError(f"{path} already exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Staging sits beside the first tree so moving trees in is a rename: the caller picks
    # the filesystem (tmpfs makes the intermediate copy cheap; mkfs reads it once).
    near = next(iter(trees.values())).parent if trees else path.parent
    with _host_full_as_error(near):
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.staging-", dir=near))
    tmp = partial_path(path)
    try:
        # Staging files, the image and mkfs all write to the host: a full disk there is
        # said as such, not taken for a work disk that is too small.
        with _host_full_as_error(path.parent):
            _make_work_disk(path, tmp, staging, size_bytes, files, trees)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def partial_path(path: Path) -> Path:
    """Where the work disk ``path`` is built until it is complete (then renamed)."""
    return path.with_name(f".{path.name}.tmp")


def _make_work_disk(path: Path, tmp: Path, staging: Path, size_bytes: int,
                    files: Mapping[str, tuple[bytes, int]],
                    trees: Mapping[str, Path] | None) -> None:
    staging.chmod(0o700)  # becomes /root: private like a home directory
    for rel, tree in (trees or {}).items():
        _stage_tree(staging, rel, tree)
    for rel, (content, mode) in files.items():
        _stage_file(staging, rel, content, mode)
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    with tmp.open("wb") as f:
        f.truncate(size_bytes)
    argv = [tool("mkfs.ext4"), "-q", "-F", "-L", WORK_LABEL, "-m", "0",
            "-E", "root_owner=0:0", "-d", str(staging), str(tmp)]
    if os.geteuid() != 0:
        # Inside a user namespace where we are uid 0, mkfs records our files as
        # root's; outside it, it would copy our own uid onto every inode.
        argv = ["unshare", "-r", *argv]
    try:
        run(argv, timeout=1800)
    except CommandError as exc:
        if _HOST_FULL not in exc.stderr and _OUT_OF_SPACE.search(exc.stderr):
            need = _tree_bytes(staging)
            raise DiskError(
                f"work disk of {size_bytes >> 20} MiB is too small for its "
                f"{need >> 20} MiB of files (plus filesystem overhead); give the VM a "
                f"larger work disk") from exc
        raise
    # mkfs -d leaves the filesystem root 0755; it becomes /root, a private home.
    run([tool("debugfs"), "-w", "-R", "sif / mode 040700", str(tmp)])
    # Only a complete image ever has the work disk's name: a start that finds the file
    # takes it as made, with the repo in it. On disk before the rename, so that a host
    # crash cannot leave the name on an image whose blocks were never written.
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _stage_file(root: Path, rel: str, content: bytes, mode: int) -> None:
    target = _stage_parents(root, rel)
    target.write_bytes(content)
    target.chmod(mode & 0o7777)


def _stage_parents(root: Path, rel: str) -> Path:
    parts = PurePosixPath(rel).parts
    if not parts or PurePosixPath(rel).is_absolute() or ".." in parts:
        raise DiskError(f"work disk file path {rel!r} must be relative, without '..'")
    cur = root
    for part in parts[:-1]:
        cur = cur / part
        if not cur.exists():
            cur.mkdir()
            cur.chmod(0o700 if part in PRIVATE_DIRS else 0o755)
    return cur / parts[-1]


def _stage_tree(root: Path, rel: str, tree: Path) -> None:
    if not tree.is_dir() or tree.is_symlink():
        raise DiskError(f"work disk tree {tree} for {rel!r} is not a directory")
    target = _stage_parents(root, rel)
    if target.exists():
        raise DiskError(f"work disk path {rel!r} is given twice")
    try:
        os.rename(tree, target)  # O(1): the tree was staged next to the disk for this
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        shutil.copytree(tree, target, symlinks=True)


def _tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


@dataclass(frozen=True)
class InodeInfo:
    uid: int
    gid: int
    mode: int  # permission bits and file type, as st_mode
    size: int


_STAT_RE = re.compile(r"Mode:\s+(\d+).*?User:\s+(\d+)\s+Group:\s+(\d+).*?Size:\s+(\d+)",
                      re.S)
_TYPE_RE = re.compile(r"Type:\s+(\w+)")


def stat_in_image(image: Path, path: str) -> InodeInfo:
    """Owner, mode and size of ``path`` inside an unmounted ext4 image (debugfs)."""
    res = run([tool("debugfs"), "-R", f"stat {path}", str(image)])
    m = _STAT_RE.search(res.stdout)
    t = _TYPE_RE.search(res.stdout)
    if m is None or t is None:
        raise DiskError(f"{image}: cannot stat {path}: {res.stderr.strip()}")
    kind = {"regular": 0o100000, "directory": 0o040000, "symlink": 0o120000}.get(
        t.group(1), 0)
    return InodeInfo(uid=int(m.group(2)), gid=int(m.group(3)),
                     mode=kind | int(m.group(1), 8), size=int(m.group(4)))
