"""Reading the files of a user's repo without ever following a link out of it.

Files are read through directory file descriptors opened with ``O_NOFOLLOW``: a symlink
in the repo is recorded as a link and never followed, and neither is a directory that was
swapped for a symlink after it was looked at (bangerd may run as root; the repo belongs
to a user). The same holds for the files banger copies from the repo's git directory
(:func:`copy_git_file`). Copies stay in the kernel (``copy_file_range``).
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

# ext4 holds a name of at most 255 bytes; Linux path calls take at most 4095.
NAME_MAX = 255
PATH_MAX = 4095
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO swapped in must not hang the open (regular files ignore it).
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_CHUNK = 1 << 30


class WorkspaceError(Exception):
    """The repo cannot be selected or staged; the message names the path and the fix."""


@dataclass(frozen=True)
class WorkspaceFile:
    path: str  # repo-relative POSIX path
    kind: Literal["file", "symlink"]
    size: int
    mode: int  # permission bits
    link_target: str | None
    tracked: bool = True


def check_name(rel: str) -> None:
    """Refuse a repo-relative path the work disk cannot hold or that would escape it."""
    why = None
    raw = rel.encode("utf-8", "surrogateescape")
    parts = rel.split("/")
    if not rel or rel.startswith("/"):
        why = "is empty or absolute"
    elif "\0" in rel or "\n" in rel or "\r" in rel:
        why = "contains a NUL, newline or carriage return"
    elif "\ufffd" in rel:
        why = "is not valid UTF-8"
    elif any(p in ("", ".", "..") for p in parts):
        why = "has an empty, '.' or '..' component"
    elif ".git" in parts:
        why = "has a '.git' component"
    elif len(raw) > PATH_MAX or any(len(p.encode("utf-8", "surrogateescape")) > NAME_MAX
                                    for p in parts):
        why = f"is longer than ext4 allows ({NAME_MAX} bytes a name, {PATH_MAX} a path)"
    if why is not None:
        raise WorkspaceError(f"cannot copy {rel!r}: the path {why}; rename it "
                             f"(or leave it out of the selection)")


def copy_git_file(path: Path, target: Path) -> None:
    """Copy a file of the repo's git directory, never through a symlink: git writes its
    index as a regular file, and a link there could name any file bangerd can read."""
    try:
        src = os.open(path, _FILE_FLAGS)
    except OSError as exc:
        why = ("is a symlink" if exc.errno == errno.ELOOP
               else f"cannot be read ({exc.strerror})")
        raise WorkspaceError(f"{path} {why}; git keeps it as a regular file and banger will "
                             f"not follow a link there: remove it and rebuild the index "
                             f"with `git reset` (staged changes are lost)") from exc
    _copy_open(src, target, f"{path} is not a regular file; git keeps it as one: remove it "
                            f"and rebuild the index with `git reset`")


class Tree:
    """Reads files under a root through directory fds, never following a symlink.

    Keeps the chain of open directories of the last path, so walking sorted paths opens
    each directory once.
    """

    def __init__(self, root: Path) -> None:
        self._root = os.open(root, _DIR_FLAGS)
        self._stack: list[tuple[str, int]] = []

    def __enter__(self) -> Tree:
        return self

    def __exit__(self, *exc: object) -> None:
        for _, fd in self._stack:
            os.close(fd)
        os.close(self._root)

    def _dir(self, parts: tuple[str, ...]) -> int | None:
        keep = 0
        while (keep < len(self._stack) and keep < len(parts)
               and self._stack[keep][0] == parts[keep]):
            keep += 1
        for _, fd in self._stack[keep:]:
            os.close(fd)
        del self._stack[keep:]
        for part in parts[keep:]:
            parent = self._stack[-1][1] if self._stack else self._root
            try:
                fd = os.open(part, _DIR_FLAGS, dir_fd=parent)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    return None  # gone, or no longer a real directory
                raise
            self._stack.append((part, fd))
        return self._stack[-1][1] if self._stack else self._root

    def inspect(self, rel: str, tracked: bool) -> WorkspaceFile | None:
        """The file at ``rel``; None when it is not in the work tree (deleted, or under a
        directory replaced by a symlink, which git too treats as deleted)."""
        check_name(rel)
        p = PurePosixPath(rel)
        dfd = self._dir(p.parts[:-1])
        if dfd is None:
            return None
        try:
            st = os.lstat(p.name, dir_fd=dfd)
        except FileNotFoundError:
            return None
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(p.name, dir_fd=dfd)
            return WorkspaceFile(rel, "symlink", st.st_size, 0o777, target, tracked)
        if stat.S_ISREG(st.st_mode):
            return WorkspaceFile(rel, "file", st.st_size, stat.S_IMODE(st.st_mode), None,
                                 tracked)
        if stat.S_ISDIR(st.st_mode):
            return None  # a tracked file replaced by a directory: deleted, to git
        raise WorkspaceError(f"cannot copy {rel!r}: it is not a regular file or symlink")

    def copy(self, rel: str, target: Path) -> None:
        """Copy the regular file ``rel`` to ``target`` with its mode and mtime."""
        p = PurePosixPath(rel)
        dfd = self._dir(p.parts[:-1])
        try:
            if dfd is None:
                raise FileNotFoundError(rel)
            src = os.open(p.name, _FILE_FLAGS, dir_fd=dfd)
        except OSError as exc:
            raise WorkspaceError(f"{rel!r} changed while it was being copied ({exc}); "
                                 f"run again") from exc
        _copy_open(src, target, f"{rel!r} is no longer a regular file; run again")


def _copy_open(src: int, target: Path, not_regular: str) -> None:
    """Copy the open file ``src`` (closed here) to the new file ``target`` with its mode
    and mtime; :class:`WorkspaceError` ``not_regular`` unless it is a regular file."""
    try:
        st = os.fstat(src)
        if not stat.S_ISREG(st.st_mode):
            raise WorkspaceError(not_regular)
        dst = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                      stat.S_IMODE(st.st_mode))
        try:
            _copy_data(src, dst, st.st_size)
            os.fchmod(dst, stat.S_IMODE(st.st_mode))
            # The copied index compares mtimes: the copy must keep the original's.
            os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
        finally:
            os.close(dst)
    finally:
        os.close(src)


def _copy_data(src: int, dst: int, size: int) -> None:
    """Copy the first ``size`` bytes, only where ``src`` has data: a hole stays a hole.

    A file's size says nothing of what it holds on disk: a sparse file (a tarball can
    carry one) of a terabyte takes no space in the repo, and copied byte for byte it
    would fill the staging tmpfs (RAM) or the host disk before the work disk ever
    refused it (mkfs keeps holes, so the guest gets it sparse too)."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(src, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            break  # nothing but a hole up to the end
        if start >= size:
            break
        end = min(os.lseek(src, start, os.SEEK_HOLE), size)
        _copy_range(src, dst, start, end - start)
        pos = end
    os.ftruncate(dst, size)


def _copy_range(src: int, dst: int, offset: int, count: int) -> None:
    # copy_file_range stays in the kernel (and reflinks where the filesystem can).
    done = 0
    try:
        while done < count:
            n = os.copy_file_range(src, dst, min(count - done, _CHUNK), offset + done,
                                   offset + done)
            if n == 0:
                return  # the file shrank meanwhile
            done += n
        return
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    # Plain reads for the rest: the kernel may have copied a part before refusing.
    while done < count:
        block = os.pread(src, min(count - done, 1 << 20), offset + done)
        if not block:
            return
        view = memoryview(block)
        while view:
            written = os.pwrite(dst, view, offset + done)
            view = view[written:]
            done += written
