"""One long-lived connection to each running guest's agent, and the exec handle the
agent port hands to core.

The connection that got the HELLO at start (the ``wait_agent`` stage) stays open and
serves every later call (stats, execs): no connect and HELLO per call, which is most of
an exec's cost on an emulated guest. A connection that is no longer usable is discarded
and the next call reconnects (connect + HELLO_REQ, docs/agent-protocol.md section 5):
after a daemon restart there is none yet; it may have dropped (the agent restarted, the
guest rebooted: a second HELLO voids its session) or broken the protocol. The VM's
runtime release closes it (:meth:`AgentSessions.release`).

Thread-safe: the daemon calls from a thread per request. One lock per channel, so a
reconnect to a slow guest never holds up another VM.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from banger.host.agent_client import AgentConnection
from banger.host.agent_exec import Exec
from banger.host.agent_records import (
    AgentError,
    AgentProtocolError,
    AgentTimeout,
    ExecEnded,
    Hello,
    Stream,
)
from banger.model.errors import OperationFailed
from banger.ports import ExecExit, ExecOutput

log = logging.getLogger(__name__)
_T = TypeVar("_T")

CONNECT_TIMEOUT = 2.0
# A streamed exec's output has no total cap (a `make test` may print 100 MB): what it
# costs the daemon is bounded by the exec's queue (DEFAULT_MAX_QUEUED frames), and the
# guest waits while banger's client reads slowly. The connection's per-exec cap is set
# out of reach.
UNCAPPED = 1 << 62
# An abandoned exec (its client went away): SIGHUP, then SIGKILL after this long; its
# output is drained (and dropped) meanwhile, so the connection never stalls on it.
ABANDON_GRACE = 2.0
# After the SIGKILL: how long the drain goes on before the connection is given up.
ABANDON_DRAIN = 30.0
_DRAIN_POLL = 0.5


def connect_channel(channel: Path) -> AgentConnection:
    """A new connection to the agent's channel (the VMM's Unix socket); OSError if it
    cannot be reached. The connection asks for a session (HELLO_REQ) at once."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(CONNECT_TIMEOUT)
        sock.connect(str(channel))
    except OSError:
        sock.close()
        raise
    return AgentConnection(sock, name=channel.parent.name, max_output=UNCAPPED)


@dataclass
class Session:
    """A connection and the HELLO that started its session."""

    conn: AgentConnection
    hello: Hello
    released: bool = False  # closed because the VM's runtime was released

    def usable(self) -> bool:
        if self.released or self.conn.failure is not None:
            return False
        try:
            # The latest HELLO at once: another one means a new session (the agent
            # restarted, or the guest rebooted), and the old one's chans are void.
            return self.conn.wait_hello(0) is self.hello
        except AgentError:
            return False


class AgentSessions:
    """The open agent connections, by channel (one per running VM)."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._sessions: dict[Path, Session] = {}
        self._locks: dict[Path, threading.Lock] = {}

    def _lock(self, channel: Path) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(channel, threading.Lock())

    def adopt(self, channel: Path, conn: AgentConnection, hello: Hello) -> None:
        """Keep ``conn`` (which got ``hello``) for ``channel``'s later calls."""
        with self._lock(channel):
            old = self._sessions.get(channel)
            self._sessions[channel] = Session(conn, hello)
        if old is not None and old.conn is not conn:
            old.conn.close()

    def get(self, channel: Path, timeout: float) -> Session:
        """The open session of ``channel``, reconnecting when there is none usable."""
        with self._lock(channel):
            s = self._sessions.get(channel)
            if s is not None and s.usable():
                return s
            if s is not None:
                why = s.conn.failure or "a new HELLO (the agent restarted)"
                log.info("agent connection %s is gone (%s): reconnecting", channel, why)
                del self._sessions[channel]
                s.conn.close()
            s = Session(*_reconnect(channel, timeout))
            self._sessions[channel] = s
            return s

    def call(self, channel: Path, timeout: float, fn: Callable[[Session], _T]) -> _T:
        """``fn`` on the channel's session; once more on a new connection when the kept
        one turns out broken before the request left (``AgentError.unsent``: the agent
        went away and this side had not noticed yet). ``fn`` must send one request
        only: one of several frames (a push, a swap) could find the break after an
        earlier one went, and must not be started over."""
        deadline = time.monotonic() + timeout
        session = self.get(channel, timeout)
        try:
            return fn(session)
        except AgentError as exc:
            if not exc.unsent or session.released:  # released: the VM is going away
                raise
            log.info("agent connection %s was broken (%s): reconnecting", channel, exc)
            self.discard(channel, session)
        return fn(self.get(channel, max(0.1, deadline - time.monotonic())))

    def discard(self, channel: Path, session: Session) -> None:
        """Drop ``session`` (broken, or stuck on an abandoned exec) if it is still the
        channel's; the next call reconnects."""
        with self._lock(channel):
            if self._sessions.get(channel) is session:
                del self._sessions[channel]
        session.conn.close()

    def release(self, channel: Path) -> None:
        with self._lock(channel):
            s = self._sessions.pop(channel, None)
        with self._guard:
            self._locks.pop(channel, None)
        if s is not None:
            s.released = True
            s.conn.close()

    def channels(self) -> list[Path]:
        with self._guard:
            return list(self._sessions)


def _reconnect(channel: Path, timeout: float) -> tuple[AgentConnection, Hello]:
    try:
        conn = connect_channel(channel)
    except OSError as exc:
        raise OperationFailed(f"cannot connect to the guest agent on {channel}: "
                              f"{exc.strerror or exc}; is the VM still running?") from exc
    try:
        return conn, conn.wait_hello(timeout)
    except AgentProtocolError as exc:
        conn.close()
        # An agent older than HELLO_REQ answers it with ERROR on chan 0; anything else
        # (another protocol, garbage) is no older agent, and a restart may not help.
        if "ERROR on chan 0" not in str(exc):
            raise OperationFailed(f"the guest agent on {channel} did not start a "
                                  f"session: {exc}") from exc
        raise OperationFailed(
            f"the guest agent on {channel} did not start a session ({exc}); an agent "
            "older than this banger does that: restart the VM to get the current "
            "agent (`banger vm restart NAME`)") from exc
    except AgentError as exc:
        conn.close()
        raise OperationFailed(f"the guest agent on {channel} did not answer: {exc}") from exc


class AgentExec:
    """A :class:`~banger.ports.GuestExec` over one :class:`Exec` of a session."""

    def __init__(self, sessions: AgentSessions, channel: Path, session: Session,
                 ex: Exec) -> None:
        self._sessions, self._channel, self._session = sessions, channel, session
        self._ex = ex
        self._gen_lock = threading.Lock()
        self._output: Iterator[tuple[Stream, bytes]] | None = None
        self._output_timeout = 0.0
        self._abandoned = False

    def _failed(self, exc: AgentError) -> OperationFailed:
        if self._session.released:
            return OperationFailed(f"{self._ex.what()} ended: the VM was stopped (its "
                                   "runtime released) while the command ran")
        return OperationFailed(f"{self._ex.what()} lost its guest agent: {exc}")

    def next(self, timeout: float) -> ExecOutput | ExecExit | None:
        with self._gen_lock:
            for _ in range(2):  # a second pass only to raise (or end) what just ended
                if self._output is None or self._output_timeout != timeout:
                    self._output, self._output_timeout = self._ex.output(timeout), timeout
                try:
                    stream, data = next(self._output)
                except StopIteration:
                    self._output = None
                    try:
                        st = self._ex.wait(0)
                    except AgentError as exc:
                        raise self._failed(exc) from exc
                    return ExecExit(code=st.code, signal=st.signal)
                except AgentTimeout:
                    # Nothing within timeout; an exec that ended meanwhile is looked at
                    # again (its error, or its end, comes at once).
                    self._output = None
                    if not self._ended():
                        return None
                    continue
                except AgentError as exc:
                    self._output = None
                    raise self._failed(exc) from exc
                return ExecOutput("stdout" if stream == "stdout" else "stderr", data)
            return None

    def _ended(self) -> bool:
        try:
            self._ex.wait(0)
        except AgentTimeout:
            return False
        except AgentError:
            return True
        return True

    def write_stdin(self, data: bytes) -> None:
        # No time limit on the guest's credit: a command that reads its stdin late
        # (`sleep 40; wc -l`) gets all of it. The wait ends with the exec (an abandoned
        # one is killed) or its connection.
        try:
            self._ex.write_stdin(data, until_end=True)
        except ExecEnded:
            pass  # it ended (or stopped reading): its exit comes through next()
        except AgentError as exc:
            raise self._failed(exc) from exc

    def close_stdin(self) -> None:
        try:
            self._ex.close_stdin()
        except ExecEnded:
            pass
        except AgentError as exc:
            raise self._failed(exc) from exc

    def signal(self, signo: int) -> None:
        try:
            self._ex.signal(signo)
        except AgentError as exc:
            raise self._failed(exc) from exc

    def resize(self, rows: int, cols: int) -> None:
        try:
            self._ex.resize(rows, cols)
        except ExecEnded:
            pass
        except AgentError as exc:
            raise self._failed(exc) from exc

    def abandon(self) -> None:
        if self._abandoned:
            return
        self._abandoned = True
        threading.Thread(target=self._reap, daemon=True,
                         name=f"agent-abandon:{self._ex.chan}").start()

    def _reap(self) -> None:
        """SIGHUP, as a terminal that hung up; SIGKILL after ABANDON_GRACE; the output is
        read and dropped until the end, or the connection is given up after
        ABANDON_DRAIN (a reader blocked on this exec's full queue stalls every other
        exec of the VM)."""
        with contextlib.suppress(AgentError):
            self._ex.signal(signal.SIGHUP)
        start = time.monotonic()
        killed = False
        while True:
            try:
                item = self.next(_DRAIN_POLL)
            except OperationFailed:
                return
            if isinstance(item, ExecExit):
                return
            waited = time.monotonic() - start
            if not killed and waited >= ABANDON_GRACE:
                killed = True
                with contextlib.suppress(AgentError):
                    self._ex.kill()
            if waited >= ABANDON_GRACE + ABANDON_DRAIN:
                log.warning("%s did not end after SIGKILL: dropping the agent connection",
                            self._ex.what())
                self._sessions.discard(self._channel, self._session)
                return
