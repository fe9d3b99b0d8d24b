"""`banger vm cp [-r] SRC DST`: files into and out of a running VM, scp's `box:/path`
notation (:mod:`banger.cli.cppath`), tar streams through the daemon and the guest
agent (`PUT`/`GET /v1/vms/{ref}/files`).

cp's semantics: a directory needs `-r`; a copy into an existing directory goes inside it
under its own name, a copy to a new name takes that name (its parent must exist); a
trailing `/` on DST means a directory (made if missing). Modes (exec bits), mtimes and
symlinks (as links) are kept. `-` as SRC sends a tar from stdin to extract into box:DST;
`-` as DST writes the tar of box:SRC to stdout (never to a terminal). What the guest sends
is extracted on the host by :func:`banger.cli.tarsafe.extract` (nothing outside DST, and
the copy is named by SRC or DST, never by the guest: every entry must be below that one
name). Never a shell.
"""

from __future__ import annotations

import os
import posixpath
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, cast

import click

from banger.cli.common import handle_errors

if TYPE_CHECKING:
    from banger.cli.cppath import Operand
    from banger.client.client import Client

PIPE_READ = 1 << 20


class CpError(Exception):
    """What the user is told, on one line, before exit status 1."""


@click.command("cp")
@click.argument("src")
@click.argument("dst")
@click.option("-r", "--recursive", is_flag=True, help="copy directories recursively")
@click.option("--json", "as_json", is_flag=True, help="print a summary as JSON")
@handle_errors
def vm_cp(src: str, dst: str, recursive: bool, as_json: bool) -> None:
    """Copy files between the host and a running VM: SRC and DST are local paths or
    box:PATH (the VM's name or id; a relative PATH is under /root); `-` is a tar stream
    on stdin (SRC) or stdout (DST). Modes, mtimes and symlinks are kept; directories
    need -r. A local path with a colon can be written ./a:b."""
    from banger.cli.cppath import pair
    from banger.client.client import connect
    from banger.client.files import TransferBroken

    try:
        s, d = pair(src, dst)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    client = connect()
    progress = _Progress()
    started = time.monotonic()
    try:
        if d.vm is not None:
            n = _upload(client, s, d, recursive, progress)
        else:
            n = _download(client, s, d, recursive, progress)
    except (CpError, TransferBroken) as exc:
        progress.end()
        _fail(str(exc))
    except OSError as exc:
        progress.end()
        _fail(f"{exc.filename or ''}{': ' if exc.filename else ''}{exc.strerror or exc}")
    progress.end()
    if as_json:
        import json
        took = time.monotonic() - started
        print(json.dumps({"source": src, "destination": dst, "bytes": n,
                          "seconds": round(took, 3),
                          "direction": "in" if d.vm is not None else "out"}))


def _fail(message: str) -> None:
    from banger.cli.safe import printable
    sys.stderr.write(f"banger: error: {printable(message)}\n")
    sys.exit(1)


# --- into the guest -----------------------------------------------------------------------


def _upload(client: Client, s: Operand, d: Operand, recursive: bool,
            progress: _Progress) -> int:
    assert d.vm is not None
    if s.stream:
        body = progress.counting(_read_chunks(sys.stdin.buffer))
        return client.put_files(d.vm, d.path, body).bytes
    local = Path(s.path)
    if not local.exists():  # a symlink named on the command line is followed
        raise CpError(f"{s.path}: no such file or directory")
    is_dir = local.is_dir()
    if is_dir and not recursive:
        raise CpError(f"{s.path} is a directory: copy it with -r")
    # The operand's own name, as cp and scp do (a symlink's, not its target's); `.`,
    # `..` and the like are named by the directory they are.
    name = local.name if local.name not in ("", ".", "..") else local.resolve().name
    if not name:
        raise CpError(f"{s.path}: copy the directories below / one by one")
    kind = "dir" if d.dir_hint else _guest_kind(client, d.vm, d.path)
    if kind == "dir":
        into, arcname = d.path, name
    else:
        if kind is not None and is_dir:
            raise CpError(f"{d.vm}:{d.path} exists and is not a directory: cannot "
                          f"overwrite it with the directory {s.path}")
        into, arcname = os.path.dirname(d.path) or "/", os.path.basename(d.path)
    body = progress.counting(_tar_of(local, arcname))
    client.put_files(d.vm, into, body)
    return progress.bytes


def _guest_kind(client: Client, vm: str, path: str) -> str | None:
    """"dir", "file", "symlink" (what the guest's tar of ``path`` starts with), or None
    when there is nothing there: the first chunk of a download, which is then
    cancelled."""
    import itertools
    import tarfile

    from banger.client.client import ApiError

    try:
        chunks = client.get_files(vm, path)
        first = next(chunks, b"")
    except ApiError as exc:
        if exc.body.code == "invalid" and ("No such file" in exc.body.message
                                          or "Not a directory" in exc.body.message):
            return None
        raise
    from banger.cli import tarsafe

    try:
        stream = _ChunkReader(itertools.chain([first], chunks)).io()
        # The guest's header caps, as for an extraction: a pax header claiming GiBs
        # would otherwise be read into memory whole.
        with tarfile.open(fileobj=stream, mode="r|", tarinfo=tarsafe.GuardedInfo) as tar:
            member = tar.next()
    except tarsafe.UnsafeTar as exc:
        raise CpError(f"refused what the guest sent for {vm}:{path}: {exc}") from exc
    except tarfile.TarError:
        return None
    finally:
        getattr(chunks, "close", lambda: None)()
    if member is None:
        return None
    return "dir" if member.isdir() else "symlink" if member.issym() else "file"


def _read_chunks(f: IO[bytes]) -> Iterator[bytes]:
    while data := f.read(PIPE_READ):
        yield data


def _tar_of(local: Path, arcname: str) -> Iterator[bytes]:
    """The tar of ``local`` (followed if it is a symlink, nothing below it is), made on a
    thread as it is read; sockets, fifos and devices below it are left out, hard links go
    in as files again (as the guest sends them). A failure (a file unreadable or gone)
    raises instead of ending the tar: the upload then goes without its last chunk and
    the daemon cancels the guest's side."""
    from banger.local.tarwrite import tar_stream, walk

    items = walk(local.resolve(), arcname, skip_special=True)
    try:
        yield from tar_stream(items, root_owned=False, hard_links=False)
    except OSError:
        raise
    except Exception as exc:
        raise CpError(f"reading {local} failed: {exc}") from exc


# --- out of the guest ---------------------------------------------------------------------


def _download(client: Client, s: Operand, d: Operand, recursive: bool,
              progress: _Progress) -> int:
    assert s.vm is not None
    if d.stream and sys.stdout.isatty():
        # The guest's bytes, raw, would reach the terminal (escape sequences and all).
        raise CpError("refusing to write a tar to a terminal: redirect stdout "
                      "(`> out.tar`) or pipe it (`| tar -x`)")
    chunks = client.get_files(s.vm, s.path)
    try:
        if d.stream:
            out = sys.stdout.buffer
            for chunk in progress.counting(chunks):
                out.write(chunk)
            out.flush()
            return progress.bytes
        return _extract(chunks, s, d, recursive, progress)
    finally:
        getattr(chunks, "close", lambda: None)()


def _extract(chunks: Iterator[bytes], s: Operand, d: Operand, recursive: bool,
             progress: _Progress) -> int:
    from banger.cli import tarsafe

    local = Path(d.path)
    # The copy's name is decided here, never by the guest: inside an existing directory
    # it is the guest path's last component, and every entry must be below it (a guest
    # answering `cp box:/root/log ~/` with ~/.bashrc is refused).
    name = posixpath.basename(s.path.rstrip("/"))
    if not name:
        raise CpError(f"{s.vm}:{s.path}: copy the directories below / one by one")
    if d.dir_hint:
        local.mkdir(parents=True, exist_ok=True)
    renamed = not local.is_dir()
    if renamed:
        into, top = local.parent, local.name
        if not into.is_dir():
            raise CpError(f"{d.path}: its directory {into} does not exist")
    else:
        into, top = local, name

    def first(kind: str) -> None:
        if kind == "dir" and not recursive:
            raise CpError(f"{s.vm}:{s.path} is a directory: copy it with -r")
        if kind == "dir" and renamed and local.exists():
            raise CpError(f"{d.path} exists and is not a directory: cannot overwrite it "
                          f"with the directory {s.vm}:{s.path}")

    try:
        tarsafe.extract(_ChunkReader(progress.counting(chunks)).io(), into, top=top,
                        on_first=first)
    except tarsafe.UnsafeTar as exc:
        raise CpError(f"refused what the guest sent for {s.vm}:{s.path}: {exc}") from exc
    return progress.bytes


class _ChunkReader:
    """A read-only file object over an iterator of chunks (for tarfile's stream mode)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.chunks, self.buf, self.pos = chunks, bytearray(), 0

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self.buf) - self.pos < n:
            nxt = next(self.chunks, None)
            if nxt is None:
                break
            if self.pos:
                del self.buf[:self.pos]
                self.pos = 0
            self.buf += nxt
        end = len(self.buf) if n < 0 else min(len(self.buf), self.pos + n)
        out = bytes(self.buf[self.pos:end])
        self.pos = end
        return out

    def io(self) -> IO[bytes]:
        return cast("IO[bytes]", self)


# --- progress -----------------------------------------------------------------------------


class _Progress:
    """Bytes and rate on stderr, redrawn in place, when stderr is a terminal and the copy
    is large (past 4 MiB or 1 s)."""

    SHOW_AFTER_BYTES = 4 << 20
    SHOW_AFTER_SECONDS = 1.0
    EVERY = 0.25

    def __init__(self) -> None:
        self.bytes = 0
        self.start = time.monotonic()
        self.tty = sys.stderr.isatty()
        self.drawn = 0.0
        self.shown = False

    def counting(self, chunks: Iterator[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            self.bytes += len(chunk)
            if self.tty:
                self._draw()
            yield chunk

    def _draw(self, final: bool = False) -> None:
        now = time.monotonic()
        took = now - self.start
        if not final and (now - self.drawn < self.EVERY or (
                self.bytes < self.SHOW_AFTER_BYTES and took < self.SHOW_AFTER_SECONDS)):
            return
        self.drawn, self.shown = now, True
        rate = self.bytes / took / (1 << 20) if took > 0 else 0.0
        sys.stderr.write(f"\r{self.bytes / (1 << 20):8.1f} MiB  {rate:6.1f} MiB/s  "
                         f"{took:5.1f} s")
        sys.stderr.flush()

    def end(self) -> None:
        if self.shown:
            self._draw(final=True)
            sys.stderr.write("\n")
            self.shown = False
