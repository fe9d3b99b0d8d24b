"""Files as tar streams over the guest agent: FILE_PUT and FILE_GET (docs/agent-protocol.md).

:func:`put_tar` sends a tar stream into a guest directory within the guest's credit;
:func:`get_tar` yields the guest's tar of a path in chunks, granting credit as the caller
reads, so the host holds at most one window of it (never a whole tar). The tar bytes are
passed through as they are: the agent extracts (hostile-input safe in the guest) and
writes them; the host's own reader of a tar from the guest (``vm cp``) must treat it as
hostile.

The connection (:mod:`banger.host.agent_client`) owns the lock, the socket and the chan
table; :func:`on_transfer_frame` is what its reader does with a transfer's frames.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO

from banger.host.agent_proto import (
    FEATURE_FILES,
    MAX_BODY,
    CreditTag,
    FileGetTag,
    FilePutTag,
    Frame,
    Kind,
    ProtocolError,
    fields,
    kind_name,
)
from banger.host.agent_records import (
    AgentError,
    AgentRequestError,
    AgentTimeout,
    fresh,
    parse_credit,
    parse_message,
    safe_text,
)

if TYPE_CHECKING:
    from banger.host.agent_client import AgentConnection

TarSource = Iterable[bytes] | BinaryIO
_READ = 4 * MAX_BODY


@dataclass
class TransferState:
    """One FILE_PUT or FILE_GET; guarded by the connection's lock."""

    what: str
    get: bool
    credit: int = 0  # put: DATA bytes banger may still send
    window: int = 0  # get: the window granted
    allowed: int = 0  # get: DATA bytes the guest may still send
    ungranted: int = 0  # get: read by the caller, not granted back yet
    chunks: deque[bytes] = field(default_factory=deque)
    done: bool = False  # DONE (put) or DATA_EOF (get)
    error: AgentError | None = None
    cancelled: bool = False  # banger gave up: frames are dropped until the chan ends

    @property
    def ended(self) -> bool:
        return self.done or self.error is not None


def _start(conn: AgentConnection, st: TransferState, kind: Kind, body: bytes) -> int:
    with conn.cond:
        chan = conn.alloc_chan()
        conn.transfers[chan] = st
    conn.send_data(chan, kind, body, st.what)
    return chan


def _cancel(conn: AgentConnection, chan: int, st: TransferState) -> None:
    """Stop a transfer part way: DATA_EOF tells the agent (a put's tar is then truncated,
    and refused; a get stops), and what it still sends on the chan is dropped."""
    with conn.cond:
        if st.ended or chan not in conn.transfers:
            return
        st.cancelled = True
        st.chunks.clear()
    with contextlib.suppress(AgentError):
        conn.send_data(chan, Kind.DATA_EOF, b"", st.what)


def _chunks(source: TarSource) -> Iterator[bytes]:
    if hasattr(source, "read"):
        read = source.read
        while data := read(_READ):
            yield data
        return
    for data in source:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"a tar source yielded {type(data).__name__}, not bytes")
        yield bytes(data)


def _check_path(path: str, what: str) -> None:
    if not path or "\0" in path or len(path.encode()) > 4096:
        raise ValueError(f"{what} {path!r} is empty, holds NUL or is over 4096 bytes")


def put_tar(conn: AgentConnection, dest: str, source: TarSource, timeout: float) -> None:
    """See :meth:`AgentConnection.put_tar`."""
    _check_path(dest, "the destination")
    conn._need(FEATURE_FILES, "copy files into the guest")
    st = TransferState(f"FILE_PUT to {safe_text(dest, 80)}", get=False)
    chan = _start(conn, st, Kind.FILE_PUT, fields([(FilePutTag.DEST, dest)]))
    cond, finished = conn.cond, False
    try:
        for chunk in _chunks(source):
            view, pos = memoryview(chunk), 0
            while pos < len(chunk):
                with cond:
                    if not cond.wait_for(lambda: st.credit > 0 or st.ended or conn.failure,
                                         timeout):
                        raise AgentTimeout(f"the guest agent took no data of {st.what} for "
                                           f"{timeout:.3g} s")
                    _raise(conn, st)
                    size = min(st.credit, MAX_BODY, len(chunk) - pos)
                    st.credit -= size
                conn.send_data(chan, Kind.DATA, bytes(view[pos:pos + size]), st.what)
                pos += size
        conn.send_data(chan, Kind.DATA_EOF, b"", st.what)
        with cond:
            if not cond.wait_for(lambda: st.ended or conn.failure, timeout):
                raise AgentTimeout(f"no answer (DONE) from the guest agent to {st.what} "
                                   f"within {timeout:.3g} s")
            finished = st.done
            _raise(conn, st)
    finally:
        if not finished:
            _cancel(conn, chan, st)


def _raise(conn: AgentConnection, st: TransferState) -> None:
    """With conn.cond held: the error that ended the transfer or the connection."""
    if st.error is not None:
        raise fresh(st.error)
    if conn.failure is not None:
        raise fresh(conn.failure)


def get_tar(conn: AgentConnection, path: str, timeout: float) -> Iterator[bytes]:
    """See :meth:`AgentConnection.get_tar`."""
    _check_path(path, "the path")
    conn._need(FEATURE_FILES, "copy files out of the guest")
    st = TransferState(f"FILE_GET of {safe_text(path, 80)}", get=True, window=conn.window,
                       allowed=conn.window)
    chan = _start(conn, st, Kind.FILE_GET,
                  fields([(FileGetTag.PATH, path), (FileGetTag.WINDOW, conn.window)]))
    return _stream(conn, chan, st, timeout)


def _stream(conn: AgentConnection, chan: int, st: TransferState,
            timeout: float) -> Iterator[bytes]:
    cond, finished = conn.cond, False
    try:
        while True:
            grant = 0
            with cond:
                if not cond.wait_for(lambda: st.chunks or st.ended or conn.failure, timeout):
                    raise AgentTimeout(f"the guest agent sent nothing of {st.what} for "
                                       f"{timeout:.3g} s")
                if not st.chunks:
                    if st.done:
                        finished = True
                        return
                    _raise(conn, st)
                data = st.chunks.popleft()
                st.ungranted += len(data)
                if st.ungranted >= st.window // 4 and not st.ended:
                    grant, st.ungranted = st.ungranted, 0
                    st.allowed += grant
            if grant:
                conn.send_data(chan, Kind.CREDIT, fields([(CreditTag.BYTES, grant)]),
                               st.what)
            yield data
    finally:
        if not finished:
            _cancel(conn, chan, st)


def on_transfer_frame(conn: AgentConnection, f: Frame, st: TransferState) -> bool:
    """Apply a frame the agent sent on a transfer's chan; True when it ended the chan."""
    kind = f.kind
    ended = True
    if kind == Kind.ERROR:
        err = AgentRequestError(f"the guest agent refused {st.what}: {parse_message(f.body)}")
    elif not st.get and kind == Kind.CREDIT:
        credit, ended = parse_credit(f.body), False
    elif not st.get and kind == Kind.DONE:
        pass
    elif st.get and kind == Kind.DATA:
        ended = False
    elif st.get and kind == Kind.DATA_EOF:
        pass
    else:
        raise ProtocolError(f"{kind_name(kind)} in answer to {st.what}")
    with conn.cond:
        if kind == Kind.ERROR:
            st.error = st.error or err
        elif kind == Kind.CREDIT:
            st.credit += credit
        elif kind == Kind.DATA:
            st.allowed -= len(f.body)
            if st.allowed < 0:
                raise ProtocolError(f"{st.what}: the guest sent {-st.allowed} bytes past "
                                    "the window banger granted")
            if not st.cancelled and f.body:
                st.chunks.append(f.body)
        else:
            st.done = True
        conn.cond.notify_all()
    return ended
