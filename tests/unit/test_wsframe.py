"""The client's RFC 6455 framer (banger.client.wsframe) against wsproto's server side,
the one bangerd runs under uvicorn: round trips both ways (hypothesis: any payload, any
fragmentation, any split of the bytes), and hostile server frames, each refused with a
ProtocolError before an oversized payload is waited for."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    Request,
    TextMessage,
)

from banger.client import wsframe

CAP = 1 << 16


def _server() -> tuple[WSConnection, str, bytes]:
    """A wsproto server that accepted our upgrade request; (it, our key, its 101)."""
    key = wsframe.new_key()
    server = WSConnection(ConnectionType.SERVER)
    server.receive_data(wsframe.upgrade_request("/v1/vms/box/exec", key))
    assert isinstance(next(server.events()), Request)
    return server, key, server.send(AcceptConnection())


def _frame(opcode: int, payload: bytes, *, fin: bool = True, masked: bool = False,
           rsv: int = 0, length: int | None = None) -> bytes:
    """A server frame as a hostile server may write it."""
    n = len(payload) if length is None else length
    head = bytes(((0x80 if fin else 0) | rsv | opcode,))
    m = 0x80 if masked else 0
    if n < 126:
        head += bytes((m | n,))
    elif n < 1 << 16:
        head += bytes((m | 126,)) + n.to_bytes(2, "big")
    else:
        head += bytes((m | 127,)) + n.to_bytes(8, "big")
    return head + (b"\0\0\0\0" if masked else b"") + payload


def test_the_handshake_with_wsproto_and_its_accept_check() -> None:
    server, key, answer = _server()
    parsed = wsframe.parse_head(answer)
    assert parsed is not None
    head, rest = parsed
    assert head.status == 101 and rest == b""
    wsframe.check_accept(head, key)
    with pytest.raises(wsframe.ProtocolError, match="Accept does not match"):
        wsframe.check_accept(head, wsframe.new_key())
    assert wsframe.parse_head(answer[:-1]) is None  # incomplete


def test_answer_heads_that_are_refused() -> None:
    with pytest.raises(wsframe.ProtocolError, match="longer than"):
        wsframe.parse_head(b"HTTP/1.1 101 x\r\n" + b"X: y\r\n" * 4000)
    with pytest.raises(wsframe.ProtocolError, match="longer than"):
        wsframe.parse_head(b"H" * (wsframe.MAX_HEAD + 1))  # no end in sight
    with pytest.raises(wsframe.ProtocolError, match="not an HTTP"):
        wsframe.parse_head(b"SSH-2.0-x\r\n\r\n")
    with pytest.raises(wsframe.ProtocolError, match="malformed header"):
        wsframe.parse_head(b"HTTP/1.1 101 ok\r\nnocolon\r\n\r\n")
    head, _ = wsframe.parse_head(b"HTTP/1.1 101 ok\r\nUpgrade: h2c\r\n\r\n") or (None, b"")
    assert head is not None
    with pytest.raises(wsframe.ProtocolError, match="does not upgrade"):
        wsframe.check_accept(head, "k")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=70000), st.text(max_size=300)), max_size=4),
       st.data())
def test_client_frames_round_trip_through_wsproto(msgs: list[bytes | str],
                                                  data: st.DataObject) -> None:
    server, _key, _ = _server()
    wire = b"".join(wsframe.encode(wsframe.OP_TEXT, m.encode()) if isinstance(m, str)
                    else wsframe.encode(wsframe.OP_BINARY, m) for m in msgs)
    got: list[bytes | str] = []
    parts: list[bytes | str] = []
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=5)))
    for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        server.receive_data(wire[a:b])
        for ev in server.events():
            assert isinstance(ev, Message)
            parts.append(ev.data)
            if ev.message_finished:
                got.append("".join(parts) if isinstance(ev, TextMessage)  # type: ignore[arg-type]
                           else b"".join(parts))  # type: ignore[arg-type]
                parts = []
    assert got == msgs


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.binary(max_size=5000), st.integers(1, 4)), max_size=5),
       st.data())
def test_server_messages_in_any_fragments_and_splits(msgs: list[tuple[bytes, int]],
                                                     data: st.DataObject) -> None:
    wire = b""
    for payload, pieces in msgs:
        step = max(1, len(payload) // pieces)
        chunks = [payload[i:i + step] for i in range(0, len(payload), step)] or [b""]
        for i, chunk in enumerate(chunks):
            op = wsframe.OP_BINARY if i == 0 else wsframe.OP_CONT
            wire += _frame(op, chunk, fin=i == len(chunks) - 1)
            if i == 0:
                wire += _frame(wsframe.OP_PING, b"p")  # control frames may interleave
    decoder = wsframe.Decoder(CAP)
    got: list[tuple[int, bytes]] = []
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=8)))
    for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        got += decoder.feed(wire[a:b])
    assert [p for op, p in got if op == wsframe.OP_BINARY] == [p for p, _ in msgs]
    assert [p for op, p in got if op == wsframe.OP_PING] == [b"p"] * len(msgs)


def test_wsproto_server_frames_decode() -> None:
    server, _key, _ = _server()
    wire = (server.send(BytesMessage(data=b"\x01" + os.urandom(70000)))
            + server.send(TextMessage(data='{"type": "exit"}'))
            + server.send(Ping(payload=b"hi"))
            + server.send(CloseConnection(code=1011)))
    got = wsframe.Decoder(1 << 20).feed(wire)
    assert [op for op, _ in got] == [wsframe.OP_BINARY, wsframe.OP_TEXT, wsframe.OP_PING,
                                     wsframe.OP_CLOSE]
    assert len(got[0][1]) == 70001 and got[1][1] == b'{"type": "exit"}'
    assert got[3][1][:2] == (1011).to_bytes(2, "big")


@pytest.mark.parametrize(("wire", "why"), [
    (_frame(2, b"", length=1 << 62)[:10], "longer than"),  # only the header: refused now
    (_frame(2, b"", length=CAP + 1)[:10], "longer than"),
    (_frame(2, b"x", masked=True), "masked frame"),
    (_frame(2, b"x", rsv=0x40), "reserved bits"),
    (_frame(3, b"x"), "unknown opcode"),
    (_frame(0xB, b"x"), "unknown opcode"),
    (_frame(9, b"x", fin=False), "fragmented control"),
    (_frame(9, b"x" * 126), "control frame of 126"),
    (_frame(0, b"x"), "no message under way"),
    (_frame(2, b"x", fin=False) + _frame(1, b"y"), "before the last one's final"),
    (_frame(2, b"x" * 40000, fin=False) + _frame(0, b"x" * 30000)[:4], "longer than"),
])
def test_hostile_server_frames_are_refused(wire: bytes, why: str) -> None:
    with pytest.raises(wsframe.ProtocolError, match=why):
        wsframe.Decoder(CAP).feed(wire)


def test_a_partial_header_waits_for_more() -> None:
    d = wsframe.Decoder(CAP)
    frame = _frame(2, b"z" * 300)
    assert d.feed(frame[:1]) == [] and d.feed(frame[1:3]) == [] and d.feed(frame[3:50]) == []
    assert d.feed(frame[50:]) == [(2, b"z" * 300)]


@given(st.binary(max_size=2000), st.binary(min_size=4, max_size=4))
def test_mask_is_the_rfc_xor(data: bytes, key: bytes) -> None:
    assert wsframe.mask(data, key) == bytes(b ^ key[i % 4] for i, b in enumerate(data))
