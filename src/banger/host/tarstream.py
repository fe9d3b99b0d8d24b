"""Host files as a tar stream, made as it is read (for the agent's FILE_PUT).

:func:`tar_stream` yields the tar of a list of :class:`TarItem` in chunks while a thread
writes it: memory stays bounded (a few chunks queued) whatever the files' sizes, and no
copy lands on the host's disk. Every entry is owned by root (uid/gid 0: what a guest's
/root holds) and keeps its mode unless the item names one; symlinks stay symlinks.
Leaving the iterator early (the guest refused the put) stops the writer.
"""

from __future__ import annotations

import os
import queue
import tarfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

CHUNK = 256 << 10
_QUEUED = 8  # chunks between the writer and the reader: 2 MiB at most


@dataclass(frozen=True)
class TarItem:
    """``path`` on the host, stored as ``name`` (relative), with ``mode`` if given."""

    path: Path
    name: str
    mode: int | None = None


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
            self._put(bytes(self._buf[:CHUNK]))
            del self._buf[:CHUNK]
        return len(data)

    def flush_rest(self) -> None:
        if self._buf:
            self._put(bytes(self._buf))
            self._buf.clear()

    def _put(self, item: bytes | BaseException | None) -> None:
        while True:
            if self._stop.is_set():
                raise _Stopped
            try:
                self._q.put(item, timeout=0.2)
                return
            except queue.Full:
                continue


def tree_items(root: Path) -> list[TarItem]:
    """Everything under ``root`` (not ``root`` itself), parents before children, named
    relative to ``root``; symlinks are not followed."""
    items: list[TarItem] = []
    for top, dirs, files in os.walk(root):
        dirs.sort()
        base = Path(top)
        for name in [*dirs, *sorted(files)]:
            path = base / name
            items.append(TarItem(path, path.relative_to(root).as_posix()))
    return items


def _add(tar: tarfile.TarFile, item: TarItem) -> None:
    info = tar.gettarinfo(str(item.path), arcname=item.name)
    if info is None:  # a socket: tar has no kind for it
        raise OSError(f"{item.path} is not a file, directory or symlink")
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    if item.mode is not None:
        info.mode = item.mode
    if info.isreg():
        with item.path.open("rb") as f:
            tar.addfile(info, f)
    elif info.isdir() or info.issym() or info.islnk():
        tar.addfile(info)
    else:
        raise OSError(f"{item.path} is a device or fifo: not copied into a guest")


def tar_stream(items: Iterable[TarItem]) -> Iterator[bytes]:
    """The tar (PAX) of ``items``, in chunks; an error reading a file is raised here."""
    q: queue.Queue[bytes | BaseException | None] = queue.Queue(maxsize=_QUEUED)
    stop = threading.Event()
    out = _QueueWriter(q, stop)

    def write() -> None:
        try:
            with tarfile.open(fileobj=out, mode="w|",  # type: ignore[call-overload]
                              format=tarfile.PAX_FORMAT) as tar:
                for item in items:
                    _add(tar, item)
            out.flush_rest()
            out._put(None)
        except _Stopped:
            return
        except BaseException as exc:  # handed to the reader, raised there
            try:
                out._put(exc)
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
