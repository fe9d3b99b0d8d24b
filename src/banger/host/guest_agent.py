"""The agent port on this host: the guest agent's HELLO, its STATS, execs and what banger
itself does in a guest (:mod:`banger.host.agent_guestops`), through
:class:`~banger.host.agent_client.AgentConnection`, over the channel a VMM driver serves
(QEMU: the Unix socket of the virtio-serial port ``banger.agent``). The connection that
got the HELLO stays open for what follows (:mod:`banger.host.agent_sessions`).

The HELLO is banger's readiness signal: the guest booted, banger's init ran and the agent
answers. The wait polls the VMM's liveness the whole time (a dead VMM ends it with the
serial log's last lines at once, a raising ``alive`` ends it too: that is how a cancel
arrives), and reconnects when the channel drops (the agent restarts, or the VMM's socket
refused a connection that came too early).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from banger.host import agent_guestops, guest_files
from banger.host.agent_client import AgentConnection
from banger.host.agent_records import (
    AgentError,
    AgentProtocolError,
    AgentRequestError,
    AgentTimeout,
    safe_text,
)
from banger.host.agent_sessions import AgentExec, AgentSessions, Session, connect_channel
from banger.local.logtail import tail_lines
from banger.model.config import FileSync
from banger.model.errors import InvalidRequest, OperationFailed
from banger.ports import AgentHello, ExecRequest, GuestFilesystem, GuestStats, ListeningSocket

# How often the VMM's liveness (and a cancel) is checked while the guest boots.
POLL = 0.1
# Between two connection attempts: the socket is the VMM's, it accepts at once when up.
RECONNECT_PAUSE = 0.1
TAIL_LINES = 15
# Connect (after a daemon restart) and HELLO before one of banger's own guest calls.
SESSION_TIMEOUT = 15.0
LISTENING_TIMEOUT = 30.0
_T = TypeVar("_T")


class AgentNotReady(OperationFailed):
    """The guest agent never said HELLO: the VMM died, the wait timed out, or the agent
    speaks another protocol."""


class LocalAgent:
    """The guest agent (``AgentPort``): readiness, stats and execs."""

    def __init__(self, sessions: AgentSessions | None = None) -> None:
        self.sessions = sessions or AgentSessions()

    def wait_hello(self, *, channel: Path, timeout: float, serial_log: Path,
                   alive: Callable[[], bool]) -> AgentHello:
        deadline = time.monotonic() + timeout
        last = "not connected yet"
        conn: AgentConnection | None = None
        try:
            while True:
                if not alive():
                    raise AgentNotReady(with_tail(
                        f"the VM process exited while waiting for the guest agent's HELLO "
                        f"on {channel} ({last})", serial_log))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AgentNotReady(with_tail(
                        f"the guest agent did not say HELLO within {timeout:.0f} s on "
                        f"{channel} ({last}); the image must start "
                        f"/usr/local/sbin/banger-agent (banger's images do)", serial_log))
                if conn is None:
                    try:
                        conn = connect_channel(channel)
                    except OSError as exc:
                        last = f"cannot connect: {exc.strerror or exc}"
                        time.sleep(min(RECONNECT_PAUSE, left))
                        continue
                try:
                    hello = conn.wait_hello(min(POLL, left))
                except AgentTimeout:
                    last = "connected, no HELLO yet"
                    continue
                except AgentProtocolError as exc:
                    # Another protocol (or garbage): waiting longer cannot fix it.
                    raise AgentNotReady(f"the guest agent on {channel} cannot be used: "
                                        f"{exc}") from exc
                except AgentError as exc:
                    last = f"the channel closed: {exc}"
                    conn.close()
                    conn = None
                    time.sleep(min(RECONNECT_PAUSE, max(0.0, left)))
                    continue
                # Kept open: stats and execs go over it.
                self.sessions.adopt(channel, conn, hello)
                conn = None
                # Guest strings: printable and short before they reach a record or screen.
                return AgentHello(boot_id=safe_text(hello.boot_id, 64),
                                  version=safe_text(hello.version, 64))
        finally:
            if conn is not None:
                conn.close()


    def stats(self, *, channel: Path, timeout: float) -> GuestStats:
        deadline = time.monotonic() + timeout
        try:
            raw = self.sessions.call(channel, timeout, lambda session: session.conn.stats(
                max(0.1, deadline - time.monotonic())))
        except (OperationFailed, AgentError) as exc:
            raise OperationFailed(f"could not read stats from the guest agent on {channel}: "
                                  f"{exc}") from exc
        return GuestStats(
            uptime_ms=raw.uptime_ms, load1=raw.load1_x100 / 100, load5=raw.load5_x100 / 100,
            load15=raw.load15_x100 / 100, mem_total_kib=raw.mem_total_kib,
            mem_available_kib=raw.mem_available_kib, cpu_user_ticks=raw.cpu_user_ticks,
            cpu_system_ticks=raw.cpu_system_ticks, cpu_idle_ticks=raw.cpu_idle_ticks,
            ncpu=raw.ncpu, filesystems=tuple(
                GuestFilesystem(f.mountpoint, f.size_bytes, f.used_bytes, f.avail_bytes)
                for f in raw.filesystems))


    def exec(self, *, channel: Path, request: ExecRequest, timeout: float) -> AgentExec:
        deadline = time.monotonic() + timeout

        def start(session: Session) -> AgentExec:
            ex = session.conn.exec(request.argv, request.env, request.cwd, request.pty,
                                   timeout=max(0.1, deadline - time.monotonic()))
            return AgentExec(self.sessions, channel, session, ex)

        try:
            return self.sessions.call(channel, timeout, start)
        except ValueError as exc:  # NUL in a string, an empty argv, too large
            raise InvalidRequest(str(exc)) from exc
        except AgentRequestError as exc:
            raise OperationFailed(str(exc)) from exc
        except AgentError as exc:
            raise OperationFailed(f"could not start {safe_text(request.argv[0], 80)} "
                                  f"through the guest agent on {channel}: {exc}") from exc

    def _on_session(self, channel: Path, what: str,
                    fn: Callable[[AgentConnection], _T]) -> _T:
        """``fn`` over the VM's kept connection; agent errors said as ``what`` failing."""
        session = self.sessions.get(channel, SESSION_TIMEOUT)
        try:
            return fn(session.conn)  # several requests: never started over (sessions.call)
        except AgentError as exc:
            raise OperationFailed(f"{what} through the guest agent on {channel} failed: "
                                  f"{exc}") from exc

    def push_tree(self, *, channel: Path, tree: Path, guest_path: str) -> None:
        self._on_session(channel, f"copying {tree} to {guest_path}",
                         lambda c: agent_guestops.push_tree(c, tree, guest_path))

    def sync_files(self, *, channel: Path, entries: Sequence[FileSync],
                   identity: Mapping[str, str] | None) -> list[str]:
        return self._on_session(channel, "file_sync",
                                lambda c: agent_guestops.sync_files(c, entries,
                                                                    identity or {}))

    def start_bootstrap(self, *, channel: Path, workdir: str, installer_url: str) -> str:
        return self._on_session(channel, "starting the tool bootstrap",
                                lambda c: agent_guestops.start_bootstrap(c, workdir,
                                                                         installer_url))

    def listening(self, *, channel: Path) -> list[ListeningSocket]:
        return self._on_session(channel, "listing the guest's sockets",
                                lambda c: agent_guestops.listening(c, LISTENING_TIMEOUT))

    def poweroff(self, *, channel: Path, timeout: float) -> None:
        deadline = time.monotonic() + timeout  # the reconnect and the answer together
        session = self.sessions.get(channel, min(timeout, SESSION_TIMEOUT))
        try:
            session.conn.poweroff(max(0.1, deadline - time.monotonic()))
        except AgentError as exc:
            raise OperationFailed(f"the guest agent on {channel} did not power off: "
                                  f"{exc}") from exc

    def release(self, *, channel: Path) -> None:
        self.sessions.release(channel)

    def close(self) -> None:
        for channel in self.sessions.channels():
            self.sessions.release(channel)

    # --- files (`vm cp`): host/guest_files.py ---------------------------------------------

    def put_files(self, *, channel: Path, dest: str, source: Iterable[bytes],
                  timeout: float) -> int:
        return guest_files.put_files(self.sessions, channel=channel, dest=dest,
                                     source=source, timeout=timeout)

    def get_files(self, *, channel: Path, path: str,
                  timeout: float) -> Generator[bytes, None, None]:
        return guest_files.get_files(self.sessions, channel=channel, path=path,
                                     timeout=timeout)


def with_tail(message: str, log: Path) -> str:
    """``message`` and the last lines of the guest's serial log."""
    with contextlib.suppress(OSError):
        body = "\n".join(f"  {line}" for line in tail_lines(log, TAIL_LINES)) or "  (empty)"
        return f"{message}\nlast lines of the serial log {log}:\n{body}"
    return f"{message}\n(serial log {log} unreadable)"
