"""The host's side of `vm cp`'s tar streams from the guest: extracting one, which is
hostile input (the tars `vm cp` sends are made by :mod:`banger.local.tarwrite`).

:func:`extract` writes nothing outside its destination directory, whatever the tar says:
- names that are absolute, empty or hold a `..` component or a NUL are refused;
- every parent directory is opened one component at a time from the destination with
  ``O_NOFOLLOW``, so no entry is ever written through a symlink (one that was there, or
  one the same tar made just before);
- files and symlinks are made under a temporary name in their directory and renamed
  over the final name (a symlink in the way is replaced, not followed; a directory in the
  way is an error);
- symlinks are kept as links whatever their target (they are text; nothing is written
  through them), hard links, devices, fifos and other kinds are refused;
- modes keep their permission bits (exec bits included) less the process's umask, as
  cp, scp and tar do for a user (a guest cannot make the host's copy world-writable), and
  never setuid, setgid or sticky; directories get theirs at the end, deepest first (a
  read-only one can still be filled);
- an mtime no file can have (NaN, 1e300: a pax header is text) is refused;
- extension headers (pax, GNU long names) over :data:`MAX_HEADER` are refused before
  they are read, so a tar cannot make banger hold more than that.

An error names the entry (escaped) and stops the extraction; entries already complete
stay. Python's own ``data`` filter was not enough: it refuses every symlink pointing out
of the tree (a tree may hold ``config -> /etc/app.conf``, which `vm cp` keeps) and it
still opens parents by path.
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import stat
import tarfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

# A pax header or GNU long name larger than this is refused (the agent's own cap).
MAX_HEADER = 64 * 1024
COPY = 1 << 20
# The mtimes an entry may have (about ±292 years around 1970: what a time_t in ns holds).
MAX_MTIME = (1 << 63) // 10**9
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafeTar(Exception):
    """An entry of a tar that :func:`extract` refuses (the message names it)."""


def shown(name: str) -> str:
    """A tar name as a terminal may show it (it came from a guest)."""
    text = name.encode("utf-8", "surrogateescape").decode("ascii", "backslashreplace")
    text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
    return text if len(text) <= 200 else text[:200] + "…"


class GuardedInfo(tarfile.TarInfo):
    """A TarInfo that refuses extension headers too large to hold."""

    def _proc_member(self, tar: tarfile.TarFile) -> Any:
        if self.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE,
                         tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK) \
                and self.size > MAX_HEADER:
            raise UnsafeTar(f"an extension header of {self.size} bytes (cap {MAX_HEADER})")
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise UnsafeTar(f"entry {shown(self.name)}: sparse files are not supported")
        return super()._proc_member(tar)  # type: ignore[misc]


@dataclass
class Extracted:
    entries: int = 0
    bytes: int = 0
    top_kind: str | None = None  # "dir", "file" or "symlink": the first entry's
    umask: int = 0o022
    _dirs: list[tuple[tuple[str, ...], int, float]] = field(default_factory=list)


def parts(name: str) -> tuple[str, ...]:
    """``name``'s components; UnsafeTar when it is absolute, empty or climbs out."""
    if "\0" in name:  # a pax header is text: os would raise ValueError on it
        raise UnsafeTar(f"entry {shown(name)}: a NUL in its name")
    if name.startswith("/"):
        raise UnsafeTar(f"entry {shown(name)}: an absolute name")
    comps = tuple(c for c in name.split("/") if c not in ("", "."))
    if not comps:
        raise UnsafeTar(f"entry {shown(name)}: an empty name")
    if ".." in comps:
        raise UnsafeTar(f"entry {shown(name)}: a '..' component")
    return comps


def _kind(m: tarfile.TarInfo) -> str:
    if m.isreg():
        return "file"
    if m.isdir():
        return "dir"
    if m.issym():
        if "\0" in m.linkname:
            raise UnsafeTar(f"entry {shown(m.name)}: a NUL in its link's target")
        return "symlink"
    what = ("a hard link" if m.islnk() else "a device node" if m.ischr() or m.isblk()
            else "a fifo" if m.isfifo() else f"an entry of type {m.type!r}")
    raise UnsafeTar(f"entry {shown(m.name)}: {what} (only files, directories and "
                    "symlinks are copied)")


def extract(source: IO[bytes], dest: Path, *, top: str | None = None,
            on_first: Callable[[str], None] = lambda kind: None) -> Extracted:
    """Extract the tar stream ``source`` into the existing directory ``dest``.

    ``top``: the first component of every name is replaced by it (the copy's new name),
    and every entry must share the first entry's first component. ``on_first`` is told
    the first entry's kind before anything is written (it may raise to refuse)."""
    done = Extracted(umask=_umask())
    root = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with tarfile.open(fileobj=source, mode="r|", tarinfo=GuardedInfo,
                          errorlevel=2, bufsize=COPY) as tar:
            first: str | None = None
            for m in tar:
                comps = parts(m.name)
                kind = _kind(m)
                if first is None:
                    first, done.top_kind = comps[0], kind
                    on_first(kind)
                if top is not None:
                    if comps[0] != first:
                        raise UnsafeTar(f"entry {shown(m.name)}: outside the copied tree "
                                        f"{shown(first)}")
                    comps = (top, *comps[1:])
                _one(tar, m, kind, root, comps, done)
                done.entries += 1
        for comps, mode, mtime in sorted(done._dirs, key=lambda d: -len(d[0])):
            fd = _open_path(root, comps, m_name="/".join(comps), make=False)
            try:
                os.fchmod(fd, mode)
                os.utime(fd, (mtime, mtime))
            finally:
                os.close(fd)
    except tarfile.TarError as exc:
        raise UnsafeTar(f"the tar stream is not valid: {exc}") from exc
    finally:
        os.close(root)
    return done


def _umask() -> int:
    """The process's umask, read without changing it (os.umask would, for a moment, for
    every thread)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _open_path(root: int, comps: Iterable[str], *, m_name: str, make: bool) -> int:
    """A directory fd for ``comps`` under ``root``, one component at a time, never
    through a symlink; missing directories are made (0700 until their own entry or the
    end) when ``make``."""
    fd = os.dup(root)
    try:
        for c in comps:
            try:
                nxt = os.open(c, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not make:
                    raise
                os.mkdir(c, 0o700, dir_fd=fd)
                nxt = os.open(c, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                raise UnsafeTar(f"entry {shown(m_name)}: {shown(c)} on its path is a "
                                "symlink or not a directory: refusing to write through "
                                "it") from exc
            os.close(fd)
            fd = nxt
        return fd
    except BaseException:
        os.close(fd)
        raise


def _one(tar: tarfile.TarFile, m: tarfile.TarInfo, kind: str, root: int,
         comps: tuple[str, ...], done: Extracted) -> None:
    if not (isinstance(m.mtime, int) or math.isfinite(m.mtime)) \
            or not -MAX_MTIME <= m.mtime <= MAX_MTIME:
        # os.utime would raise OverflowError or ValueError: a crash, not a refusal.
        raise UnsafeTar(f"entry {shown(m.name)}: an impossible mtime ({m.mtime!r})")
    parent = _open_path(root, comps[:-1], m_name=m.name, make=True)
    name = comps[-1]
    mode = m.mode & 0o777 & ~done.umask  # never setuid, setgid or sticky
    try:
        if kind == "dir":
            try:
                os.mkdir(name, 0o700, dir_fd=parent)
            except FileExistsError:
                st = os.stat(name, dir_fd=parent, follow_symlinks=False)
                if not stat.S_ISDIR(st.st_mode):
                    raise UnsafeTar(f"entry {shown(m.name)}: a non-directory is in the "
                                    "way") from None
            done._dirs.append((comps, mode, m.mtime))
            return
        tmp = f".banger-cp.{secrets.token_hex(6)}"
        try:
            if kind == "symlink":
                os.symlink(m.linkname, tmp, dir_fd=parent)
                os.utime(tmp, (m.mtime, m.mtime), dir_fd=parent, follow_symlinks=False)
            else:
                done.bytes += _write(tar, m, parent, tmp, mode)
            try:
                os.rename(tmp, name, src_dir_fd=parent, dst_dir_fd=parent)
            except (IsADirectoryError, OSError) as exc:
                raise UnsafeTar(f"entry {shown(m.name)}: cannot replace what is there "
                                f"({exc.strerror})") from exc
            tmp = ""
        finally:
            if tmp:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=parent)
    finally:
        os.close(parent)


def _write(tar: tarfile.TarFile, m: tarfile.TarInfo, parent: int, tmp: str,
           mode: int) -> int:
    src = tar.extractfile(m)
    assert src is not None  # a regular file
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600, dir_fd=parent)
    n = 0
    try:
        while data := src.read(COPY):
            _write_all(fd, data)
            n += len(data)
        os.fchmod(fd, mode)
        os.utime(fd, (m.mtime, m.mtime))
    finally:
        os.close(fd)
    return n


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
