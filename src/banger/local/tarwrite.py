"""Host files as a PAX tar stream, made as it is read: the one writer behind the daemon's
workspace push and ``[[file_sync]]`` (FILE_PUT) and `vm cp`'s uploads.

:func:`tar_stream` yields the tar of :class:`TarItem` s in chunks while a thread writes
it: memory stays bounded (:data:`QUEUED` chunks at most) whatever the files' sizes, no
copy lands on the host's disk, and leaving the iterator early (the guest refused the put,
the upload broke) stops the writer. :func:`walk` lists a tree for it.

What goes in, and what never does:
- regular files with their bytes, directories, and symlinks **as links** (their target is
  text: nothing is read through a link, inside the tree or out of it); :func:`walk` never
  enters a symlink to a directory;
- a regular file is opened with ``O_NOFOLLOW`` and must still be the inode that was
  listed: one swapped for a symlink (or anything else) between the listing and the read
  is an error, not a read of whatever the link points at; one that shrinks while it is
  read is an error too (tarfile's "unexpected end of data"), one that grows goes in at
  the size it had when opened;
- sockets, fifos and devices named to the writer are refused, naming the path (reading a
  fifo could block forever, a device could be a disk); :func:`walk` may leave them out;
- hard links are kept as links, or go in again as files (``hard_links=False``: what the
  guest's agent sends back);
- modes are kept unless the item names one; owners are kept, or are root's
  (``root_owned``: what a guest's /root holds).
"""

from __future__ import annotations

import os
import queue
import stat
import tarfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

CHUNK = 256 << 10
QUEUED = 8  # chunks between the writer and the reader: 2 MiB at most
_OPEN = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


@dataclass(frozen=True)
class TarItem:
    """``path`` on the host, stored as ``name`` (relative), with ``mode`` if given."""

    path: Path
    name: str
    mode: int | None = None


def walk(root: Path, top: str | None = None, *,
         skip_special: bool = False) -> Iterator[TarItem]:
    """``root`` itself as ``top`` when a name is given, then everything below it, named
    ``top/…`` (or relative to ``root``), sorted by name, parents before children. Only
    real directories are entered (``root`` is taken as it is: resolve it first to follow
    a link). With ``skip_special``, sockets, fifos and devices below ``root`` are left
    out; otherwise they are listed, and the writer refuses them."""
    if top is not None:
        yield TarItem(root, top)
        if not root.is_dir() or root.is_symlink():
            return
    yield from _below(root, top, skip_special)


def _below(path: Path, prefix: str | None, skip_special: bool) -> Iterator[TarItem]:
    with os.scandir(path) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        name = entry.name if prefix is None else f"{prefix}/{entry.name}"
        if entry.is_dir(follow_symlinks=False):
            yield TarItem(Path(entry.path), name)
            yield from _below(Path(entry.path), name, skip_special)
        elif (not skip_special or entry.is_symlink()
              or entry.is_file(follow_symlinks=False)):
            yield TarItem(Path(entry.path), name)


def tar_stream(items: Iterable[TarItem], *, root_owned: bool,
               hard_links: bool) -> Iterator[bytes]:
    """The tar (PAX) of ``items``, in chunks of :data:`CHUNK` bytes (the last one
    shorter); an error listing or reading a file is raised here, where the reader is,
    after the chunks made before it. ``items`` is consumed on the writer's thread.

    ``root_owned``: every entry is owned by root (uid/gid 0), else by its owner on the
    host. ``hard_links``: a second name of an inode goes in as a hard link, else as the
    file again."""
    q: queue.Queue[bytes | BaseException | None] = queue.Queue(maxsize=QUEUED)
    stop = threading.Event()
    out = _QueueWriter(q, stop)

    def write() -> None:
        try:
            with tarfile.open(fileobj=out, mode="w|",  # type: ignore[call-overload]
                              format=tarfile.PAX_FORMAT) as tar:
                for item in items:
                    _add(tar, item, root_owned, hard_links)
            out.flush_rest()
            out.put(None)
        except _Stopped:
            return
        except BaseException as exc:  # handed to the reader, raised there
            try:
                out.put(exc)
            except _Stopped:
                return

    writer = threading.Thread(target=write, daemon=True, name="banger-tar-writer")
    writer.start()
    try:
        while True:
            got = q.get()
            if got is None:
                return
            if isinstance(got, BaseException):
                raise got
            yield got
    finally:
        stop.set()
        writer.join()


def _add(tar: tarfile.TarFile, item: TarItem, root_owned: bool, hard_links: bool) -> None:
    st = os.lstat(item.path)
    if stat.S_ISREG(st.st_mode):
        _add_file(tar, item, st, root_owned, hard_links)
        return
    if stat.S_ISSOCK(st.st_mode):  # tar has no kind for it
        raise OSError(f"{item.path} is not a file, directory or symlink")
    if not (stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode)):
        raise OSError(f"{item.path} is a device or fifo: not copied into a guest")
    info = tar.gettarinfo(str(item.path), arcname=item.name)
    if info is None or not (info.isdir() or info.issym()):
        raise OSError(f"{item.path} changed while it was being read")
    _finish(info, item, root_owned)
    tar.addfile(info)


def _add_file(tar: tarfile.TarFile, item: TarItem, listed: os.stat_result,
              root_owned: bool, hard_links: bool) -> None:
    """A regular file, read from the inode that was listed and never through a link."""
    try:
        fd = os.open(item.path, _OPEN)
    except OSError as exc:
        if not os.path.islink(item.path):
            raise
        raise OSError(f"{item.path} changed while it was being read") from exc
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) \
                or (st.st_dev, st.st_ino) != (listed.st_dev, listed.st_ino):
            raise OSError(f"{item.path} changed while it was being read")
        info = tar.gettarinfo(arcname=item.name, fileobj=f)
        _finish(info, item, root_owned)
        if info.islnk():  # an inode already in the tar under another name
            if hard_links:
                tar.addfile(info)
                return
            info.type, info.linkname, info.size = tarfile.REGTYPE, "", st.st_size
        tar.addfile(info, f)


def _finish(info: tarfile.TarInfo, item: TarItem, root_owned: bool) -> None:
    if root_owned:
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
    if item.mode is not None:
        info.mode = item.mode


class _Stopped(Exception):
    """The reader went away: the writer ends."""


class _QueueWriter:
    """A write-only file object that hands chunks of CHUNK bytes to a bounded queue."""

    def __init__(self, q: queue.Queue[bytes | BaseException | None],
                 stop: threading.Event) -> None:
        self._q, self._stop, self._buf = q, stop, bytearray()

    def write(self, data: bytes) -> int:
        self._buf += data
        while len(self._buf) >= CHUNK:
            self.put(bytes(self._buf[:CHUNK]))
            del self._buf[:CHUNK]
        return len(data)

    def flush_rest(self) -> None:
        if self._buf:
            self.put(bytes(self._buf))
            self._buf.clear()

    def put(self, item: bytes | BaseException | None) -> None:
        while True:
            if self._stop.is_set():
                raise _Stopped
            try:
                self._q.put(item, timeout=0.2)
                return
            except queue.Full:
                continue
