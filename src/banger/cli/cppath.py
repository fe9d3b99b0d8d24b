"""`vm cp`'s operands: scp's `box:/path` notation, stdlib only.

An operand is a guest path when it has a ``:`` before any ``/`` and something before
that colon (the VM's name or id): `box:/root/out`, `box:out` (relative to /root),
`box:` (/root). Anything else is a local path: `./a:b` names a local file with a colon,
`/tmp/x:y` too. ``-`` is a tar stream on stdin (a source) or stdout (a destination).
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

GUEST_HOME = "/root"


@dataclass(frozen=True)
class Operand:
    vm: str | None  # None: a local path (or "-")
    path: str
    dir_hint: bool = False  # written with a trailing "/": a directory, made if missing

    @property
    def stream(self) -> bool:
        return self.vm is None and self.path == "-"


def parse(arg: str) -> Operand:
    if not arg:
        raise ValueError("an empty operand: give a path, box:PATH or -")
    head, sep, tail = arg.partition(":")
    if not sep or not head or "/" in head:
        return Operand(None, arg, dir_hint=arg.endswith("/") and len(arg) > 1)
    if "\0" in tail:
        raise ValueError(f"{arg!r}: a guest path may hold no NUL")
    hint = tail.endswith("/") and tail != "/"
    path = posixpath.normpath(posixpath.join(GUEST_HOME, tail)) if tail else GUEST_HOME
    if path.startswith("//"):
        path = "/" + path.lstrip("/")
    return Operand(head, path, dir_hint=hint)


def pair(src: str, dst: str) -> tuple[Operand, Operand]:
    """Both operands; exactly one must be in a guest."""
    s, d = parse(src), parse(dst)
    if s.vm is not None and d.vm is not None:
        raise ValueError("both operands are in a VM: copy through the host (one side "
                         "must be a local path or -)")
    if s.vm is None and d.vm is None:
        raise ValueError("neither operand is in a VM: write one as box:PATH (a local path "
                         "holding ':' can be given as ./a:b)")
    return s, d
