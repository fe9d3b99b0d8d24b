"""The host's view of one exec in the guest: its state machine and its handle.

:func:`on_exec_frame` applies what the agent sends on an exec's chan (STARTED, then
output, then EXIT or EXEC_ERROR; anything else out of order is a protocol error).

:class:`Exec` is the handle :meth:`AgentConnection.exec` returns: it holds one exec's
output, its end, and the requests that go to that exec's chan. With an agent that does
flow control (HELLO's "credit" feature) the output held is bounded by the window the
host granted: the consumer grants more as it reads, stdin waits for the guest's credit,
and the reader never waits for anyone. With an older agent the reader blocks when the
queue is full (which stalls the whole connection: the legacy backpressure).
The connection (:mod:`banger.host.agent_client`) owns the lock and the socket.
"""

from __future__ import annotations

import contextlib
import logging
import signal as signals
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from banger.host.agent_proto import (
    MAX_BODY,
    CreditTag,
    Frame,
    Kind,
    ProtocolError,
    ResizeTag,
    SignalTag,
    fields,
    frame,
    kind_name,
)
from banger.host.agent_records import (
    AgentError,
    AgentRequestError,
    AgentTimeout,
    ExecEnded,
    ExitStatus,
    OutputTooLarge,
    Stream,
    fresh,
    parse_credit,
    parse_exit,
    parse_message,
    parse_started,
    safe_text,
)
from banger.host.runner import size_text

if TYPE_CHECKING:
    from banger.host.agent_client import AgentConnection

log = logging.getLogger(__name__)
# After SIGKILL an honest agent still drains what the pipes held (64 KiB each, a pty's
# buffer): more than this past the cap is a guest that ignores the kill.
_KILL_GRACE = 1 << 20

OutputCallback = Callable[[Stream, bytes], None]


@dataclass
class ExecState:
    """What the reader thread knows of one exec; guarded by the connection's lock."""

    argv: tuple[str, ...]
    on_output: OutputCallback | None
    queue: deque[tuple[Stream, bytes]] = field(default_factory=deque)
    pid: int | None = None
    started: bool = False
    status: ExitStatus | None = None
    error: AgentError | None = None
    output_bytes: int = 0
    killed: bool = False
    max_output: int | None = None  # total output before SIGKILL; None: no cap
    # Flow control (window > 0: the agent does it): output the guest may still send,
    # output read by the consumer and not granted back yet, stdin the guest will take.
    window: int = 0
    allowed: int = 0
    ungranted: int = 0
    stdin_credit: int | None = None  # None: the agent grants none (an older agent)

    @property
    def ended(self) -> bool:
        return self.status is not None or self.error is not None


class Exec:
    """One command running in the guest (see :meth:`AgentConnection.exec`)."""

    def __init__(self, conn: AgentConnection, chan: int, state: ExecState) -> None:
        self._conn = conn
        self.chan = chan
        self._state = state

    @property
    def argv(self) -> tuple[str, ...]:
        return self._state.argv

    @property
    def pid(self) -> int | None:
        """The command's pid in the guest (known once STARTED came)."""
        return self._state.pid

    def write_stdin(self, data: bytes, timeout: float | None = None, *,
                    until_end: bool = False) -> None:
        """Send ``data`` to the command's stdin (split into frames as needed).

        With flow control each frame waits for the guest's credit (the command reading),
        at most ``timeout`` seconds (default: the connection's send timeout) per wait;
        :class:`AgentTimeout` then (the connection stays up). ``until_end``: no limit,
        the wait lasts as long as the exec and its connection (a command may read its
        stdin late: `sleep 40; wc -l`). Raises :class:`ExecEnded` once the exec has
        ended (or was killed), also part way.
        """
        view, pos = memoryview(data), 0
        cond, st = self._conn.cond, self._state
        limit = None if until_end else (self._conn.send_timeout if timeout is None
                                        else timeout)
        while pos < len(data):
            size = min(MAX_BODY, len(data) - pos)
            if st.stdin_credit is not None:
                with cond:
                    if not cond.wait_for(lambda: st.stdin_credit or st.ended
                                         or self._conn.failure, limit):
                        raise AgentTimeout(f"{self.what()} took no stdin for {limit} s")
                    self._live()
                    size = min(size, st.stdin_credit)
                    st.stdin_credit -= size
            self._conn.send_data(self.chan, Kind.STDIN, bytes(view[pos:pos + size]),
                                 self._live())
            pos += size

    def close_stdin(self) -> None:
        """Close the command's stdin (with a pty: the terminal's EOF character)."""
        self._conn.send_request_frame(self.chan, Kind.STDIN_EOF, [], self._live())

    def signal(self, signo: int) -> None:
        """Send signal ``signo`` to the command (its process group with a pty)."""
        if not self._state.ended:
            self._conn.send_request_frame(self.chan, Kind.SIGNAL,
                                          [(SignalTag.SIGNO, int(signo))], self.what())

    def kill(self) -> None:
        self.signal(signals.SIGKILL)

    def resize(self, rows: int, cols: int) -> None:
        """Set the window size of the command's pty."""
        self._conn.send_request_frame(
            self.chan, Kind.RESIZE, [(ResizeTag.ROWS, rows), (ResizeTag.COLS, cols)],
            self._live())

    def _live(self) -> str:
        if self._state.ended:
            raise ExecEnded(f"{self.what()} has already ended")
        return self.what()

    def what(self) -> str:
        return f"exec {self.chan} ({safe_text(' '.join(self._state.argv), 80)})"

    def wait(self, timeout: float) -> ExitStatus:
        """Wait for the command to end; raise the error that ended it otherwise.

        Output nobody reads (no callback, :meth:`output` not iterated) fills the exec's
        queue and then stalls the connection: read it, or this times out.
        """
        cond, st = self._conn.cond, self._state
        with cond:
            if not cond.wait_for(lambda: st.ended, timeout):
                full = (" (its output queue is full: read Exec.output() or pass on_output)"
                        if len(st.queue) >= self._conn.max_queued else "")
                raise AgentTimeout(f"{self.what()} did not end within {timeout:.3g} s{full}")
            if st.error is not None:
                raise fresh(st.error)
            assert st.status is not None
            return st.status

    def output(self, timeout: float) -> Iterator[tuple[Stream, bytes]]:
        """(stream, bytes) as the command prints them, until it ends.

        Each piece is awaited for at most ``timeout`` seconds. Ends normally at EXIT;
        raises the error that ended the exec otherwise (after what came before it).
        """
        cond, st = self._conn.cond, self._state
        while True:
            with cond:
                if not cond.wait_for(lambda: st.queue or st.ended, timeout):
                    raise AgentTimeout(f"{self.what()} printed nothing for {timeout:.3g} s")
                if not st.queue:
                    if st.error is not None:
                        raise fresh(st.error)
                    return
                item = st.queue.popleft()
                grant = consumed(st, len(item[1]))
                cond.notify_all()
            if grant:
                self._grant(grant)
            yield item

    def _grant(self, grant: int) -> None:
        # A failure ended the connection: the waiters hear of it.
        with contextlib.suppress(AgentError):
            self._conn.send_request_frame(self.chan, Kind.CREDIT,
                                          [(CreditTag.BYTES, grant)], self.what())

    def collect(self, timeout: float) -> tuple[ExitStatus, bytes, bytes]:
        """Read all output and wait for the end, within ``timeout`` seconds in all."""
        deadline = time.monotonic() + timeout
        out = {Stream.STDOUT: bytearray(), Stream.STDERR: bytearray()}
        for stream, data in self.output(timeout):
            out[stream] += data
            if time.monotonic() > deadline:
                raise AgentTimeout(f"{self.what()} did not end within {timeout:.3g} s")
        status = self.wait(max(0.0, deadline - time.monotonic()))
        return status, bytes(out[Stream.STDOUT]), bytes(out[Stream.STDERR])


def consumed(st: ExecState, size: int) -> int:
    """With the lock: count ``size`` bytes of output as read; the credit to grant back now
    (a quarter window at a time, so that the guest rarely waits and frames stay few)."""
    if not st.window or st.ended:
        return 0
    st.ungranted += size
    if st.ungranted < st.window // 4:
        return 0
    grant, st.ungranted = st.ungranted, 0
    st.allowed += grant
    return grant


def on_exec_frame(conn: AgentConnection, f: Frame, state: ExecState) -> bool:
    """Apply a frame the agent sent on an exec's chan; True when it ended the chan."""
    kind = f.kind
    if kind == Kind.STARTED:
        if state.started:
            raise ProtocolError(f"a second STARTED on chan {f.chan}")
        pid, stdin_window = parse_started(f.body)
        if (stdin_window is None) != (state.window == 0):
            raise ProtocolError(f"STARTED on chan {f.chan} "
                                f"{'lacks' if stdin_window is None else 'has'} "
                                "STDIN_WINDOW but the EXEC "
                                f"{'had' if state.window else 'had no'} WINDOW")
        with conn.cond:
            state.started, state.pid = True, pid
            state.stdin_credit = stdin_window
            late = state.error is not None
            conn.cond.notify_all()
        if late:  # exec() gave up on it: it is not to run on unseen
            conn.kill(f.chan)
        return False
    if kind in (Kind.STDOUT, Kind.STDERR):
        if not state.started:
            raise ProtocolError(f"{kind_name(kind)} before STARTED on chan {f.chan}")
        _on_output(conn, f, state)
        return False
    if kind == Kind.CREDIT:
        if state.stdin_credit is None:
            raise ProtocolError(f"CREDIT on exec chan {f.chan}, which has no flow control")
        credit = parse_credit(f.body)
        with conn.cond:
            state.stdin_credit += credit
            conn.cond.notify_all()
        return False
    if kind == Kind.EXIT:
        if not state.started:
            raise ProtocolError(f"EXIT before STARTED on chan {f.chan}")
        status = parse_exit(f.body)
    elif kind in (Kind.EXEC_ERROR, Kind.ERROR):
        if state.started:
            if kind == Kind.ERROR:  # a refused STDIN/SIGNAL/RESIZE: the exec goes on
                log.info("agent refused a request on exec %d: %s", f.chan,
                         parse_message(f.body))
                return False
            raise ProtocolError(f"EXEC_ERROR after STARTED on chan {f.chan}")
        refused = AgentRequestError(
            f"the guest agent could not start {safe_text(' '.join(state.argv), 80)}: "
            f"{parse_message(f.body)}")
    else:
        raise ProtocolError(f"{kind_name(kind)} on exec chan {f.chan}")
    with conn.cond:
        if state.error is None:
            if kind == Kind.EXIT:
                state.status = status
            else:
                state.error = refused
        conn.cond.notify_all()
    return True


def _on_output(conn: AgentConnection, f: Frame, state: ExecState) -> None:
    state.output_bytes += len(f.body)
    cap = state.max_output
    if state.window:
        with conn.cond:
            state.allowed -= len(f.body)
        if state.allowed < 0:
            raise ProtocolError(f"exec {f.chan} sent {-state.allowed} bytes of output past "
                                "the window banger granted")
    if cap is not None and state.output_bytes > cap + _KILL_GRACE:
        raise ProtocolError(f"exec {f.chan} kept printing after SIGKILL "
                            f"({state.output_bytes} bytes)")
    stream = Stream.STDOUT if f.kind == Kind.STDOUT else Stream.STDERR
    if cap is not None and state.output_bytes > cap and not state.killed:
        with conn.cond:
            state.killed = True
            state.error = state.error or OutputTooLarge(
                f"exec {f.chan} ({safe_text(' '.join(state.argv), 80)}): its output "
                f"exceeded {size_text(cap)}; the command was killed")
            conn.cond.notify_all()
        conn.kill(f.chan)
    if state.error is not None or not f.body:
        return
    if state.on_output is not None:
        state.on_output(stream, f.body)
        if state.window:
            with conn.cond:
                grant = consumed(state, len(f.body))
            if grant:  # from the reader: never wait for the send lock here
                conn.post(frame(Kind.CREDIT, f.chan, fields([(CreditTag.BYTES, grant)])),
                          f"CREDIT to exec {f.chan}")
        return
    with conn.cond:
        # An older agent's backpressure: wait for the consumer, and so stop reading the
        # guest (every chan waits). With flow control the window bounds the queue.
        while (not state.window and len(state.queue) >= conn.max_queued
               and conn.failure is None and state.error is None):
            conn.cond.wait()
        if conn.failure is None and state.error is None:
            state.queue.append((stream, f.body))
            conn.cond.notify_all()
