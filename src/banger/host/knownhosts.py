"""Forget one host alias in banger's own ``known_hosts`` without running ``ssh-keygen -R``
(a process per VM create and delete, on the start's critical path).

Matches what ``ssh-keygen -R ALIAS`` removes: a line whose comma-separated host list
names ALIAS exactly, or a hashed entry (``|1|salt|hmac``, OpenSSH's HashKnownHosts) of
ALIAS. Marker lines (``@cert-authority``, ``@revoked``), comments and other hosts' lines
are kept byte for byte. The file is replaced atomically (a temporary file beside it,
fsynced, renamed), with its mode kept; callers serialise writers.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import tempfile
from pathlib import Path


def _hashed_match(pattern: str, alias: bytes) -> bool:
    parts = pattern.split("|")
    if len(parts) != 4 or parts[0] != "" or parts[1] != "1":
        return False
    try:
        salt = base64.b64decode(parts[2], validate=True)
        want = base64.b64decode(parts[3], validate=True)
    except (binascii.Error, ValueError):
        return False
    return hmac.compare_digest(hmac.new(salt, alias, hashlib.sha1).digest(), want)


def names(line: str, alias: str) -> bool:
    """True when the known_hosts ``line`` is a (non-marker) entry for ``alias``."""
    # Fields are separated by spaces and tabs only, as ssh splits them.
    hosts = line.lstrip(" \t").replace("\t", " ").split(" ", 1)[0]
    if not hosts or hosts.startswith(("#", "@")):
        return False
    if hosts.startswith("|"):
        return _hashed_match(hosts, alias.encode())
    return alias in hosts.split(",")


def remove(known_hosts: Path, alias: str) -> None:
    """Drop ``alias``'s entries from ``known_hosts``; a missing file or entry is fine."""
    try:
        data = known_hosts.read_bytes()
    except FileNotFoundError:
        return
    # Lines end at "\n" only, as ssh reads them (str.splitlines would also split at
    # \x0b, \x85, U+2028 ... and mangle another host's line).
    lines = data.split(b"\n")
    kept = [line for line in lines
            if not names(line.decode("utf-8", "surrogateescape"), alias)]
    if len(kept) == len(lines):
        return
    mode = known_hosts.stat().st_mode & 0o7777
    fd, name = tempfile.mkstemp(prefix=f".{known_hosts.name}.", suffix=".tmp",
                                dir=known_hosts.parent)
    tmp = Path(name)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(b"\n".join(kept))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, known_hosts)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
