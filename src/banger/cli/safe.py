"""Text from guests and repos made safe for a terminal.

A guest chooses its serial output, its process names and the messages of the commands
banger runs in it; a repo chooses its file names and symlink targets. Any of that may
carry terminal escapes (OSC 52 writes the clipboard, CSI moves the cursor over earlier
output, a bare CR or backspaces hide text) or, for rich, markup. Everything such text
passes through :func:`printable` (escapes shown as ``\\x1b``) and, where it goes into
rich, is handed over as :class:`rich.text.Text` or :func:`markup`-escaped, never as
markup.
"""

from __future__ import annotations

import codecs
import re
from typing import IO, TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from rich.text import Text

# C0 controls but TAB and LF, DEL, C1 controls (a UTF-8 terminal may take U+009B as
# CSI), and the bidi overrides and isolates that reorder what a line seems to say.
_UNSAFE = "\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069"
_MULTI_LINE = re.compile(f"[{_UNSAFE}]")
_ONE_LINE = re.compile(f"[\t\n{_UNSAFE}]")


def _shown(m: re.Match[str]) -> str:
    c = m.group()
    o = ord(c)
    if c == "\r":
        return "\\r"
    if c == "\n":
        return "\\n"
    if c == "\t":
        return "\\t"
    return f"\\x{o:02x}" if o <= 0xFF else f"\\u{o:04x}"


def printable(text: str, *, one_line: bool = False) -> str:
    """``text`` with every control character shown escaped. Newlines and tabs stay
    unless ``one_line`` (table cells: a name must not start a row of its own); CRLF
    becomes LF."""
    if one_line:
        return _ONE_LINE.sub(_shown, text)
    # A CR that ends a line (serial consoles write CRLF) is a line end; any other CR
    # would send the cursor back over the line, so it is shown.
    return _MULTI_LINE.sub(_shown, text.replace("\r\n", "\n"))


def markup(text: str, *, one_line: bool = False) -> str:
    """:func:`printable`, escaped for use inside a rich markup string."""
    from rich.markup import escape  # rich loads only where rich draws

    return escape(printable(text, one_line=one_line))


def cell_text(text: str | None, default: str = "-") -> str:
    """The text of a table cell of untrusted text: one line."""
    return printable(text, one_line=True) if text else default


def cell(text: str | None, default: str = "-") -> Text:
    """A table cell of untrusted text: one line, no markup."""
    from rich.text import Text

    return Text(cell_text(text, default))


class PrintableStream:
    """:func:`printable` over a byte stream that arrives in chunks: a UTF-8 sequence or a
    CRLF split between two chunks is joined first, so a chunk's edge never changes what
    is shown (an ESC is shown escaped wherever it falls)."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""  # a CR at a chunk's end may be the first half of a CRLF

    def feed(self, chunk: bytes, *, final: bool = False) -> str:
        text = self._held + self._decoder.decode(chunk, final=final)
        self._held = ""
        if not final and text.endswith("\r"):
            text, self._held = text[:-1], "\r"
        return printable(text)


def relay_printable(src: IO[bytes], dst: TextIO) -> None:
    """Copy ``src`` to ``dst`` as it arrives (no more than a chunk in memory), through
    :func:`printable`."""
    stream = PrintableStream()
    while True:
        chunk = src.read1(1 << 16) if hasattr(src, "read1") else src.read(1 << 16)
        dst.write(stream.feed(chunk, final=not chunk))
        dst.flush()
        if not chunk:
            return
