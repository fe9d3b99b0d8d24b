"""The two halves of agent protocol v1 together: banger's host client
(:class:`banger.host.agent_client.AgentConnection`) against the real ``banger-agent``
binary, over a socketpair (the bytes a virtio-serial port or a vsock would carry)."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentconn import running_agent

from banger.host.agent_client import AgentConnection

pytestmark = pytest.mark.host
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}


@pytest.fixture
def conn() -> Iterator[AgentConnection]:
    with running_agent("interop", hello=False) as c:
        yield c


def test_hello_names_this_boot(conn: AgentConnection) -> None:
    hello = conn.wait_hello(5)
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert (hello.protocol, hello.boot_id) == (1, boot_id)
    assert conn.ping(5) < 5


def test_the_session_starts_with_the_answer_to_hello_req(conn: AgentConnection) -> None:
    # The agent greets on its own and then answers the HELLO_REQ the client sent on
    # connecting: the answer (with the client's token) is the session, the greeting is not
    # a "second HELLO" that would void what the host started meanwhile.
    hello = conn.wait_hello(5)
    assert hello.token is not None
    status, out, _ = conn.exec(["echo", "ok"], env=ENV).collect(10)
    assert (status.returncode, out, conn.failure) == (0, b"ok\n", None)


def test_exit_codes_streams_and_stdin(conn: AgentConnection) -> None:
    conn.wait_hello(5)
    status, out, err = conn.exec(["sh", "-c", "echo out; echo err >&2; exit 3"],
                                 env=ENV).collect(10)
    assert (status.returncode, out, err) == (3, b"out\n", b"err\n")
    cat = conn.exec(["cat"], env=ENV)
    payload = os.urandom(300_000)  # several frames each way
    cat.write_stdin(payload)
    cat.close_stdin()
    status, out, _ = cat.collect(10)
    assert status.returncode == 0 and out == payload


def test_a_signal_is_128_plus_n_and_execs_run_side_by_side(conn: AgentConnection) -> None:
    conn.wait_hello(5)
    sleeper = conn.exec(["sleep", "100"], env=ENV)
    quick = conn.exec(["echo", "meanwhile"], env=ENV)
    assert quick.collect(10)[1] == b"meanwhile\n"
    sleeper.signal(signal.SIGINT)
    assert sleeper.wait(10).returncode == 128 + signal.SIGINT


def test_a_pty_with_its_window_size(conn: AgentConnection) -> None:
    conn.wait_hello(5)
    status, out, _ = conn.exec(["sh", "-c", "tty; stty size"], env=ENV,
                               pty=(33, 101)).collect(10)
    lines = out.decode().split()
    assert status.returncode == 0 and lines[0].startswith("/dev/pts/")
    assert lines[1:] == ["33", "101"]


def test_stats_are_this_machines(conn: AgentConnection) -> None:
    conn.wait_hello(5)
    stats = conn.stats(5)
    assert stats.ncpu == os.cpu_count()
    assert 0 < stats.mem_available_kib <= stats.mem_total_kib
    assert any(fs.mountpoint == "/" for fs in stats.filesystems)
