"""The agent port's long-lived connections (host/agent_sessions.py) against the Python
agent of tests/fake_agent.py over a real Unix socket, as the VMM serves the channel: the
HELLO's connection serves later calls; a daemon restart, a dropped connection or a new
HELLO reconnect; an older agent is named; a release ends the execs saying the VM was
stopped; a streamed exec has no output cap; an abandoned exec gets SIGHUP."""

from __future__ import annotations

import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from banger.host.agent_proto import Decoder, Kind, as_int, fields, frame, parse_fields
from banger.host.guest_agent import LocalAgent
from banger.model.errors import OperationFailed
from banger.ports import ExecExit, ExecOutput, ExecRequest
from tests.fake_agent import FakeAgent, hello_body
from tests.unit.test_guest_agent_port import Channel, _agent, no_reader_left

pytestmark = pytest.mark.timeout(60)
__all__ = ["no_reader_left"]  # the leak check, autouse here too


class Guest:
    """The channel, with a Python agent on each connection."""

    def __init__(self, path: Path) -> None:
        self.agents: list[FakeAgent] = []
        self.conns: list[socket.socket] = []
        self.channel = Channel(path, self._answer)

    def _answer(self, conn: socket.socket) -> None:
        self.conns.append(conn)
        self.agents.append(FakeAgent(conn, hello=False))

    @property
    def path(self) -> Path:
        return self.channel.path

    def agent(self, i: int) -> FakeAgent:
        """The agent of the ``i``th connection: the accepting thread lists it only once
        the agent runs, which may be after it answered the host's HELLO_REQ."""
        for _ in range(500):
            if len(self.agents) > i:
                return self.agents[i]
            threading.Event().wait(0.01)
        raise AssertionError(f"no agent on connection {i}")


@pytest.fixture
def guest(tmp_path: Path) -> Iterator[Guest]:
    g = Guest(tmp_path / "agent.sock")
    yield g
    g.channel.close()
    for c in g.conns:
        c.close()


def _ready(agent: LocalAgent, guest: Guest, tmp_path: Path) -> None:
    agent.wait_hello(channel=guest.path, timeout=5, serial_log=tmp_path / "none",
                     alive=lambda: True)


def _run(agent: LocalAgent, guest: Guest, argv: list[str],
         stdin: bytes | None = None) -> tuple[bytes, ExecExit]:
    ex = agent.exec(channel=guest.path, request=ExecRequest(tuple(argv), {}), timeout=5)
    if stdin is not None:
        ex.write_stdin(stdin)
        ex.close_stdin()
    out = bytearray()
    while True:
        item = ex.next(5)
        if isinstance(item, ExecExit):
            return bytes(out), item
        if isinstance(item, ExecOutput):
            out += item.data


def test_the_hello_connection_serves_stats_and_execs(guest: Guest, tmp_path: Path) -> None:
    agent = _agent()
    _ready(agent, guest, tmp_path)
    agent.stats(channel=guest.path, timeout=5)
    assert _run(agent, guest, ["echo", "hi"]) == (b"hi\n", ExecExit(code=0))
    assert _run(agent, guest, ["cat"], b"in") == (b"in", ExecExit(code=0))
    assert _run(agent, guest, ["exit", "42"])[1].returncode == 42
    assert guest.channel.accepted == 1


def test_after_a_daemon_restart_the_first_use_connects_once(guest: Guest) -> None:
    agent = _agent()  # no wait_hello: the VM was running before this daemon
    agent.stats(channel=guest.path, timeout=5)
    agent.stats(channel=guest.path, timeout=5)
    assert guest.channel.accepted == 1


def test_a_dropped_connection_is_replaced_on_next_use(guest: Guest, tmp_path: Path) -> None:
    agent = _agent()
    _ready(agent, guest, tmp_path)
    guest.conns[0].shutdown(socket.SHUT_RDWR)  # the agent went away
    guest.agent(0).join()
    assert _run(agent, guest, ["echo", "again"])[0] == b"again\n"
    assert guest.channel.accepted == 2


def test_a_second_hello_voids_the_session(guest: Guest, tmp_path: Path) -> None:
    from tests.fake_agent import hello_body
    agent = _agent()
    _ready(agent, guest, tmp_path)
    session = agent.sessions.get(guest.path, 5)
    guest.agent(0).send(Kind.HELLO, 0, hello_body(boot_id="rebooted"))
    for _ in range(100):
        if not session.usable():
            break
        threading.Event().wait(0.05)
    agent.stats(channel=guest.path, timeout=5)
    assert guest.channel.accepted == 2


def test_an_older_agent_is_told_apart(tmp_path: Path) -> None:
    # An agent from before HELLO_REQ answers it as an unknown kind: ERROR on chan 0.
    def old(conn: socket.socket) -> None:
        conn.settimeout(5)
        Decoder().feed(conn.recv(1 << 16))
        conn.sendall(frame(Kind.ERROR, 0, fields([(1, "unknown kind 0x0c")])))
        kept.append(conn)

    kept: list[socket.socket] = []
    ch = Channel(tmp_path / "agent.sock", old)
    try:
        with pytest.raises(OperationFailed, match="restart the VM to get the current agent"):
            _agent().stats(channel=ch.path, timeout=5)
    finally:
        ch.close()


def test_a_hello_of_another_protocol_is_no_older_agent(tmp_path: Path) -> None:
    # A HELLO that lies (another protocol, a field past its frame) is said as it is: the
    # advice for an agent from before HELLO_REQ (restart the VM) does not apply to it.
    def liar(conn: socket.socket) -> None:
        conn.settimeout(5)
        Decoder().feed(conn.recv(1 << 16))
        conn.sendall(frame(Kind.HELLO, 0, hello_body(protocol=2)))
        kept.append(conn)

    kept: list[socket.socket] = []
    ch = Channel(tmp_path / "agent.sock", liar)
    try:
        with pytest.raises(OperationFailed) as info:
            _agent().stats(channel=ch.path, timeout=5)
        assert "did not start a session" in str(info.value)
        assert "speaks protocol 2" in str(info.value)
        assert "older" not in str(info.value) and "restart" not in str(info.value)
    finally:
        ch.close()


def test_release_ends_the_execs_saying_the_vm_was_stopped(guest: Guest,
                                                          tmp_path: Path) -> None:
    agent = _agent()
    _ready(agent, guest, tmp_path)
    ex = agent.exec(channel=guest.path, request=ExecRequest(("sleep",), {}), timeout=5)
    agent.release(channel=guest.path)
    with pytest.raises(OperationFailed, match="the VM was stopped"):
        ex.next(5)
    guest.agent(0).join()  # the agent saw the hang-up
    assert guest.conns[0].fileno() == -1
    agent.release(channel=guest.path)  # idempotent


def test_a_streamed_exec_has_no_output_cap(guest: Guest, tmp_path: Path) -> None:
    # More than agent_client's default per-exec cap (16 MiB) comes through whole.
    agent = _agent()
    _ready(agent, guest, tmp_path)
    ex = agent.exec(channel=guest.path, request=ExecRequest(("flood",), {}), timeout=5)
    got = 0
    while got < 20 << 20:
        item = ex.next(5)
        assert isinstance(item, ExecOutput), item
        got += len(item.data)
    ex.signal(signal.SIGKILL)
    while not isinstance(item, ExecExit):
        item = ex.next(5)
    assert item.signal == signal.SIGKILL


def test_an_abandoned_exec_gets_sighup_and_the_connection_goes_on(guest: Guest,
                                                                  tmp_path: Path) -> None:
    agent = _agent()
    _ready(agent, guest, tmp_path)
    ex = agent.exec(channel=guest.path, request=ExecRequest(("sleep",), {}), timeout=5)
    ex.abandon()
    done = threading.Event()

    def signalled() -> bool:
        return any(f.kind == Kind.SIGNAL and as_int(dict(parse_fields(f.body))[1])
                   == signal.SIGHUP for f in guest.agent(0).received)

    for _ in range(100):
        if signalled():
            done.set()
            break
        threading.Event().wait(0.05)
    assert done.is_set()
    assert _run(agent, guest, ["echo", "still"])[0] == b"still\n"
    assert guest.channel.accepted == 1


def test_close_ends_every_connection_and_its_reader(guest: Guest, tmp_path: Path) -> None:
    # bangerd's exit waits for threads named banger-…: a kept reader would hold it.
    agent = _agent()
    _ready(agent, guest, tmp_path)
    agent.close()
    assert agent.sessions.channels() == []
    guest.agent(0).join()
    assert not [t for t in threading.enumerate() if t.name.startswith("banger-agent-reader")
                and (t.join(5) or t.is_alive())]


def test_a_request_that_never_left_goes_again_on_a_new_connection(
        guest: Guest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from banger.host.agent_records import AgentDisconnected
    from banger.host.agent_sessions import Session
    agent = _agent()
    _ready(agent, guest, tmp_path)
    kept = agent.sessions.get(guest.path, 5)
    # Broken the way a vanished agent's connection is before this side's reader noticed:
    # the session still looks usable, and nothing of the next request can leave.
    monkeypatch.setattr(Session, "usable", lambda self: not self.released)
    kept.conn._fail(AgentDisconnected("the guest agent closed the connection"))
    assert _run(agent, guest, ["echo", "again"])[0] == b"again\n"
    assert guest.channel.accepted == 2
    assert agent.sessions.get(guest.path, 5) is not kept


def test_a_released_session_is_not_reconnected_by_a_late_request(
        guest: Guest, tmp_path: Path) -> None:
    # The VM is being stopped or deleted: its runtime release closed the kept connection
    # while a request held it. That request fails; nothing reconnects behind the stop.
    agent = _agent()
    _ready(agent, guest, tmp_path)

    def late(session: object) -> object:
        agent.sessions.release(guest.path)
        return session.conn.stats(5)  # type: ignore[attr-defined]

    with pytest.raises(Exception, match="closed by banger"):
        agent.sessions.call(guest.path, 5, late)  # type: ignore[arg-type]
    assert guest.channel.accepted == 1
    assert agent.sessions.channels() == []
