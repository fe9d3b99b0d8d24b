"""The client's side of the exec WebSocket (``/v1/vms/{ref}/exec``, docs/api.md): a
command in a running guest, over the daemon's peer-checked Unix socket.

One connection, one round trip before the command runs: the upgrade, then the start
message, whose "started" answer also carries what `vm exec` needs to know about the VM
(its workspace). The framing is :mod:`banger.client.wsframe` (stdlib; why not wsproto:
see there), and this module owns the socket, so the peer check and the timeouts are the
client's own, as for every request. Nothing here loads :mod:`http.client`: only a
daemon that is not running yet sends :func:`start_exec` through ``connect()``'s
autostart.

:class:`ExecSession` is non-blocking on its socket: what it has to send waits in a buffer
(:meth:`pending`) until the socket can take it, so a caller that also reads the daemon's
output never deadlocks against a guest that neither reads its stdin nor stops printing.
Stdin goes out within the daemon's window (acknowledged as the guest reads it), and a
control message (signal, resize) goes before any stdin still waiting: Ctrl-C reaches a
command that reads nothing.
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from banger.api.wire import EXEC_MAX_MESSAGE, EXEC_STDERR, EXEC_STDIN, EXEC_STDOUT, PREFIX
from banger.client import wsframe
from banger.client.errors import ApiError, DaemonUnavailable, seg
from banger.client.peer import check_peer, check_runtime_dir
from banger.model.layout import Layout

if TYPE_CHECKING:  # imported on an error only (its dataclasses cost ~8 ms)
    from banger.client.types import ErrorBody

RECV = 1 << 16
HANDSHAKE_TIMEOUT = 10.0
# How long the daemon may take to start the command (reconnect to the agent, STARTED).
START_TIMEOUT = 60.0
# A refusal's body (an error's JSON) is short; more is not read.
MAX_REJECT_BODY = 64 << 10
# The daemon's messages: its output messages are the agent's frames (64 KiB), the rest
# short JSON; a tag byte and some room on top.
MAX_MESSAGE = EXEC_MAX_MESSAGE + 1024
# The largest stdin message this client sends.
STDIN_CHUNK = 1 << 16


class ExecFailed(ApiError):
    """The daemon refused or ended the exec: ``body`` says why (code and message)."""

    def __init__(self, body: ErrorBody) -> None:
        super().__init__(body, 409 if body.code == "conflict" else 500)


class ExecLost(DaemonUnavailable):
    """The connection to the daemon broke during an exec."""


class NotListening(DaemonUnavailable):
    """Nothing accepts on the daemon's socket (bangerd is not running)."""


# NamedTuples, not dataclasses: a frozen dataclass costs ~0.5 ms to define, 1/7 of that.
class Output(NamedTuple):
    stream: str  # "stdout" | "stderr"
    data: bytes


class Exit(NamedTuple):
    code: int | None
    signal: int | None
    returncode: int


class Started(NamedTuple):
    """The VM the command runs in, as the daemon's "started" message says (an older
    daemon sends none of it: None)."""

    id: str | None = None
    name: str | None = None
    workspace_path: str | None = None
    workspace_guest_path: str | None = None
    workspace_head: str | None = None


Event = Output | Exit


class ExecSession:
    """One exec: open it with :func:`open_exec`, then pump :meth:`receive` and the
    ``send_*`` methods (and :meth:`flush` when :meth:`pending`) from a select loop."""

    def __init__(self, sock: socket.socket, decoder: wsframe.Decoder) -> None:
        self.sock = sock
        self._decoder = decoder
        self._out = bytearray()  # the frame being sent (partly, maybe)
        self._ctl: list[bytes] = []  # control frames: they go before stdin
        self._stdin = bytearray()  # stdin not sent yet
        self._eof = False  # EOF after it
        self._eof_sent = False
        # The daemon's stdin window (its "started" says; None: an older daemon, no acks).
        self._window: int | None = None
        self._unacked = 0
        self._messages: list[tuple[int, bytes]] = []
        self.started = Started()
        self.closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    # ---- sending ----------------------------------------------------------------------

    def send_stdin(self, data: bytes) -> None:
        if not self.closed and not self._eof:
            self._stdin += data
            self.flush()

    def send_eof(self) -> None:
        """Close the command's stdin, after what :meth:`send_stdin` took."""
        if not self.closed and not self._eof:
            self._eof = True
            self.flush()

    def resize(self, rows: int, cols: int) -> None:
        self._control({"type": "resize", "rows": rows, "cols": cols})

    def signal(self, signo: int) -> None:
        self._control({"type": "signal", "signal": signo})

    def _control(self, msg: Mapping[str, Any]) -> None:
        self._queue(wsframe.OP_TEXT, json.dumps(msg).encode())

    def _queue(self, opcode: int, payload: bytes) -> None:
        """A control frame: sent before any stdin still waiting."""
        if self.closed:
            return
        self._ctl.append(wsframe.encode(opcode, payload))
        self.flush()

    def pending(self) -> int:
        """Bytes waiting for the socket (or for the daemon's window)."""
        return len(self._out) + sum(map(len, self._ctl)) + len(self._stdin)

    def _room(self) -> int:
        return STDIN_CHUNK if self._window is None else min(
            STDIN_CHUNK, self._window - self._unacked)

    def wants_write(self) -> bool:
        """Something the socket can take now (stdin beyond the window waits for acks)."""
        return bool(self._out or self._ctl or (self._stdin and self._room() > 0)
                    or (self._eof and not self._stdin and not self._eof_sent))

    def _next_frame(self) -> bool:
        if self._ctl:
            self._out += self._ctl.pop(0)
            return True
        room = self._room()
        if self._stdin and room > 0:
            chunk = bytes(self._stdin[:room])
            del self._stdin[:room]
            self._unacked += len(chunk)
            self._out += wsframe.encode(wsframe.OP_BINARY, bytes((EXEC_STDIN,)) + chunk)
            return True
        if self._eof and not self._stdin and not self._eof_sent:
            self._eof_sent = True
            self._out += wsframe.encode(wsframe.OP_TEXT, b'{"type": "eof"}')
            return True
        return False

    def flush(self) -> None:
        """Send what the socket takes now without blocking."""
        while self._out or self._next_frame():
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
        messages, self._messages = self._messages, []
        for opcode, payload in messages:
            yield from self._message(opcode, payload)
            if self.closed:
                return

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
        self._messages += self._decode(data)
        yield from self.buffered()

    def _decode(self, data: bytes) -> list[tuple[int, bytes]]:
        try:
            return self._decoder.feed(data)
        except wsframe.ProtocolError as exc:
            self._close()
            raise ExecLost(f"bangerd broke the WebSocket protocol: {exc}") from exc

    def _message(self, opcode: int, payload: bytes) -> Iterator[Event]:
        if opcode == wsframe.OP_BINARY:
            if payload[:1] == bytes((EXEC_STDOUT,)):
                yield Output("stdout", payload[1:])
            elif payload[:1] == bytes((EXEC_STDERR,)):
                yield Output("stderr", payload[1:])
            return
        if opcode == wsframe.OP_PING:
            self._queue(wsframe.OP_PONG, payload)
            return
        if opcode == wsframe.OP_CLOSE:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            self._close()
            raise ExecLost("bangerd closed the exec without saying how the command ended "
                           f"(code {code})")
        if opcode != wsframe.OP_TEXT:
            return  # a pong: nothing to do
        msg = _json(payload)
        kind = msg.get("type")
        if kind == "exit":
            self._close()
            yield Exit(code=msg.get("code"), signal=msg.get("signal"),
                       returncode=int(msg["returncode"]))
        elif kind == "error":
            self._close()
            raise _failed(msg)
        elif kind == "stdin_ack":
            # Room in the window again (the guest read that much).
            self._unacked = max(0, self._unacked - _int(msg.get("bytes")))
            self.flush()
        # "started" comes before (open_exec), or a kind this client does not know

    def _close(self) -> None:
        self.closed = True
        self.close()

    def close(self) -> None:
        """Hang up: a command still running is ended by the daemon (SIGHUP, SIGKILL)."""
        with contextlib.suppress(OSError):
            self.sock.close()


def _json(payload: bytes) -> dict[str, Any]:
    try:
        msg = json.loads(payload.decode())
    except ValueError as exc:  # UnicodeDecodeError too
        raise ExecLost(f"bangerd sent a text message that is not JSON: {payload[:100]!r}"
                       ) from exc
    if not isinstance(msg, dict):
        raise ExecLost(f"bangerd sent a message that is not an object: {payload[:100]!r}")
    return msg


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _failed(msg: Mapping[str, Any]) -> ExecFailed:
    from banger.client.types import ErrorBody
    return ExecFailed(ErrorBody(code=str(msg.get("code", "error")),
                                message=str(msg.get("message", ""))))


def start_exec(ref: str, argv: Sequence[str], *, env: Mapping[str, str] | None,
               cwd: str | None, tty: tuple[int, int] | None, in_workspace: bool = False,
               layout: Layout | None = None,
               connect: Callable[[Layout], Any] | None = None) -> ExecSession:
    """:func:`open_exec` on the user's daemon, which is started first when it is not
    running (through ``connect()``, whose autostart is the one every command has).

    The runtime directory is verified as ``connect()`` does before its socket is used;
    a running daemon then costs this one connection and no other request."""
    layout = layout or Layout.for_user()
    check_runtime_dir(layout)
    path = str(layout.daemon_socket)
    kw: dict[str, Any] = {"env": env, "cwd": cwd, "tty": tty, "in_workspace": in_workspace}
    try:
        return open_exec(path, seg(ref), argv, **kw)
    except NotListening:
        pass
    if connect is None:
        from banger.client.client import connect as connect_daemon
        connect = connect_daemon
    connect(layout)
    return open_exec(path, seg(ref), argv, **kw)


def open_exec(socket_path: str, ref_segment: str, argv: Sequence[str], *,
              env: Mapping[str, str] | None, cwd: str | None,
              tty: tuple[int, int] | None, in_workspace: bool = False) -> ExecSession:
    """Connect (peer-checked), upgrade, send the start message and wait until the
    command runs; raises :class:`ExecFailed` when the daemon refuses it,
    :class:`NotListening` when nothing accepts on ``socket_path``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(HANDSHAKE_TIMEOUT)
        try:
            sock.connect(socket_path)
        except OSError as exc:
            raise NotListening(f"bangerd is not answering on {socket_path}: "
                               f"{exc.strerror or exc}") from exc
        check_peer(sock, socket_path)
        key = wsframe.new_key()
        sock.sendall(wsframe.upgrade_request(f"{PREFIX}/vms/{ref_segment}/exec", key))
        session = ExecSession(sock, wsframe.Decoder(MAX_MESSAGE))
        session._messages = session._decode(_handshake(sock, key))
        start: dict[str, Any] = {
            "argv": list(argv), "env": dict(env) if env else None, "cwd": cwd,
            "tty": None if tty is None else {"rows": tty[0], "cols": tty[1]}}
        if in_workspace:  # only then: an older daemon refuses a field it does not know
            start["in_workspace"] = True
        sock.sendall(wsframe.encode(wsframe.OP_TEXT, json.dumps(start).encode()))
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


def _handshake(sock: socket.socket, key: str) -> bytes:
    """Read the upgrade's answer; the bytes after it (frames already sent)."""
    buf = bytearray()
    while True:
        data = sock.recv(RECV)
        if not data:
            raise ExecLost("bangerd closed the connection during the WebSocket handshake")
        buf += data
        try:
            parsed = wsframe.parse_head(buf)
            if parsed is None:
                continue
            head, rest = parsed
            if head.status == 101:
                wsframe.check_accept(head, key)
                return rest
        except wsframe.ProtocolError as exc:
            raise ExecLost(f"bangerd broke the WebSocket handshake: {exc}") from exc
        _rejected(head.status, _body(sock, head, rest))


def _body(sock: socket.socket, head: wsframe.Head, rest: bytes) -> bytes:
    """A refusal's body: Content-Length's worth, or up to the close; capped."""
    length = head.headers.get("content-length", "")
    want = min(int(length), MAX_REJECT_BODY) if length.isdigit() else MAX_REJECT_BODY
    body = bytearray(rest)
    with contextlib.suppress(OSError):
        while len(body) < want:
            data = sock.recv(RECV)
            if not data:
                break
            body += data
    return bytes(body[:want])


def _rejected(status: int, body: bytes) -> None:
    from banger.client.types import ErrorBody
    try:
        err = json.loads(body)["error"]
        raise ExecFailed(ErrorBody(code=str(err["code"]), message=str(err["message"])))
    except (ValueError, KeyError, TypeError):
        pass
    raise ExecFailed(ErrorBody(code="http_error", message=f"bangerd refused the exec "
                               f"WebSocket (HTTP {status}); is it an older bangerd? "
                               "`banger system restart` runs the current one"))


def _wait_started(session: ExecSession) -> None:
    """Blocking, before the socket turns non-blocking: until "started" (or the error).
    What came after "started" stays for :meth:`ExecSession.buffered`."""
    while True:
        while session._messages:
            opcode, payload = session._messages.pop(0)
            if opcode == wsframe.OP_TEXT:
                msg = _json(payload)
                if msg.get("type") == "started":
                    window = _int(msg.get("stdin_window"))
                    session._window = window if window > 0 else None
                    vm = msg.get("vm")
                    if isinstance(vm, dict):
                        session.started = Started(**{
                            k: (str(vm[k]) if vm.get(k) is not None else None)
                            for k in ("id", "name", "workspace_path",
                                      "workspace_guest_path", "workspace_head")})
                    return
                if msg.get("type") == "error":
                    raise _failed(msg)
            elif opcode == wsframe.OP_CLOSE:
                raise ExecLost("bangerd closed the exec before the command started")
            elif opcode == wsframe.OP_PING:
                session._queue(wsframe.OP_PONG, payload)
        try:
            data = session.sock.recv(RECV)
        except TimeoutError as exc:
            raise ExecLost(f"the command did not start within {START_TIMEOUT:.0f} s") from exc
        if not data:
            raise ExecLost("bangerd closed the connection before the command started")
        session._messages += session._decode(data)
