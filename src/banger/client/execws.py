"""The client's side of the exec WebSocket (``/v1/vms/{ref}/exec``, docs/api.md): a
command in a running guest, over the daemon's peer-checked Unix socket.

wsproto does the framing (sans-IO: this module owns the socket, so the peer check and
the timeouts are the client's own, as for every request). Only commands that run
something in a guest load it; `banger --version` and `vm list` do not.

:class:`ExecSession` is non-blocking on its socket: what it has to send waits in a buffer
(:meth:`pending`) until the socket can take it, so a caller that also reads the daemon's
output never deadlocks against a guest that neither reads its stdin nor stops printing.
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from banger.api.wire import EXEC_STDERR, EXEC_STDIN, EXEC_STDOUT, PREFIX
from banger.client.client import ApiError, DaemonUnavailable
from banger.client.peer import check_peer
from banger.client.types import ErrorBody

RECV = 1 << 16
HANDSHAKE_TIMEOUT = 10.0
# How long the daemon may take to start the command (reconnect to the agent, STARTED).
START_TIMEOUT = 60.0


class ExecFailed(ApiError):
    """The daemon refused or ended the exec: ``body`` says why (code and message)."""

    def __init__(self, body: ErrorBody) -> None:
        super().__init__(body, 409 if body.code == "conflict" else 500)


class ExecLost(DaemonUnavailable):
    """The connection to the daemon broke during an exec."""


@dataclass(frozen=True)
class Output:
    stream: str  # "stdout" | "stderr"
    data: bytes


@dataclass(frozen=True)
class Exit:
    code: int | None
    signal: int | None
    returncode: int


Event = Output | Exit


class ExecSession:
    """One exec: open it with :func:`open_exec`, then pump :meth:`receive` and the
    ``send_*`` methods (and :meth:`flush` when :meth:`pending`) from a select loop."""

    def __init__(self, sock: socket.socket, ws: WSConnection) -> None:
        self.sock = sock
        self._ws = ws
        self._out = bytearray()
        self._parts: list[bytes | str] = []
        self.closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    # ---- sending ----------------------------------------------------------------------

    def send_stdin(self, data: bytes) -> None:
        self._queue(BytesMessage(data=bytes((EXEC_STDIN,)) + data))

    def send_eof(self) -> None:
        self._control({"type": "eof"})

    def resize(self, rows: int, cols: int) -> None:
        self._control({"type": "resize", "rows": rows, "cols": cols})

    def signal(self, signo: int) -> None:
        self._control({"type": "signal", "signal": signo})

    def _control(self, msg: Mapping[str, Any]) -> None:
        self._queue(TextMessage(data=json.dumps(msg)))

    def _queue(self, event: Any) -> None:
        if self.closed:
            return
        try:
            self._out += self._ws.send(event)
        except LocalProtocolError:
            return  # closing: the exec's end is on its way
        self.flush()

    def pending(self) -> int:
        """Bytes waiting for the socket."""
        return len(self._out)

    def flush(self) -> None:
        """Send what the socket takes now without blocking."""
        while self._out:
            try:
                n = self.sock.send(self._out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                raise ExecLost(f"lost bangerd during the exec: {exc}") from exc
            del self._out[:n]

    # ---- receiving --------------------------------------------------------------------

    def buffered(self) -> Iterator[Event]:
        """What arrived with the "started" message (a short command's whole output and
        exit may): call it once before waiting on the socket."""
        yield from self._events()

    def receive(self) -> Iterator[Event]:
        """Read what the socket has (it was readable) and yield what it completes.
        Raises :class:`ExecFailed` for the daemon's error, :class:`ExecLost` when the
        connection ends without an exit."""
        try:
            data = self.sock.recv(RECV)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            raise ExecLost(f"lost bangerd during the exec: {exc}") from exc
        if not data:
            self.closed = True
            raise ExecLost("bangerd closed the exec's connection before the command ended")
        self._ws.receive_data(data)
        yield from self._events()

    def _events(self) -> Iterator[Event]:
        try:
            for event in self._ws.events():
                if isinstance(event, Ping):
                    self._out += self._ws.send(event.response())
                    self.flush()
                elif isinstance(event, CloseConnection):
                    self.closed = True
                    raise ExecLost("bangerd closed the exec without saying how the "
                                   f"command ended (code {event.code})")
                elif isinstance(event, (BytesMessage, TextMessage)):
                    self._parts.append(bytes(event.data) if isinstance(event.data, bytearray)
                                       else event.data)
                    if event.message_finished:
                        parts, self._parts = self._parts, []
                        yield from self._message(parts)
                        if self.closed:  # that was the exit: the rest is the close
                            return
        except RemoteProtocolError as exc:
            raise ExecLost(f"bangerd broke the WebSocket protocol: {exc}") from exc

    def _message(self, parts: list[bytes | str]) -> Iterator[Event]:
        if isinstance(parts[0], bytes):
            data = b"".join(p for p in parts if isinstance(p, bytes))
            if data[:1] == bytes((EXEC_STDOUT,)):
                yield Output("stdout", data[1:])
            elif data[:1] == bytes((EXEC_STDERR,)):
                yield Output("stderr", data[1:])
            return
        msg = json.loads("".join(p for p in parts if isinstance(p, str)))
        kind = msg.get("type")
        if kind == "exit":
            self._close()
            yield Exit(code=msg.get("code"), signal=msg.get("signal"),
                       returncode=int(msg["returncode"]))
        elif kind == "error":
            self._close()
            raise ExecFailed(ErrorBody(code=str(msg.get("code", "error")),
                                       message=str(msg.get("message", ""))))
        # "started", or a kind this client does not know: nothing to do

    def _close(self) -> None:
        self.closed = True
        self.close()

    def close(self) -> None:
        """Hang up: a command still running is ended by the daemon (SIGHUP, SIGKILL)."""
        with contextlib.suppress(OSError):
            self.sock.close()


def open_exec(socket_path: str, ref_segment: str, argv: Sequence[str], *,
              env: Mapping[str, str] | None, cwd: str | None,
              tty: tuple[int, int] | None) -> ExecSession:
    """Connect (peer-checked), upgrade, send the start message and wait until the
    command runs; raises :class:`ExecFailed` when the daemon refuses it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(HANDSHAKE_TIMEOUT)
        try:
            sock.connect(socket_path)
        except OSError as exc:
            raise DaemonUnavailable(f"bangerd is not answering on {socket_path}: "
                                    f"{exc.strerror or exc}") from exc
        check_peer(sock, socket_path)
        ws = WSConnection(ConnectionType.CLIENT)
        sock.sendall(ws.send(Request(host="bangerd", target=f"{PREFIX}/vms/{ref_segment}/exec")))
        _handshake(sock, ws)
        start = {"argv": list(argv), "env": dict(env) if env else None, "cwd": cwd,
                 "tty": None if tty is None else {"rows": tty[0], "cols": tty[1]}}
        sock.sendall(ws.send(TextMessage(data=json.dumps(start))))
        session = ExecSession(sock, ws)
        sock.settimeout(START_TIMEOUT)
        _wait_started(session)
    except (TimeoutError, ConnectionError) as exc:
        sock.close()
        raise ExecLost(f"bangerd did not take the exec on {socket_path}: {exc!r}") from exc
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return session


def _handshake(sock: socket.socket, ws: WSConnection) -> None:
    reject: list[bytes] = []
    status = 0
    while True:
        data = sock.recv(RECV)
        if not data:
            raise ExecLost("bangerd closed the connection during the WebSocket handshake")
        ws.receive_data(data)
        for event in ws.events():
            if isinstance(event, AcceptConnection):
                return
            if isinstance(event, RejectConnection):
                status = event.status_code
                if not event.has_body:
                    _rejected(status, b"")
            elif isinstance(event, RejectData):
                reject.append(event.data)
                if event.body_finished:
                    _rejected(status, b"".join(reject))


def _rejected(status: int, body: bytes) -> None:
    try:
        err = json.loads(body)["error"]
        raise ExecFailed(ErrorBody(code=str(err["code"]), message=str(err["message"])))
    except (ValueError, KeyError, TypeError):
        pass
    raise ExecFailed(ErrorBody(code="http_error", message=f"bangerd refused the exec "
                               f"WebSocket (HTTP {status}); is it an older bangerd? "
                               "`banger system restart` runs the current one"))


def _wait_started(session: ExecSession) -> None:
    """Blocking, before the socket turns non-blocking: until "started" (or the error)."""
    ws = session._ws
    while True:
        try:
            data = session.sock.recv(RECV)
        except TimeoutError as exc:
            raise ExecLost(f"the command did not start within {START_TIMEOUT:.0f} s") from exc
        if not data:
            raise ExecLost("bangerd closed the connection before the command started")
        ws.receive_data(data)
        for event in ws.events():
            if isinstance(event, TextMessage):
                msg = json.loads(event.data)
                if msg.get("type") == "started":
                    return
                if msg.get("type") == "error":
                    raise ExecFailed(ErrorBody(code=str(msg.get("code", "error")),
                                               message=str(msg.get("message", ""))))
            elif isinstance(event, CloseConnection):
                raise ExecLost("bangerd closed the exec before the command started")
