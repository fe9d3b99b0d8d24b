"""The wire format of banger's guest agent protocol, v1 (docs/agent-protocol.md).

Pure and stdlib only: the kinds and field tags, framing (:func:`frame`), field bodies
(:func:`fields`, :func:`parse_fields`, :func:`as_int`, :func:`as_str`) and an incremental
:class:`Decoder`. Nothing here does I/O; :mod:`banger.host.agent_client` does.

Everything a guest sends is untrusted: every parser here raises :class:`ProtocolError`
naming the problem, never anything else, and the decoder never holds more than one
frame of the largest size the protocol allows.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum

PROTOCOL = 1
MAX_BODY = 65536
# A frame's length field counts kind (1) + chan (4) + body.
_HEADER = struct.Struct(">IBI")
_LEN = struct.Struct(">I")
_MIN_LENGTH = 5
MAX_LENGTH = _MIN_LENGTH + MAX_BODY
MAX_CHAN = 0xFFFF_FFFF
_FIELD = struct.Struct(">BI")
_I64 = struct.Struct(">q")


class ProtocolError(Exception):
    """The byte stream or a frame's body breaks the protocol."""


class Kind(IntEnum):
    """A frame's kind byte. 0x01..0x0f host -> guest (but HELLO), 0x10.. guest -> host."""

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
    HELLO_REQ = 0x0C
    LISTENING_REQ = 0x0D
    CREDIT = 0x0E  # both ways
    FILE_PUT = 0x0F
    STARTED = 0x10
    STDOUT = 0x11
    STDERR = 0x12
    EXIT = 0x13
    EXEC_ERROR = 0x14
    STATS = 0x20
    PONG = 0x21
    DONE = 0x22
    ERROR = 0x23
    LISTENING = 0x24
    FILE_GET = 0x30
    DATA = 0x31  # both ways: a FILE_PUT's or a FILE_GET's tar bytes
    DATA_EOF = 0x32  # both ways: the end of them


# Field tags are per kind: the same number means different things in different kinds.
class HelloTag(IntEnum):
    PROTOCOL = 1
    VERSION = 2
    BOOT_ID = 3
    TOKEN = 4  # only in the HELLO answering a HELLO_REQ: its TOKEN
    FEATURE = 5  # repeated: what this agent does beyond protocol 1's first tables


class HelloReqTag(IntEnum):
    TOKEN = 1


class ExecTag(IntEnum):
    ARG = 1
    ENV = 2
    CWD = 3
    PTY_ROWS = 4
    PTY_COLS = 5
    WINDOW = 6  # the output credit granted at start: flow control for this exec


class CreditTag(IntEnum):
    BYTES = 1


class ListeningTag(IntEnum):
    SOCKET = 1  # repeated: proto<TAB>address<TAB>port[<TAB>pid<TAB>command]
    TRUNCATED = 2  # i64 1: more sockets than one frame holds


class FilePutTag(IntEnum):
    DEST = 1


class FileGetTag(IntEnum):
    PATH = 1
    WINDOW = 2


class StartedTag(IntEnum):
    PID = 1
    STDIN_WINDOW = 2  # with flow control: the stdin credit granted at start


class ExitTag(IntEnum):
    CODE = 1
    SIGNAL = 2


class MessageTag(IntEnum):
    """The one field of EXEC_ERROR and ERROR."""

    MESSAGE = 1


class SignalTag(IntEnum):
    SIGNO = 1


class ResizeTag(IntEnum):
    ROWS = 1
    COLS = 2


class TimeSetTag(IntEnum):
    UNIX_NS = 1


class StatsTag(IntEnum):
    UPTIME_MS = 1
    LOAD1_X100 = 2
    LOAD5_X100 = 3
    LOAD15_X100 = 4
    MEM_TOTAL_KIB = 5
    MEM_AVAILABLE_KIB = 6
    CPU_USER_TICKS = 7
    CPU_SYSTEM_TICKS = 8
    CPU_IDLE_TICKS = 9
    NCPU = 10
    FS = 20


# Kinds whose body is raw bytes rather than fields.
DATA_KINDS = frozenset({Kind.STDIN, Kind.STDOUT, Kind.STDERR, Kind.DATA})

# HELLO's FEATURE values this host uses (an agent without one gets protocol 1's first form).
FEATURE_CREDIT = "credit"
FEATURE_LISTENING = "listening"
FEATURE_FILES = "files"


def kind_name(kind: int) -> str:
    """``EXIT`` for a known kind, ``0x7f`` for another (for error messages)."""
    try:
        return Kind(kind).name
    except ValueError:
        return f"0x{kind:02x}"


@dataclass(frozen=True)
class Frame:
    kind: int
    chan: int
    body: bytes


def frame(kind: int, chan: int, body: bytes = b"") -> bytes:
    """One frame on the wire. A body over :data:`MAX_BODY` is refused: split data first."""
    if len(body) > MAX_BODY:
        raise ValueError(f"a frame body of {len(body)} bytes is over the cap of {MAX_BODY}")
    if not 0 <= chan <= MAX_CHAN:
        raise ValueError(f"chan {chan} is not a u32")
    return _HEADER.pack(_MIN_LENGTH + len(body), kind, chan) + body


def fields(items: Iterable[tuple[int, bytes | str | int]]) -> bytes:
    """A FIELDS body: ints as i64 big-endian, str as UTF-8, bytes as they are."""
    out = bytearray()
    for tag, value in items:
        if isinstance(value, int):
            data = _I64.pack(value)
        elif isinstance(value, str):
            data = value.encode()
        else:
            data = bytes(value)
        out += _FIELD.pack(tag, len(data))
        out += data
    return bytes(out)


def parse_fields(body: bytes) -> list[tuple[int, bytes]]:
    """The (tag, value) pairs of a FIELDS body, in order; a truncated field is an error."""
    out: list[tuple[int, bytes]] = []
    pos, end = 0, len(body)
    while pos < end:
        if end - pos < _FIELD.size:
            raise ProtocolError(f"truncated field header at byte {pos} of {end}")
        tag, size = _FIELD.unpack_from(body, pos)
        pos += _FIELD.size
        if size > end - pos:
            raise ProtocolError(f"field {tag} at byte {pos - _FIELD.size} claims {size} bytes "
                                f"but only {end - pos} remain")
        out.append((tag, bytes(body[pos:pos + size])))
        pos += size
    return out


def as_int(b: bytes) -> int:
    """An integer field: exactly 8 bytes, big-endian signed."""
    if len(b) != _I64.size:
        raise ProtocolError(f"an integer field has {len(b)} bytes (expected 8)")
    value: int = _I64.unpack(b)[0]
    return value


def as_str(b: bytes) -> str:
    """A string field: UTF-8 with no NUL."""
    try:
        text = b.decode()
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"a string field is not UTF-8 ({exc.reason} at byte {exc.start})"
                            ) from None
    if "\0" in text:
        raise ProtocolError("a string field contains a NUL byte")
    return text


class Decoder:
    """Frames out of a byte stream, fed in pieces of any size.

    Any split of the stream gives the same frames. A length outside 5..MAX_LENGTH raises
    :class:`ProtocolError` (the stream cannot be trusted after that: every later feed
    raises it again). Between calls it holds less than one largest frame.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held back: the start of a frame not complete yet."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame]:
        if self._error is not None:
            raise self._error
        self._buf += data
        buf, pos, out = self._buf, 0, []
        while len(buf) - pos >= _LEN.size:
            (length,) = _LEN.unpack_from(buf, pos)
            if not _MIN_LENGTH <= length <= MAX_LENGTH:
                self._buf = bytearray()
                self._error = ProtocolError(
                    f"agent sent a frame of {length} bytes (cap {MAX_LENGTH})")
                raise self._error
            if len(buf) - pos - _LEN.size < length:
                break
            _, kind, chan = _HEADER.unpack_from(buf, pos)
            start = pos + _HEADER.size
            out.append(Frame(kind, chan, bytes(buf[start:pos + _LEN.size + length])))
            pos += _LEN.size + length
        del buf[:pos]
        return out
