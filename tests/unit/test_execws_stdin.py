"""The exec client's stdin window (client/execws.py): stdin goes out within the
daemon's window, acknowledged as the guest reads it; a signal never waits behind it; EOF
comes after all of it; an older daemon (no window) gets stdin as it comes."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest

from banger.client import execws, wsframe


def _unmask(wire: bytes) -> list[tuple[int, bytes]]:
    """The client's (masked) frames, decoded as a server would."""
    out, pos = [], 0
    while pos < len(wire):
        opcode, n = wire[pos] & 0x0F, wire[pos + 1] & 0x7F
        pos += 2
        if n == 126:
            n, pos = int.from_bytes(wire[pos:pos + 2], "big"), pos + 2
        elif n == 127:
            n, pos = int.from_bytes(wire[pos:pos + 8], "big"), pos + 8
        key, pos = wire[pos:pos + 4], pos + 4
        out.append((opcode, wsframe.mask(wire[pos:pos + n], key)))
        pos += n
    return out


def _read(s: execws.ExecSession, peer: socket.socket) -> list[tuple[int, bytes]]:
    """What the client sends (flushing it as the socket takes more)."""
    wire = b""
    peer.settimeout(0.2)
    try:
        while True:
            wire += peer.recv(1 << 20)
            s.flush()
    except TimeoutError:
        pass
    return _unmask(wire)


def _server_text(msg: dict[str, object]) -> bytes:
    """A server's text frame (unmasked; short)."""
    data = json.dumps(msg).encode()
    assert len(data) < 126
    return bytes((0x80 | wsframe.OP_TEXT, len(data))) + data


@pytest.fixture
def pair() -> Iterator[tuple[execws.ExecSession, socket.socket]]:
    a, b = socket.socketpair()
    s = execws.ExecSession(a, wsframe.Decoder(execws.MAX_MESSAGE))
    yield s, b
    a.close()
    b.close()


def _start(s: execws.ExecSession, peer: socket.socket, window: int | None) -> None:
    msg: dict[str, object] = {"type": "started", "vm": {"name": "box"}}
    if window is not None:
        msg["stdin_window"] = window
    peer.sendall(_server_text(msg))
    execws._wait_started(s)
    s.sock.setblocking(False)


def test_stdin_stays_in_the_window_and_a_signal_goes_first(
        pair: tuple[execws.ExecSession, socket.socket]) -> None:
    s, peer = pair
    _start(s, peer, 100_000)
    s.send_stdin(bytes(300_000))
    s.send_eof()
    s.signal(2)
    frames = _read(s, peer)
    assert sum(len(p) - 1 for op, p in frames if op == wsframe.OP_BINARY) == 100_000
    assert frames[-1] == (wsframe.OP_TEXT, b'{"type": "signal", "signal": 2}')
    assert s.pending() == 200_000 and not s.wants_write()
    ack = _server_text({"type": "stdin_ack", "bytes": 100_000})
    peer.sendall(ack)
    assert list(s.receive()) == []
    frames = _read(s, peer)
    assert sum(len(p) - 1 for op, p in frames if op == wsframe.OP_BINARY) == 100_000
    peer.sendall(ack * 2)
    list(s.receive())
    frames = _read(s, peer)
    assert frames[-1] == (wsframe.OP_TEXT, b'{"type": "eof"}'), "EOF after all stdin"
    assert sum(len(p) - 1 for op, p in frames if op == wsframe.OP_BINARY) == 100_000
    assert s.pending() == 0


def test_an_older_daemon_gets_stdin_as_it_comes(
        pair: tuple[execws.ExecSession, socket.socket]) -> None:
    s, peer = pair
    _start(s, peer, None)
    s.send_stdin(bytes(300_000))
    s.send_eof()
    frames = _read(s, peer)
    assert sum(len(p) - 1 for op, p in frames if op == wsframe.OP_BINARY) == 300_000
    assert frames[-1] == (wsframe.OP_TEXT, b'{"type": "eof"}')
