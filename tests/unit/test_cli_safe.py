"""Terminal-safe text: no control character, C1 code or bidi override survives."""

from __future__ import annotations

import io
import itertools
import re

from hypothesis import given
from hypothesis import strategies as st

from banger.cli.safe import PrintableStream, cell, markup, printable, relay_printable

UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


@given(st.text())
def test_nothing_unsafe_survives(text: str) -> None:
    assert not UNSAFE.search(printable(text))
    one = printable(text, one_line=True)
    assert not UNSAFE.search(one) and "\n" not in one and "\t" not in one


def test_what_is_kept_and_how_the_rest_shows() -> None:
    assert printable("a\tb\r\nc\n") == "a\tb\nc\n"
    assert printable("pwned\rok") == "pwned\\rok"
    assert printable("\x1b]52;c;eA==\x07") == "\\x1b]52;c;eA==\\x07"
    assert printable("\u009b2J\x7f\u202e") == "\\x9b2J\\x7f\\u202e"
    assert printable("a\nb\tc", one_line=True) == "a\\nb\\tc"
    assert printable("héllo ✓") == "héllo ✓"


def test_markup_and_cells_are_never_markup() -> None:
    assert markup("[red]x\x1b") == "\\[red]x\\x1b"
    assert cell("[bold]x\n").plain == "[bold]x\\n"
    assert cell(None).plain == "-"


def test_relay_streams_and_keeps_crlf_across_chunks() -> None:
    class Chunks(io.RawIOBase):
        def __init__(self, parts: list[bytes]) -> None:
            self.parts = parts

        def read1(self, n: int = -1) -> bytes:
            return self.parts.pop(0) if self.parts else b""

    out = io.StringIO()
    relay_printable(Chunks([b"line one\r", b"\nbad \x1b[2J\xe2\x9c", b"\x93 \xff\r"]),
                    out)  # type: ignore[arg-type]
    assert out.getvalue() == "line one\nbad \\x1b[2J✓ \ufffd\\r"


@given(st.binary(max_size=200), st.lists(st.integers(min_value=0, max_value=200),
                                         max_size=10))
def test_a_stream_shows_the_same_whatever_its_chunks(data: bytes, cuts: list[int]) -> None:
    # `vm logs -f` gets a guest's bytes in chunks cut anywhere: inside a UTF-8 sequence
    # (a C1 control is two bytes), an escape or a CRLF. What shows is what the whole
    # would show, so no cut lets a raw control character through.
    edges = sorted({0, len(data), *(min(c, len(data)) for c in cuts)})
    stream = PrintableStream()
    shown = "".join(stream.feed(data[a:b]) for a, b in itertools.pairwise(edges))
    shown += stream.feed(b"", final=True)
    assert shown == printable(data.decode(errors="replace"))


def test_a_c1_control_split_between_chunks_is_still_shown_escaped() -> None:
    stream = PrintableStream()
    shown = stream.feed(b"x\xc2") + stream.feed(b"\x9b2J\x1b") + stream.feed(b"]52;\x07")
    assert shown == "x\\x9b2J\\x1b]52;\\x07"
