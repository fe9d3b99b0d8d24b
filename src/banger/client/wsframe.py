"""The client's side of RFC 6455 (WebSocket), stdlib only: the upgrade request and the
check of its answer, masked frames out, and a decoder for the server's frames in (text,
binary, close, ping, pong; fragmented messages reassembled).

Why not wsproto, as the daemon (uvicorn) uses: importing it costs the CLI ~39 ms per
`vm exec` here (wsproto with h11, measured with ``python -X importtime``), against a
goal of 0.1 s for the whole command; this module loads in under 1 ms. The client's side
is the small one: no extensions, no subprotocols, no server role. The daemon keeps
uvicorn's wsproto, the real counterpart the tests run this against
(tests/integration/test_exec_api.py, tests/unit/test_wsframe.py).

The server is checked like any peer that could misbehave: a response head or a message
larger than its cap, a masked or reserved-bit frame, an unknown opcode, a control frame
that is fragmented or too long, a continuation out of place: each is a
:class:`ProtocolError`, raised before a byte of an oversized payload is waited for.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Iterator
from typing import NamedTuple

OP_CONT, OP_TEXT, OP_BINARY = 0x0, 0x1, 0x2
OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA
_DATA = (OP_TEXT, OP_BINARY)
_CONTROL = (OP_CLOSE, OP_PING, OP_PONG)
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# The upgrade's answer: a status line and a few headers.
MAX_HEAD = 16 << 10
MAX_CONTROL = 125


class ProtocolError(Exception):
    """The server broke RFC 6455 (or sent more than a cap allows)."""


def new_key() -> str:
    return base64.b64encode(os.urandom(16)).decode()


def accept_for(key: str) -> str:
    """The Sec-WebSocket-Accept a server must answer ``key`` with."""
    return base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()


def upgrade_request(target: str, key: str, host: str = "bangerd") -> bytes:
    return (f"GET {target} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n").encode("ascii")


class Head(NamedTuple):
    """An HTTP response's status and headers (names lower-cased)."""

    status: int
    headers: dict[str, str]


def parse_head(buf: bytes | bytearray) -> tuple[Head, bytes] | None:
    """The response head at the start of ``buf`` and the bytes after it; None while it
    is incomplete. ProtocolError when it is malformed or longer than MAX_HEAD."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > MAX_HEAD:
            raise ProtocolError(f"the server's answer head is longer than {MAX_HEAD} bytes")
        return None
    if end > MAX_HEAD:
        raise ProtocolError(f"the server's answer head is longer than {MAX_HEAD} bytes")
    lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ProtocolError(f"not an HTTP/1.1 answer: {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise ProtocolError(f"a malformed header line: {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    return Head(int(parts[1]), headers), bytes(buf[end + 4:])


def check_accept(head: Head, key: str) -> None:
    """A 101 answer must upgrade to a WebSocket and prove it read ``key``."""
    if head.headers.get("upgrade", "").lower() != "websocket":
        raise ProtocolError("the server's 101 does not upgrade to websocket")
    if head.headers.get("sec-websocket-accept") != accept_for(key):
        raise ProtocolError("the server's Sec-WebSocket-Accept does not match the key")
    if head.headers.get("sec-websocket-extensions"):
        raise ProtocolError("the server chose an extension this client did not offer")


def mask(data: bytes, key: bytes) -> bytes:
    """``data`` XOR the repeated 4-byte ``key``, at C speed (one big-int XOR)."""
    n = len(data)
    if not n:
        return b""
    keys = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(keys, "little")).to_bytes(
        n, "little")


def encode(opcode: int, payload: bytes, key: bytes | None = None) -> bytes:
    """One final, masked frame (a client masks every frame it sends)."""
    key = os.urandom(4) if key is None else key
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 1 << 16:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + key + mask(payload, key)


def close_payload(code: int) -> bytes:
    return code.to_bytes(2, "big")


class Decoder:
    """The server's frames, fed as they arrive; complete messages out.

    :meth:`feed` takes bytes and returns (opcode, payload) for each message they
    complete: a data message (OP_TEXT or OP_BINARY, fragments joined) or a control frame
    (OP_CLOSE, OP_PING, OP_PONG). No message longer than ``max_message`` is buffered.
    """

    def __init__(self, max_message: int) -> None:
        self.max_message = max_message
        self._buf = bytearray()
        self._op: int | None = None  # the fragmented message under way, if any
        self._parts: list[bytes] = []
        self._size = 0

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self._buf += data
        return list(self._frames())

    def _frames(self) -> Iterator[tuple[int, bytes]]:
        buf, pos = self._buf, 0
        try:
            while True:
                frame = self._header(buf, pos)
                if frame is None:
                    return
                fin, opcode, start, length = frame
                if len(buf) < start + length:
                    return
                payload = bytes(buf[start:start + length])
                pos = start + length
                message = self._message(fin, opcode, payload)
                if message is not None:
                    yield message
        finally:
            del buf[:pos]

    def _header(self, buf: bytearray, pos: int) -> tuple[bool, int, int, int] | None:
        if len(buf) - pos < 2:
            return None
        b0, b1 = buf[pos], buf[pos + 1]
        fin, opcode = bool(b0 & 0x80), b0 & 0x0F
        if b0 & 0x70:
            raise ProtocolError("a frame with reserved bits set (no extension was agreed)")
        if b1 & 0x80:
            raise ProtocolError("a masked frame from the server")
        if opcode not in _DATA and opcode not in _CONTROL and opcode != OP_CONT:
            raise ProtocolError(f"a frame with the unknown opcode {opcode:#x}")
        length, start = b1 & 0x7F, pos + 2
        if length == 126:
            if len(buf) - pos < 4:
                return None
            length, start = int.from_bytes(buf[pos + 2:pos + 4], "big"), pos + 4
        elif length == 127:
            if len(buf) - pos < 10:
                return None
            length, start = int.from_bytes(buf[pos + 2:pos + 10], "big"), pos + 10
        if opcode in _CONTROL:
            if not fin:
                raise ProtocolError("a fragmented control frame")
            if length > MAX_CONTROL:
                raise ProtocolError(f"a control frame of {length} bytes (at most "
                                    f"{MAX_CONTROL})")
        elif self._size + length > self.max_message:
            raise ProtocolError(f"a message longer than {self.max_message} bytes")
        return fin, opcode, start, length

    def _message(self, fin: bool, opcode: int, payload: bytes) -> tuple[int, bytes] | None:
        if opcode in _CONTROL:
            return opcode, payload
        if opcode == OP_CONT:
            if self._op is None:
                raise ProtocolError("a continuation frame with no message under way")
        elif self._op is not None:
            raise ProtocolError("a new message before the last one's final fragment")
        else:
            self._op = opcode
        if fin and not self._parts:  # the common case: one frame, no copy
            op, self._op = self._op, None
            return op, payload
        self._parts.append(payload)
        self._size += len(payload)
        if not fin:
            return None
        op, parts = self._op, self._parts
        self._op, self._parts, self._size = None, [], 0
        return op, b"".join(parts)
