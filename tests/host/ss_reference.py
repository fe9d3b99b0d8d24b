"""The reference for the agent's LISTENING answer: iproute2's ``ss``, parsed.

banger reads a guest's sockets from its agent; the tests hold the agent's answer against
what ``ss`` says on the same machine. :func:`parse_ss` reads the output of
:data:`SS_ARGV` (no header, numeric, TCP and UDP, with processes) into
:class:`SsSocket` records.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Proto = Literal["tcp", "udp"]

# -H no header, -l listening (UDP: unconnected), -n numeric, -t/-u TCP and UDP,
# -p the owning processes.
SS_ARGV = ["ss", "-H", "-l", "-n", "-t", "-u", "-p"]

_PROTOS: dict[str, Proto] = {"tcp": "tcp", "udp": "udp"}
_PROCESS = re.compile(r'\("((?:[^"\\]|\\.)*)",pid=\d+')


@dataclass(frozen=True)
class SsSocket:
    proto: Proto
    address: str  # without brackets or %scope; "*" is the dual-stack wildcard
    port: int
    process: str | None = None  # distinct process names, comma-separated


class SsParseError(ValueError):
    """A line of ``ss`` output that is not a socket we can read."""


def split_local(local: str) -> tuple[str, int]:
    """``0.0.0.0:22``, ``[::]:22``, ``*:68``, ``127.0.0.53%lo:53``, ``[fe80::1%eth0]:123``
    -> (address without the scope or brackets, port)."""
    host, sep, port_text = local.rpartition(":")
    if not sep or not port_text.isdigit():
        raise SsParseError(f"no port in local address {local!r}")
    if host.startswith("["):
        if not host.endswith("]"):
            raise SsParseError(f"unbalanced brackets in {local!r}")
        host = host[1:-1]
    # The scope names the interface (link-local address, or SO_BINDTODEVICE): the
    # address is what decides reachability.
    host = host.partition("%")[0]
    if not host:
        raise SsParseError(f"no address in local address {local!r}")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise SsParseError(f"port out of range in {local!r}")
    return host, port


def _process(fields: list[str]) -> str | None:
    """The distinct process names of ``users:(("sshd",pid=1,fd=3),...)``, in order."""
    # A name may hold spaces ("tmux: server"): read the rejoined rest of the line.
    text = " ".join(fields)
    names: list[str] = []
    for m in _PROCESS.finditer(text):
        name = m.group(1).replace('\\"', '"')
        if name not in names:
            names.append(name)
    return ",".join(names) or None


def parse_ss_line(line: str) -> SsSocket | None:
    """One line of :data:`SS_ARGV`'s output; None for a line that is not TCP or UDP."""
    fields = line.split()
    if not fields:
        return None
    proto = _PROTOS.get(fields[0])
    if proto is None:
        return None  # another netid (e.g. a future ss listing more): not ours to show
    # Netid State Recv-Q Send-Q Local Peer [Process]
    if len(fields) < 6:
        raise SsParseError(f"too few columns in ss line {line!r}")
    address, port = split_local(fields[4])
    return SsSocket(proto=proto, address=address, port=port,
                           process=_process(fields[6:]))


def parse_ss(text: str) -> list[SsSocket]:
    """Every listening TCP and UDP socket in ``text``, once each, sorted by
    (protocol, port, address). Lines that cannot be read raise :class:`SsParseError`."""
    seen: dict[tuple[str, str, int], SsSocket] = {}
    for line in text.splitlines():
        sock = parse_ss_line(line)
        if sock is None:
            continue
        key = (sock.proto, sock.address, sock.port)
        if key in seen:
            # The same socket reported twice (SO_REUSEPORT, a forked worker): keep one,
            # with every process name.
            prev = seen[key]
            names = [n for n in (prev.process or "").split(",") if n]
            names += [n for n in (sock.process or "").split(",") if n and n not in names]
            seen[key] = SsSocket(prev.proto, prev.address, prev.port,
                                        ",".join(names) or None)
        else:
            seen[key] = sock
    return sorted(seen.values(), key=lambda s: (s.proto, s.port, s.address))
