"""The agent protocol's wire format: framing, fields, and a decoder fuzzed with hypothesis."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from banger.host.agent_proto import (
    MAX_BODY,
    MAX_LENGTH,
    Decoder,
    Frame,
    Kind,
    ProtocolError,
    as_int,
    as_str,
    fields,
    frame,
    parse_fields,
)

SPEC_KINDS = {
    "HELLO": 0x01, "PING": 0x02, "EXEC": 0x03, "STDIN": 0x04, "STDIN_EOF": 0x05,
    "SIGNAL": 0x06, "RESIZE": 0x07, "STATS_REQ": 0x08, "SYNC": 0x09, "POWEROFF": 0x0A,
    "TIME_SET": 0x0B, "HELLO_REQ": 0x0C, "LISTENING_REQ": 0x0D, "CREDIT": 0x0E,
    "FILE_PUT": 0x0F, "STARTED": 0x10, "STDOUT": 0x11, "STDERR": 0x12,
    "EXIT": 0x13, "EXEC_ERROR": 0x14, "STATS": 0x20, "PONG": 0x21, "DONE": 0x22, "ERROR": 0x23,
    "LISTENING": 0x24, "FILE_GET": 0x30, "DATA": 0x31, "DATA_EOF": 0x32,
}

frames_st = st.builds(Frame, st.integers(0, 255), st.integers(0, 2**32 - 1),
                      st.binary(max_size=300) | st.binary(min_size=MAX_BODY - 2,
                                                          max_size=MAX_BODY))
field_values = st.binary(max_size=64) | st.text(max_size=32) | st.integers(-2**63, 2**63 - 1)


def test_kinds_are_the_specs() -> None:
    assert {k.name: k.value for k in Kind} == SPEC_KINDS


def test_frame_layout() -> None:
    assert frame(Kind.PING, 7) == b"\x00\x00\x00\x05\x02\x00\x00\x00\x07"
    assert frame(Kind.STDOUT, 0x01020304, b"hi") == (
        b"\x00\x00\x00\x07\x11\x01\x02\x03\x04hi")


def test_frame_refuses_a_body_over_the_cap() -> None:
    assert len(frame(Kind.STDIN, 1, bytes(MAX_BODY))) == 4 + MAX_LENGTH
    with pytest.raises(ValueError, match="65537 bytes is over the cap of 65536"):
        frame(Kind.STDIN, 1, bytes(MAX_BODY + 1))


def test_fields_encoding() -> None:
    assert fields([(1, -2)]) == b"\x01\x00\x00\x00\x08" + b"\xff" * 7 + b"\xfe"
    assert fields([(2, "é"), (3, b"\x00")]) == (
        b"\x02\x00\x00\x00\x02\xc3\xa9\x03\x00\x00\x00\x01\x00")


def test_as_int_wants_exactly_eight_bytes() -> None:
    assert as_int(b"\x80" + bytes(7)) == -(2**63)
    for size in (0, 4, 7, 9):
        with pytest.raises(ProtocolError, match=f"has {size} bytes"):
            as_int(bytes(size))


def test_as_str_refuses_bad_utf8_and_nul() -> None:
    assert as_str("día".encode()) == "día"
    with pytest.raises(ProtocolError, match="not UTF-8"):
        as_str(b"\xff\xfe")
    with pytest.raises(ProtocolError, match="NUL"):
        as_str(b"a\x00b")


def test_decoder_names_a_bad_length_and_stays_failed() -> None:
    d = Decoder()
    with pytest.raises(ProtocolError, match=r"a frame of 2147483648 bytes \(cap 65541\)"):
        d.feed(b"\x80\x00\x00\x00\x01")
    with pytest.raises(ProtocolError, match="2147483648"):
        d.feed(frame(Kind.PONG, 1))
    assert d.buffered == 0
    with pytest.raises(ProtocolError, match="a frame of 4 bytes"):
        Decoder().feed(b"\x00\x00\x00\x04xxxx")


@settings(max_examples=200, deadline=None)
@given(st.lists(frames_st, max_size=6), st.lists(st.integers(0, 200_000), max_size=12))
def test_decoder_any_split_gives_the_same_frames(frames: list[Frame], cuts: list[int]) -> None:
    stream = b"".join(frame(f.kind, f.chan, f.body) for f in frames)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    d, got = Decoder(), []
    for a, b in itertools.pairwise(points):
        got += d.feed(stream[a:b])
        assert d.buffered < 4 + MAX_LENGTH
    assert got == frames
    assert d.buffered == 0


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=70_000) | st.sampled_from(
    [b"\x00\x00\x00\x05", b"\x00\x01\x00\x05", b"\x00\x00\xff\xff"]), max_size=8))
def test_decoder_random_bytes_only_raise_protocol_error(chunks: list[bytes]) -> None:
    d = Decoder()
    try:
        for chunk in chunks:
            for f in d.feed(chunk):
                assert 0 <= len(f.body) <= MAX_BODY
            assert d.buffered < 4 + MAX_LENGTH
    except ProtocolError as exc:
        assert "agent sent a frame of" in str(exc)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 255), field_values), max_size=8))
def test_parse_fields_round_trip(items: list[tuple[int, bytes | str | int]]) -> None:
    parsed = parse_fields(fields(items))
    assert [t for t, _ in parsed] == [t for t, _ in items]
    for (_, want), (_, got) in zip(items, parsed, strict=True):
        if isinstance(want, int):
            assert as_int(got) == want
        elif isinstance(want, str):
            assert got.decode() == want
        else:
            assert got == want


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 255), field_values), min_size=1, max_size=6))
def test_parse_fields_refuses_every_truncation(items: list[tuple[int, bytes | str | int]]
                                               ) -> None:
    body = fields(items)
    ends, pos = set(), 0
    for tag, value in items:
        pos += len(fields([(tag, value)]))
        ends.add(pos)
    for cut in range(1, len(body)):
        if cut in ends:
            assert len(parse_fields(body[:cut])) <= len(items)
        else:
            with pytest.raises(ProtocolError, match=r"truncated|claims"):
                parse_fields(body[:cut])
