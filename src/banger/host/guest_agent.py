"""The agent port on this host: the guest agent's HELLO and its STATS, through
:class:`~banger.host.agent_client.AgentConnection`, over the channel a VMM driver serves
(QEMU: the Unix socket of the virtio-serial port ``banger.agent``).

The HELLO is banger's readiness signal: the guest booted, banger's init ran and the agent
answers. The wait polls the VMM's liveness the whole time (a dead VMM ends it with the
serial log's last lines at once, a raising ``alive`` ends it too: that is how a cancel
arrives), and reconnects when the channel drops (the agent restarts, or the VMM's socket
refused a connection that came too early).
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable
from pathlib import Path

from banger.host.agent_client import AgentConnection
from banger.host.agent_records import AgentError, AgentProtocolError, AgentTimeout, safe_text
from banger.local.logtail import tail_lines
from banger.model.errors import OperationFailed
from banger.ports import AgentHello, GuestFilesystem, GuestStats

# How often the VMM's liveness (and a cancel) is checked while the guest boots.
POLL = 0.1
# Between two connection attempts: the socket is the VMM's, it accepts at once when up.
RECONNECT_PAUSE = 0.1
CONNECT_TIMEOUT = 2.0
TAIL_LINES = 15


class AgentNotReady(OperationFailed):
    """The guest agent never said HELLO: the VMM died, the wait timed out, or the agent
    speaks another protocol."""


class LocalAgent:
    """Readiness through the guest agent (``AgentPort``)."""

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
                        conn = _connect(channel)
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
                # Guest strings: printable and short before they reach a record or screen.
                return AgentHello(boot_id=safe_text(hello.boot_id, 64),
                                  version=safe_text(hello.version, 64))
        finally:
            if conn is not None:
                conn.close()


    def stats(self, *, channel: Path, timeout: float) -> GuestStats:
        deadline = time.monotonic() + timeout
        try:
            with _connect(channel) as conn:
                conn.wait_hello(timeout)
                raw = conn.stats(max(0.1, deadline - time.monotonic()))
        except (OSError, AgentError) as exc:
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


def _connect(channel: Path) -> AgentConnection:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(CONNECT_TIMEOUT)
        sock.connect(str(channel))
    except OSError:
        sock.close()
        raise
    return AgentConnection(sock, name=channel.parent.name)


def with_tail(message: str, log: Path) -> str:
    """``message`` and the last lines of the guest's serial log."""
    with contextlib.suppress(OSError):
        body = "\n".join(f"  {line}" for line in tail_lines(log, TAIL_LINES)) or "  (empty)"
        return f"{message}\nlast lines of the serial log {log}:\n{body}"
    return f"{message}\n(serial log {log} unreadable)"
