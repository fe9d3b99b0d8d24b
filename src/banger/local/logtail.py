"""The end of a log file: the one reader behind `vm logs` and every "last lines of the
log" in an error message (serial log, VMM log).

Stdlib only (a leaf), so core, host and daemon share it. Guests write these logs and may
write gigabytes: only the end of the file is ever read, never the whole of it.
"""

from __future__ import annotations

import os

# How far back from the end a "last lines" read looks: a few screens of a log.
LINES_WINDOW = 16 * 1024


def tail_bytes(path: str | os.PathLike[str], limit: int) -> bytes:
    """At most the last ``limit`` bytes of the file at ``path``.

    Raises :class:`OSError` (``FileNotFoundError`` for a missing file); the caller says
    what an unreadable log means where it is shown.
    """
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - limit))
        return f.read(limit)  # not past `limit`: the guest may still be writing


def tail_lines(path: str | os.PathLike[str], lines: int, *,
               window: int = LINES_WINDOW) -> list[str]:
    """The last ``lines`` lines among the last ``window`` bytes of the file at ``path``,
    decoded with replacement (a guest's bytes need not be UTF-8). Raises :class:`OSError`.
    """
    text = tail_bytes(path, window).decode(errors="replace")
    return text.splitlines()[-lines:] if lines > 0 else []
