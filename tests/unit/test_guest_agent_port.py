"""LocalAgent.wait_hello (the agent port's readiness) against a guest played over a real
Unix socket, as the VMM serves the agent's channel: a HELLO is readiness; a dead VMM, a
timeout or another protocol end the wait with a clear error; a channel not there yet or
dropped is retried."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from banger.host.agent_proto import Decoder, Kind, as_int, fields, frame, parse_fields
from banger.host.guest_agent import AgentNotReady, LocalAgent
from tests.fake_agent import BOOT_ID, hello_body

pytestmark = pytest.mark.timeout(30)


class Channel:
    """The VMM's end of the channel: accepts connections; each gets ``answer(conn)``."""

    def __init__(self, path: Path, answer: Callable[[socket.socket], None]) -> None:
        self.path, self.answer = path, answer
        self.accepted = 0
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(4)
        self.sock.settimeout(0.1)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            self.answer(conn)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def serial(tmp_path: Path) -> Path:
    log = tmp_path / "serial.log"
    log.write_text("banger: [1.20s] init started\nbanger: [1.30s] last words\n")
    return log


def _hello(conn: socket.socket, body: bytes | None = None) -> None:
    """Answer the host's HELLO_REQ (the agent's only HELLO when it missed the previous
    host's hang-up), echoing its TOKEN."""
    conn.settimeout(5)
    req = Decoder().feed(conn.recv(1 << 16))[0]
    assert (req.kind, req.chan) == (Kind.HELLO_REQ, 0)
    token = fields([(4, as_int(dict(parse_fields(req.body))[1]))])
    conn.sendall(frame(Kind.HELLO, 0, (body or hello_body()) + token))


def test_hello_is_readiness(tmp_path: Path, serial: Path) -> None:
    kept: list[socket.socket] = []
    ch = Channel(tmp_path / "agent.sock", lambda c: (kept.append(c), _hello(c)))
    try:
        hello = _agent().wait_hello(channel=ch.path, timeout=5, serial_log=serial,
                                        alive=lambda: True)
    finally:
        ch.close()
    assert hello.boot_id == BOOT_ID and hello.version == "0.1.0-fake"


def test_a_guest_boot_id_is_made_printable(tmp_path: Path, serial: Path) -> None:
    ch = Channel(tmp_path / "agent.sock",
                 lambda c: _hello(c, hello_body(boot_id="x\x1b[2J" + "y" * 500)))
    try:
        hello = _agent().wait_hello(channel=ch.path, timeout=5, serial_log=serial,
                                        alive=lambda: True)
    finally:
        ch.close()
    assert "\x1b" not in hello.boot_id and len(hello.boot_id) <= 70


def test_channel_not_there_yet_is_retried(tmp_path: Path, serial: Path) -> None:
    path = tmp_path / "agent.sock"
    made: list[Channel] = []
    timer = threading.Timer(0.4, lambda: made.append(Channel(path, _hello)))
    timer.start()
    try:
        hello = _agent().wait_hello(channel=path, timeout=10, serial_log=serial,
                                        alive=lambda: True)
    finally:
        timer.join()
        for ch in made:
            ch.close()
    assert hello.boot_id == BOOT_ID


def test_a_dropped_channel_is_reconnected(tmp_path: Path, serial: Path) -> None:
    # The first connection closes without a word (the agent restarted): the second says
    # HELLO.
    def answer(conn: socket.socket) -> None:
        if ch.accepted == 1:
            conn.close()
        else:
            _hello(conn)

    ch = Channel(tmp_path / "agent.sock", answer)
    try:
        hello = _agent().wait_hello(channel=ch.path, timeout=10, serial_log=serial,
                                        alive=lambda: True)
    finally:
        ch.close()
    assert hello.boot_id == BOOT_ID and ch.accepted == 2


def test_dead_vmm_ends_the_wait_at_once_with_the_serial_log(tmp_path: Path,
                                                            serial: Path) -> None:
    kept: list[socket.socket] = []
    ch = Channel(tmp_path / "agent.sock", kept.append)  # connected, silent
    polls: list[float] = []

    def alive() -> bool:
        polls.append(time.monotonic())
        return len(polls) < 4

    started = time.monotonic()
    try:
        with pytest.raises(AgentNotReady, match="exited while waiting") as info:
            _agent().wait_hello(channel=ch.path, timeout=60, serial_log=serial,
                                    alive=alive)
    finally:
        ch.close()
    assert time.monotonic() - started < 5
    assert "last words" in str(info.value) and str(serial) in str(info.value)


def test_a_raising_alive_ends_the_wait(tmp_path: Path, serial: Path) -> None:
    class Cancelled(Exception):
        pass

    def alive() -> bool:
        raise Cancelled("cancelled by the user")

    with pytest.raises(Cancelled):
        _agent().wait_hello(channel=tmp_path / "none.sock", timeout=60,
                                serial_log=serial, alive=alive)


def test_timeout_names_the_channel_and_the_fix(tmp_path: Path, serial: Path) -> None:
    kept: list[socket.socket] = []
    ch = Channel(tmp_path / "agent.sock", kept.append)
    try:
        with pytest.raises(AgentNotReady, match="did not say HELLO within 1 s") as info:
            _agent().wait_hello(channel=ch.path, timeout=1, serial_log=serial,
                                    alive=lambda: True)
    finally:
        ch.close()
    assert "banger-agent" in str(info.value) and "last words" in str(info.value)


def test_another_protocol_fails_at_once(tmp_path: Path, serial: Path) -> None:
    ch = Channel(tmp_path / "agent.sock", lambda c: _hello(c, hello_body(protocol=2)))
    started = time.monotonic()
    try:
        with pytest.raises(AgentNotReady, match="protocol 2"):
            _agent().wait_hello(channel=ch.path, timeout=60, serial_log=serial,
                                    alive=lambda: True)
    finally:
        ch.close()
    assert time.monotonic() - started < 5


_AGENTS: list[LocalAgent] = []


def _agent() -> LocalAgent:
    """A LocalAgent whose kept connections the leak check closes first (as the VM's
    runtime release does)."""
    _AGENTS.append(LocalAgent())
    return _AGENTS[-1]


@pytest.fixture(autouse=True)
def no_reader_left() -> Iterator[None]:
    yield
    while _AGENTS:
        agent = _AGENTS.pop()
        for channel in agent.sessions.channels():
            agent.release(channel=channel)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(
            t.name.startswith("banger-agent-reader") for t in threading.enumerate()):
        time.sleep(0.01)
    assert not any(t.name.startswith("banger-agent-reader") for t in threading.enumerate())
