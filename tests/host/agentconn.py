"""The real banger-agent on one end of a socketpair (``--fd``), banger's AgentConnection
on the other: what the host tests that drive the agent through the client share."""

from __future__ import annotations

import contextlib
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

from banger.host.agent_client import AgentConnection
from banger.host.agentbin import ensure_agent


def agent_binary() -> Path:
    # Cached across runs (and CI jobs) like the test images: the build is keyed by source.
    return ensure_agent(Path.home() / ".cache" / "banger-test")


@contextlib.contextmanager
def running_agent(name: str, *, hello: bool = True, **kw: int) -> Iterator[AgentConnection]:
    """A connection to a fresh agent (its HELLO awaited unless ``hello=False``); on the
    way out the agent must exit 0, as it does when its host closes the channel."""
    host, guest = socket.socketpair()
    proc = subprocess.Popen([str(agent_binary()), "--fd", str(guest.fileno())],
                            pass_fds=[guest.fileno()])
    guest.close()
    conn = AgentConnection(host, name=name, **kw)  # type: ignore[arg-type]
    try:
        if hello:
            conn.wait_hello(10)
        yield conn
    finally:
        conn.close()
        assert proc.wait(timeout=10) == 0, "the agent exits 0 once the host closed"
