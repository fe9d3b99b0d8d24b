"""OCI layers applied, in order, into a rootfs directory.

A layer is a (gzip-, zstd- or un-compressed) tar read as a stream, once. Every entry is
hostile: its name is taken apart component by component and each parent is opened with
``O_NOFOLLOW`` under the root's own descriptor, so nothing is written outside the root or
through a symlink, whatever an earlier entry or layer put there. Refused, with the entry
named: absolute names, ``..``, NULs, a path through a symlink or a non-directory, a hard
link to something that is not a file inside the root, character and block devices, and
absurd headers (a name, link or PAX/GNU header over its cap, a member over the size cap),
sparse members, more file bytes than MAX_TOTAL over all layers, and a member the build
directory's filesystem has no room for (MIN_FREE kept free). A zstd layer is streamed
through ``zstd -dc``, never unpacked whole to a scratch file.

Whiteouts follow the OCI image spec: ``.wh.NAME`` removes NAME from the layers below, and
``.wh..wh..opq`` in a directory removes everything the layers below put there (what this
layer itself writes there stays). Modes (setuid included), mtimes, symlinks and hard
links are kept. Ownership is recorded, not applied: the directory is written as whoever
runs banger, and the ext4 build (:mod:`banger.host.ocidisk`) sets the owners on the
image, so no step needs root.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import shutil
import stat
import tarfile
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, cast

from banger.host.runner import CommandError, size_text, stream

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
MAX_NAME = 4096            # bytes of an entry's name or link target
MAX_DEPTH = 128            # components of an entry's name: no tree too deep to walk or remove
MAX_COMPONENT = 255        # bytes of one component (NAME_MAX)
MAX_META = 1 << 20         # a PAX or GNU long-name header
MAX_MEMBER = 32 << 30      # one file
# All the file bytes the layers of one image write (a later layer's rewrite counts again):
# a hostile image cannot fill the disk. 32 GiB is far above any dev image (a big CUDA
# image is ~15 GiB unpacked) and below what a developer's disk can lose without harm.
MAX_TOTAL = 32 << 30
# Free space kept on the build directory's filesystem: a member is refused when writing
# it would leave less (the root disk is built next to it later, and the host needs room).
MIN_FREE = 1 << 30
_META_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE,
               tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class LayerError(Exception):
    """A layer could not be applied; the message names the layer and the entry."""


class BlobMismatch(LayerError):
    """The blob read is not the one its digest names (damaged in the cache)."""


class _Refused(Exception):
    pass


class _CappedTarInfo(tarfile.TarInfo):
    """Refuses a PAX or GNU header bigger than MAX_META, and every sparse member (GNU 'S'
    with its extension blocks, PAX sparse 0.0/0.1/1.0), before tarfile reads it into
    memory: tarfile builds the sparse map as an unbounded list, and no image needs one."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> Any:
        if self.type in _META_TYPES and self.size > MAX_META:
            raise _Refused(f"a {self.size}-byte extended header (cap {MAX_META})")
        return super()._proc_member(tarfile_)  # type: ignore[misc]

    def _proc_sparse(self, tarfile_: tarfile.TarFile) -> Any:
        raise _Refused(f"a sparse member {self.name!r}")

    def _proc_gnusparse_00(self, next_: tarfile.TarInfo, pax: dict[str, str],
                           buf: bytes) -> None:
        raise _Refused(f"a sparse member {pax.get('path', next_.name)!r}")

    def _proc_gnusparse_01(self, next_: tarfile.TarInfo, pax: dict[str, str]) -> None:
        raise _Refused(f"a sparse member {pax.get('GNU.sparse.name', next_.name)!r}")

    def _proc_gnusparse_10(self, next_: tarfile.TarInfo, pax: dict[str, str],
                           tarfile_: tarfile.TarFile) -> None:
        raise _Refused(f"a sparse member {pax.get('GNU.sparse.name', next_.name)!r}")


def _parts(name: str) -> tuple[str, ...]:
    if "\0" in name:
        raise _Refused("a NUL in the name")
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME:
        raise _Refused(f"a name over {MAX_NAME} bytes")
    if name.startswith("/"):
        raise _Refused("an absolute name")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise _Refused("'..' in the name")
    if len(parts) > MAX_DEPTH:
        raise _Refused(f"a name {len(parts)} levels deep (cap {MAX_DEPTH})")
    if any(len(p.encode("utf-8", "surrogateescape")) > MAX_COMPONENT for p in parts):
        raise _Refused(f"a name with a component over {MAX_COMPONENT} bytes")
    return parts


class Rootfs:
    """A rootfs directory that layers are applied to, one after the other."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.owners: dict[str, tuple[int, int]] = {}  # "a/b" -> (uid, gid) when not 0:0
        self._dir_meta: dict[str, tuple[int, int]] = {}  # "a/b" -> (mode, mtime)
        self._layer: set[str] = set()  # what the current layer wrote
        self._kids: dict[str, set[str]] = {}  # "a" -> {"a/b", ...} recorded at or under
        self.written = 0  # file bytes written by every layer so far (capped: MAX_TOTAL)

    # --- public -------------------------------------------------------------------

    def apply(self, blob: Path, media_type: str = "", label: str = "",
              digest: str | None = None) -> None:
        """Apply one layer blob (compression from ``media_type``, else sniffed). With
        ``digest`` ("sha256:<hex>") the blob is hashed as it is read, in the same pass,
        and a blob that does not match is refused once read (the caller then drops the
        rootfs). A layer refused while its blob does not match (damaged in the cache,
        not hostile) raises :class:`BlobMismatch` instead."""
        label = label or blob.name
        with blob.open("rb") as f:
            hasher = _Hashing(f)
            try:
                with self._open(hasher, blob, media_type, label) as stream:
                    self.apply_stream(stream, label)
            except LayerError:
                if digest is not None:
                    _check_digest(hasher, digest, label)
                raise
            if digest is not None:
                _check_digest(hasher, digest, label)

    def apply_stream(self, stream: IO[bytes], label: str) -> None:
        self._layer = set()
        entry = "(header)"
        try:
            with tarfile.open(fileobj=stream, mode="r|", tarinfo=_CappedTarInfo,
                              errorlevel=2) as tar:
                for member in tar:
                    entry = member.name
                    self._entry(tar, member)
                    entry = "(header after " + member.name + ")"
        except _Refused as exc:
            raise LayerError(f"layer {label}: entry {entry!r} refused: {exc}") from None
        except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
            raise LayerError(f"layer {label}: entry {entry!r}: unreadable or truncated "
                             f"tar ({exc})") from exc
        except (ValueError, IndexError, UnicodeError, OverflowError) as exc:  # a damaged header
            raise LayerError(f"layer {label}: entry {entry!r}: a damaged tar header, "
                             f"refused ({exc})") from exc

    def finish(self) -> None:
        """Directory modes and mtimes, deepest first (kept writable until now)."""
        root_fd = os.open(self.root, _DIR_FLAGS)
        try:
            for rel in sorted(self._dir_meta, key=lambda r: -r.count("/")):
                mode, mtime = self._dir_meta[rel]
                with contextlib.suppress(FileNotFoundError, _Refused, NotADirectoryError):
                    fd = self._walk(root_fd, _parts(rel), create=False)
                    try:
                        os.fchmod(fd, mode)
                        os.utime(fd, (mtime, mtime))
                    finally:
                        os.close(fd)
        finally:
            os.close(root_fd)

    # --- one entry ----------------------------------------------------------------

    def _entry(self, tar: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        parts = _parts(m.name)
        if not parts:
            if m.isdir():
                self._dir_meta[""] = (m.mode & 0o7777, int(m.mtime))
                return
            raise _Refused("an empty name")
        if m.size > MAX_MEMBER:
            raise _Refused(f"a {m.size}-byte member (cap {MAX_MEMBER})")
        if m.ischr() or m.isblk():
            raise _Refused("a device node")
        base = parts[-1]
        root_fd = os.open(self.root, _DIR_FLAGS)
        try:
            parent = self._walk(root_fd, parts[:-1], create=True)
            try:
                prefix = "/".join(parts[:-1])
                if base == OPAQUE:
                    self._opaque(parent, prefix)
                elif base.startswith(WHITEOUT):
                    gone = base[len(WHITEOUT):]
                    if gone in ("", ".", ".."):
                        raise _Refused("a whiteout of nothing")
                    self._removed(f"{prefix}/{gone}" if prefix else gone,
                                  _remove(parent, gone))
                else:
                    self._write(tar, m, root_fd, parent, "/".join(parts), base)
            finally:
                os.close(parent)
        finally:
            os.close(root_fd)

    def _write(self, tar: tarfile.TarFile, m: tarfile.TarInfo, root_fd: int, parent: int,
               rel: str, base: str) -> None:
        parts = rel.split("/")
        self._layer.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
        mode = m.mode & 0o7777
        if m.isdir():
            self._own(rel, m)
            try:
                st = os.lstat(base, dir_fd=parent)
                if not stat.S_ISDIR(st.st_mode):
                    _remove(parent, base)  # not a directory: nothing under it
                    os.mkdir(base, 0o700, dir_fd=parent)
            except FileNotFoundError:
                os.mkdir(base, 0o700, dir_fd=parent)
            os.chmod(base, 0o700 | mode, dir_fd=parent, follow_symlinks=False)
            self._dir_meta[rel] = (mode, int(m.mtime))
            self._index(rel)
            return
        self._removed(rel, _remove(parent, base))
        if m.issym():
            if len(m.linkname.encode("utf-8", "surrogateescape")) > MAX_NAME or \
                    "\0" in m.linkname:
                raise _Refused("an absurd symlink target")
            os.symlink(m.linkname, base, dir_fd=parent)
        elif m.islnk():  # a hard link shares its target's owner
            target = _parts(m.linkname)
            if not target:
                raise _Refused("a hard link to the root")
            tparent = self._walk(root_fd, target[:-1], create=False, what="hard link")
            try:
                st = os.lstat(target[-1], dir_fd=tparent)
                if not stat.S_ISREG(st.st_mode):
                    raise _Refused(f"a hard link to {m.linkname!r}, not a regular file")
                os.link(target[-1], base, src_dir_fd=tparent, dst_dir_fd=parent,
                        follow_symlinks=False)
            except FileNotFoundError:
                raise _Refused(f"a hard link to {m.linkname!r}, which is not there") from None
            finally:
                os.close(tparent)
            owner = self.owners.get("/".join(target))
            if owner is not None:
                self.owners[rel] = owner
                self._index(rel)
        elif m.isfifo():
            os.mkfifo(base, mode, dir_fd=parent)
        elif m.isreg():
            self._room(parent, m.size)
            fd = os.open(base, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600, dir_fd=parent)
            with os.fdopen(fd, "wb") as out:
                src = tar.extractfile(m)
                if src is not None:
                    shutil.copyfileobj(src, out, 1 << 20)
                out.flush()
                os.fchmod(out.fileno(), mode)
                os.utime(out.fileno(), (m.mtime, m.mtime))
        else:
            raise _Refused(f"an entry of unsupported type {m.type!r}")
        if not m.islnk():
            self._own(rel, m)

    def _own(self, rel: str, m: tarfile.TarInfo) -> None:
        if (m.uid, m.gid) != (0, 0):
            self.owners[rel] = (m.uid, m.gid)
            self._index(rel)
        else:
            self.owners.pop(rel, None)

    def _index(self, rel: str) -> None:
        """Note ``rel`` under each of its parents in ``_kids``."""
        while rel:
            parent = rel.rpartition("/")[0]
            kids = self._kids.setdefault(parent, set())
            if rel in kids:
                return
            kids.add(rel)
            rel = parent

    def _removed(self, rel: str, tree: bool) -> None:
        """Forget what was recorded for ``rel`` (and, when a directory went, for all under
        it, found through ``_kids`` at the cost of what went): an owner left for a path
        that is gone fails the disk build, or lands on what a later layer puts there."""
        todo = [rel]
        while todo:
            key = todo.pop()
            self.owners.pop(key, None)
            self._dir_meta.pop(key, None)
            if tree:
                todo.extend(self._kids.pop(key, ()))

    def _room(self, parent: int, size: int) -> None:
        """Count ``size`` more bytes against MAX_TOTAL and check the disk has them."""
        if self.written + size > MAX_TOTAL:
            raise _Refused(f"the layers write more than {size_text(MAX_TOTAL)} of files "
                           f"(the cap of one image)")
        self.written += size
        st = os.fstatvfs(parent)
        free = st.f_bavail * st.f_frsize
        if size + MIN_FREE > free:
            raise _Refused(f"it needs {_mib(size + MIN_FREE)} MiB free (its "
                           f"{_mib(size)} MiB and {_mib(MIN_FREE)} MiB kept free) on the "
                           f"build directory's filesystem, which has {_mib(free)} MiB: "
                           "free some space and pull again")

    def _opaque(self, parent: int, prefix: str) -> None:
        """Remove what the layers below put in this directory."""
        for name in os.listdir(parent):
            rel = f"{prefix}/{name}" if prefix else name
            if rel not in self._layer:
                self._removed(rel, _remove(parent, name))

    def _walk(self, root_fd: int, parts: tuple[str, ...], *, create: bool,
              what: str = "path") -> int:
        """A descriptor of the directory ``parts`` under the root, never through a
        symlink; missing directories are made (0755, root-owned) when ``create``."""
        fd = os.dup(root_fd)
        done: list[str] = []
        try:
            for p in parts:
                done.append(p)
                try:
                    nxt = os.open(p, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise _Refused(f"the {what} goes through {'/'.join(done)!r}, "
                                       "which is not there") from None
                    os.mkdir(p, 0o755, dir_fd=fd)
                    nxt = os.open(p, _DIR_FLAGS, dir_fd=fd)
                except (NotADirectoryError, OSError) as exc:
                    kind = "a symlink" if _is_link(fd, p) else "not a directory"
                    raise _Refused(f"the {what} goes through {'/'.join(done)!r}, which is "
                                   f"{kind}") from exc
                os.close(fd)
                fd = nxt
            return fd
        except BaseException:
            os.close(fd)
            raise

    # --- decompression ------------------------------------------------------------

    @contextlib.contextmanager
    def _open(self, raw: _Hashing, blob: Path, media_type: str, label: str
              ) -> Iterator[IO[bytes]]:
        magic = raw.peek4()
        zstd = media_type.endswith("+zstd") or magic == b"\x28\xb5\x2f\xfd"
        gz = media_type.endswith("+gzip") or magic[:2] == b"\x1f\x8b"
        if zstd:
            # The zstd CLI (no Python binding in banger's dependencies) as a stream: the
            # blob already open is read once, hashed as it goes, into zstd's stdin by a
            # thread; its output is the tar, never written whole anywhere.
            r, w = os.pipe()
            feeder = threading.Thread(target=_feed, args=(raw, w), daemon=True,
                                      name=f"zstd-feed-{label}")
            try:
                with stream(["zstd", "-d", "-c", "-q"], stdin=r, timeout=1800) as tar:
                    os.close(r)
                    r = -1
                    feeder.start()
                    yield tar
            except CommandError as exc:
                raise LayerError(f"layer {label}: zstd could not decompress it: "
                                 f"{exc}") from exc
            finally:
                if r >= 0:
                    os.close(r)
                if feeder.ident is not None:
                    feeder.join()
                else:
                    os.close(w)
        elif gz:
            with gzip.GzipFile(fileobj=cast(IO[bytes], raw), mode="rb") as g:
                yield cast(IO[bytes], g)
        else:
            yield cast(IO[bytes], raw)


class _Hashing:
    """A file read once, front to back, hashed as it goes."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.h = hashlib.sha256()

    def peek4(self) -> bytes:
        head = self.f.read(4)
        self.f.seek(0)
        return head

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.h.update(data)
        return data


def _check_digest(hasher: _Hashing, digest: str, label: str) -> None:
    while hasher.read(1 << 20):
        pass  # what the tar reader left: padding, the gzip trailer; or all after an error
    got = "sha256:" + hasher.h.hexdigest()
    if got != digest:
        raise BlobMismatch(f"layer {label}: the blob does not match its digest {digest} "
                           f"({got}): refused")


def _mib(n: int) -> int:
    return (n + (1 << 20) - 1) >> 20


def _feed(src: _Hashing, w: int) -> None:
    """Copy ``src`` into the pipe ``w`` and close it (a reader that stopped early ends
    it with EPIPE)."""
    with contextlib.suppress(OSError), os.fdopen(w, "wb") as out:
        while chunk := src.read(1 << 20):
            out.write(chunk)


def _is_link(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode)
    except OSError:
        return False


def _remove(parent: int, name: str) -> bool:
    """Remove ``name`` (a tree too) from the directory ``parent``; absent is fine. True
    when a directory went."""
    try:
        st = os.lstat(name, dir_fd=parent)
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(st.st_mode):
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
        try:
            _open_up(fd)
        finally:
            os.close(fd)
        shutil.rmtree(name, dir_fd=parent)
        return True
    os.unlink(name, dir_fd=parent)
    return False


def _open_up(fd: int) -> None:
    """Make a tree removable by its owner (a layer may have left it read-only)."""
    os.fchmod(fd, 0o700)
    for name in os.listdir(fd):
        with contextlib.suppress(OSError):
            if stat.S_ISDIR(os.lstat(name, dir_fd=fd).st_mode):
                sub = os.open(name, _DIR_FLAGS, dir_fd=fd)
                try:
                    _open_up(sub)
                finally:
                    os.close(sub)
