"""The byte-level codec of the banger agent protocol v1 (docs/agent-protocol.md).

Frames are ``u32 length | u8 kind | u32 chan | body`` (big-endian, length counts the
kind, chan and body); non-data bodies are FIELDS: ``u8 tag | u32 len | bytes``. This module
only turns bytes into frames and back; it never trusts a length the peer sent.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable
from dataclasses import dataclass

MAX_BODY = 65536
_HEAD = struct.Struct(">IBI")
_FIELD = struct.Struct(">BI")
_LEN = struct.Struct(">I")
_MIN_LEN = 5
_MAX_LEN = _MIN_LEN + MAX_BODY


class Kind(enum.IntEnum):
    HELLO = 0x01
    PING = 0x02
    EXEC = 0x03
    STDIN = 0x04
    STDIN_EOF = 0x05
    SIGNAL = 0x06
    RESIZE = 0x07
    STATS_REQ = 0x08
    SYNC = 0x09
    POWEROFF = 0x0A
    TIME_SET = 0x0B
    STARTED = 0x10
    STDOUT = 0x11
    STDERR = 0x12
    EXIT = 0x13
    EXEC_ERROR = 0x14
    STATS = 0x20
    PONG = 0x21
    DONE = 0x22
    ERROR = 0x23


class ProtocolError(Exception):
    """The peer sent bytes that are not a valid frame or field list."""


@dataclass(frozen=True)
class Frame:
    kind: int
    chan: int
    body: bytes


def frame(kind: int, chan: int, body: bytes = b"") -> bytes:
    """One encoded frame; a body over MAX_BODY is a caller's bug (split data first)."""
    if len(body) > MAX_BODY:
        raise ValueError(f"frame body of {len(body)} bytes exceeds MAX_BODY ({MAX_BODY})")
    return _HEAD.pack(_MIN_LEN + len(body), kind, chan) + body


def fields(items: Iterable[tuple[int, bytes | str | int]]) -> bytes:
    """Encode (tag, value) pairs: str as UTF-8, int as an 8-byte big-endian i64."""
    out = bytearray()
    for tag, value in items:
        if isinstance(value, int):
            data = value.to_bytes(8, "big", signed=True)
        elif isinstance(value, str):
            data = value.encode()
        else:
            data = value
        out += _FIELD.pack(tag, len(data)) + data
    return bytes(out)


def parse_fields(body: bytes) -> list[tuple[int, bytes]]:
    """Decode a FIELDS body; a truncated field raises ProtocolError."""
    out: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(body):
        if len(body) - pos < _FIELD.size:
            raise ProtocolError(f"truncated field header at byte {pos}")
        tag, size = _FIELD.unpack_from(body, pos)
        pos += _FIELD.size
        if size > len(body) - pos:
            raise ProtocolError(f"field {tag} claims {size} bytes, {len(body) - pos} left")
        out.append((tag, bytes(body[pos:pos + size])))
        pos += size
    return out


def as_int(b: bytes) -> int:
    """An integer field: exactly 8 bytes, big-endian signed."""
    if len(b) != 8:
        raise ProtocolError(f"integer field of {len(b)} bytes (must be 8)")
    return int.from_bytes(b, "big", signed=True)


class Decoder:
    """Incremental: feed bytes as they arrive, get the complete frames back."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        frames: list[Frame] = []
        while len(self._buf) >= _LEN.size:
            (length,) = _LEN.unpack_from(self._buf)
            if not _MIN_LEN <= length <= _MAX_LEN:
                raise ProtocolError(f"agent sent a frame of {length} bytes (cap {_MAX_LEN})")
            if len(self._buf) < _LEN.size + length:
                break
            _, kind, chan = _HEAD.unpack_from(self._buf)
            frames.append(Frame(kind, chan, bytes(self._buf[_HEAD.size:_LEN.size + length])))
            del self._buf[:_LEN.size + length]
        return frames
