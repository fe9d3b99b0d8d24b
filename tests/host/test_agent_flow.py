"""Flow control and LISTENING through the real ``banger-agent`` driven by banger's
AgentConnection over a socketpair: a consumer that stalls on one exec holds nobody else
up, the host holds at most one window per exec, stdin and output of any size stream
through, and the guest's listening sockets are what ``ss`` sees."""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest
import ss_reference
from agentconn import running_agent

from banger.host.agent_client import AgentConnection
from banger.host.agent_exec import Exec
from banger.host.agent_records import Stream

pytestmark = pytest.mark.host
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}


@pytest.fixture
def conn() -> Iterator[AgentConnection]:
    with running_agent("flow", window=256 << 10) as c:
        yield c


def wait_until(cond: object, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_a_stalled_consumer_stalls_nobody_else(conn: AgentConnection) -> None:
    assert "credit" in conn.features()
    flood = conn.exec(["head", "-c", "500000000", "/dev/zero"], env=ENV)  # never read
    state = flood._state
    wait_until(lambda: state.allowed == 0, "the flood fills its window")
    # The guest stopped at the window: the host holds exactly that, the reader reads on.
    assert sum(len(d) for _, d in state.queue) == conn.window
    assert conn.ping(10) < 10
    status, out, _ = conn.exec(["echo", "meanwhile"], env=ENV).collect(10)
    assert (status.returncode, out) == (0, b"meanwhile\n")
    assert sum(len(d) for _, d in state.queue) == conn.window, "still nothing past it"
    # Reading it grants more: the flood goes on.
    seen = 0
    for _, data in flood.output(10):
        seen += len(data)
        if seen > 4 * conn.window:
            break
    flood.kill()
    # What it printed before the SIGKILL is still in the pipe and the window: the agent
    # sends EXIT after it, within the credit that reading grants (Exec.wait's rule).
    for _ in flood.output(10):
        pass
    assert flood.wait(10).returncode == 137


def test_50_mb_of_stdin_through_cat(conn: AgentConnection) -> None:
    payload = os.urandom(50 << 20)
    cat = conn.exec(["cat"], env=ENV, max_output=None)
    digest = hashlib.sha256()
    size = [0]

    def read() -> None:
        for _, data in cat.output(30):
            digest.update(data)
            size[0] += len(data)

    reader = threading.Thread(target=read)
    reader.start()
    cat.write_stdin(payload, timeout=30)
    cat.close_stdin()
    reader.join(60)
    assert cat.wait(10).returncode == 0
    assert (size[0], digest.hexdigest()) == (len(payload), hashlib.sha256(payload).hexdigest())


def test_output_without_a_total_cap_through_a_callback(conn: AgentConnection) -> None:
    # More than the default 16 MiB cap, to a callback (credit granted from the reader).
    got = [0]

    def on_output(stream: Stream, data: bytes) -> None:
        got[0] += len(data)

    ex = conn.exec(["head", "-c", str(40 << 20), "/dev/zero"], env=ENV, max_output=None,
                   on_output=on_output)
    assert ex.wait(60).returncode == 0
    assert got[0] == 40 << 20


def _listener(conn: AgentConnection, script: str) -> tuple[Exec, bytes]:
    """``script`` run by python3 in the guest, and the first line it prints (its ports)."""
    server = conn.exec(["python3", "-c", script], env=ENV)
    line = b""
    for _, data in server.output(20):
        line += data
        if line.endswith(b"\n"):
            break
    return server, line


def test_listening_sockets_match_ss(conn: AgentConnection) -> None:
    script = (
        "import socket, sys, time\n"
        "t = socket.socket(); t.bind(('127.0.0.1', 0)); t.listen()\n"
        "u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); u.bind(('::1', 0))\n"
        "d = socket.socket(socket.AF_INET6); "
        "d.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0); d.bind(('::', 0)); "
        "d.listen()\n"
        "print(t.getsockname()[1], u.getsockname()[1], d.getsockname()[1], flush=True)\n"
        "time.sleep(60)\n")
    server, line = _listener(conn, script)
    tcp, udp, dual = (int(p) for p in line.split())
    try:
        ours = {("tcp", "127.0.0.1", tcp), ("udp", "::1", udp), ("tcp", "*", dual)}
        got = {(s.proto, s.address, s.port): s.process for s in conn.listening(10)}
        assert ours <= set(got)
        assert {got[k] for k in ours} == {"python3"}
        # errors="replace": a process of this machine may have a name that is not UTF-8.
        ss = subprocess.run(["ss", "-H", "-l", "-n", "-t", "-u", "-p"], capture_output=True,
                            text=True, errors="replace", check=True).stdout
        theirs = {(s.proto, s.address, s.port): s.process for s in ss_reference.parse_ss(ss)}
        assert {k: theirs[k] for k in ours} == {k: got[k] for k in ours}
    finally:
        server.kill()
        server.wait(10)


def test_a_process_name_cut_inside_a_character_is_listed_not_fatal(
        conn: AgentConnection) -> None:
    # The kernel keeps 15 bytes of a command name: a UTF-8 name is cut inside a character
    # ("überwachungsdämon" -> b"\xc3\xbcberwachungsd\xc3"), and any process may name
    # itself any bytes. A LISTENING answer must stay UTF-8, or the host takes it as a
    # broken protocol and drops the connection (and every exec on it).
    script = (
        "import ctypes, socket, time\n"
        "ctypes.CDLL(None).prctl(15, 'überwachungsdämon'.encode(), 0, 0, 0)\n"
        "t = socket.socket(); t.bind(('127.0.0.1', 0)); t.listen()\n"
        "print(t.getsockname()[1], flush=True)\n"
        "time.sleep(60)\n")
    server, line = _listener(conn, script)
    try:
        got = {(s.proto, s.address, s.port): s.process for s in conn.listening(10)}
        name = got[("tcp", "127.0.0.1", int(line))]
        assert name is not None and name.startswith("überwachungsd")
        assert conn.failure is None
    finally:
        server.kill()
        server.wait(10)
