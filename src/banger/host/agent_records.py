"""What the host reads from the guest agent: the records, the errors, and the parsers
that turn an answer's FIELDS body into a record (or a :class:`ProtocolError` naming what
is wrong with it), and the EXEC request's fields.

The guest is untrusted: a string from it reaches an error message only through
:func:`safe_text`, required fields must be there exactly once, integers are checked.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from banger.host.agent_proto import (
    PROTOCOL,
    ExecTag,
    ExitTag,
    HelloTag,
    ListeningTag,
    MessageTag,
    ProtocolError,
    StartedTag,
    StatsTag,
    as_int,
    as_str,
    parse_fields,
)

# What a guest's text may show in an error message: it ends up in logs and terminals.
_MESSAGE_CHARS = 300
_MAX_FEATURES = 64


class AgentError(Exception):
    """Talking to the guest agent failed."""

    # Set on the error that ends a request none of which left the host (the connection
    # was found broken first): the agent never saw it, so it may go again on a new one.
    unsent: bool = False


class AgentTimeout(AgentError):
    """The agent did not answer in time; the message names what was awaited."""


class AgentProtocolError(AgentError):
    """The agent broke the protocol; the connection was closed."""


class AgentDisconnected(AgentError):
    """The connection to the agent ended (the agent, the guest, or the host closed it)."""


class AgentRequestError(AgentError):
    """The agent refused a request (ERROR) or could not start a command (EXEC_ERROR)."""


class OutputTooLarge(AgentError):
    """An exec printed more than its output cap; it was sent SIGKILL."""


class ExecEnded(AgentError):
    """A request for an exec that has already ended."""


def unsent(err: AgentError) -> AgentError:
    """``err``, marked as ending a request none of which was sent (see AgentError)."""
    err.unsent = True
    return err


def fresh(err: AgentError) -> AgentError:
    """A copy of an error shared by several waiters, so that each raise has its own
    traceback."""
    return type(err)(str(err))


def safe_text(text: str, limit: int = _MESSAGE_CHARS) -> str:
    """A guest's text fit for a log line or terminal: control characters escaped, clipped."""
    text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text[:limit])
    return text + "…" if len(text) >= limit else text


@dataclass(frozen=True)
class Hello:
    protocol: int
    version: str
    boot_id: str
    token: int | None = None  # the TOKEN of the HELLO_REQ this HELLO answers
    features: frozenset[str] = frozenset()  # FEATURE fields ("credit", "files", …)


@dataclass(frozen=True)
class AgentSocket:
    """A listening TCP or bound unconnected UDP socket in the guest, as ``ss`` shows it
    (banger.host.guestports.SsSocket): ``address`` without brackets or scope, ``*`` for a
    dual-stack wildcard; ``process`` the distinct command names, comma-separated."""

    proto: Literal["tcp", "udp"]
    address: str
    port: int
    process: str | None = None


@dataclass(frozen=True)
class Filesystem:
    mountpoint: str
    size_bytes: int
    used_bytes: int
    avail_bytes: int


@dataclass(frozen=True)
class GuestStats:
    uptime_ms: int
    load1_x100: int
    load5_x100: int
    load15_x100: int
    mem_total_kib: int
    mem_available_kib: int
    cpu_user_ticks: int
    cpu_system_ticks: int
    cpu_idle_ticks: int
    ncpu: int
    filesystems: tuple[Filesystem, ...] = ()


@dataclass(frozen=True)
class ExitStatus:
    """How an exec ended: exactly one of ``code`` and ``signal`` is set."""

    code: int | None = None
    signal: int | None = None

    @property
    def returncode(self) -> int:
        """The shell's convention: the exit code, or 128 + n for signal n."""
        if self.signal is not None:
            return 128 + self.signal
        assert self.code is not None
        return self.code


class Stream(StrEnum):
    STDOUT = "stdout"
    STDERR = "stderr"


def field_map(body: bytes) -> dict[int, list[bytes]]:
    """A FIELDS body grouped by tag (values in order)."""
    out: dict[int, list[bytes]] = {}
    for tag, value in parse_fields(body):
        out.setdefault(tag, []).append(value)
    return out


def one(fs: Mapping[int, list[bytes]], tag: int, kind: str) -> bytes | None:
    """The value of a field that may appear at most once."""
    values = fs.get(tag)
    if values is None:
        return None
    if len(values) > 1:
        raise ProtocolError(f"{kind} repeats field {tag}")
    return values[0]


def need(fs: Mapping[int, list[bytes]], tag: int, kind: str) -> bytes:
    value = one(fs, tag, kind)
    if value is None:
        raise ProtocolError(f"{kind} lacks field {tag}")
    return value


def parse_hello(body: bytes) -> Hello:
    fs = field_map(body)
    protocol = as_int(need(fs, HelloTag.PROTOCOL, "HELLO"))
    if protocol != PROTOCOL:
        raise ProtocolError(f"the agent speaks protocol {protocol}; this banger speaks "
                            f"{PROTOCOL} (rebuild the image's agent, or update banger)")
    token = one(fs, HelloTag.TOKEN, "HELLO")
    features = fs.get(HelloTag.FEATURE, [])
    if len(features) > _MAX_FEATURES:
        raise ProtocolError(f"HELLO names {len(features)} features (cap {_MAX_FEATURES})")
    return Hello(protocol, as_str(need(fs, HelloTag.VERSION, "HELLO")),
                 as_str(need(fs, HelloTag.BOOT_ID, "HELLO")),
                 None if token is None else as_int(token),
                 frozenset(safe_text(as_str(f), 40) for f in features))


def parse_started(body: bytes) -> tuple[int, int | None]:
    """The pid, and the stdin window (None: the agent does no flow control)."""
    fs = field_map(body)
    window = one(fs, StartedTag.STDIN_WINDOW, "STARTED")
    value = None if window is None else as_int(window)
    if value is not None and value <= 0:
        raise ProtocolError(f"STARTED grants a stdin window of {value} bytes")
    return as_int(need(fs, StartedTag.PID, "STARTED")), value


def parse_credit(body: bytes) -> int:
    value = as_int(need(field_map(body), 1, "CREDIT"))
    if not 0 < value <= 1 << 40:
        raise ProtocolError(f"CREDIT of {value} bytes is not 1..2^40")
    return value


def parse_listening(body: bytes) -> tuple[list[AgentSocket], bool]:
    """The sockets of a LISTENING answer, once each (one entry per owning process on the
    wire), sorted like ``parse_ss``; and whether the agent truncated the list."""
    fs = field_map(body)
    truncated = one(fs, ListeningTag.TRUNCATED, "LISTENING")
    seen: dict[tuple[str, str, int], list[str]] = {}
    for value in fs.get(ListeningTag.SOCKET, []):
        text = as_str(value)
        parts = text.split("\t", 4)
        try:
            if len(parts) not in (3, 5) or parts[0] not in ("tcp", "udp") or not parts[1]:
                raise ValueError
            port = int(parts[2])
            if not 0 <= port <= 65535 or (len(parts) == 5 and int(parts[3]) <= 0):
                raise ValueError
        except ValueError:
            raise ProtocolError(f"a LISTENING SOCKET field is not 'proto<TAB>address<TAB>"
                                f"port[<TAB>pid<TAB>command]': {safe_text(text, 80)!r}"
                                ) from None
        names = seen.setdefault((parts[0], safe_text(parts[1], 64), port), [])
        if len(parts) == 5:
            name = safe_text(parts[4], 64)
            if name not in names:
                names.append(name)
    socks = [AgentSocket("tcp" if proto == "tcp" else "udp", address, port,
                         ",".join(names) or None)
             for (proto, address, port), names in seen.items()]
    socks.sort(key=lambda s: (s.proto, s.port, s.address))
    return socks, truncated is not None and as_int(truncated) != 0


def parse_exit(body: bytes) -> ExitStatus:
    fs = field_map(body)
    code, sig = one(fs, ExitTag.CODE, "EXIT"), one(fs, ExitTag.SIGNAL, "EXIT")
    if (code is None) == (sig is None):
        raise ProtocolError("EXIT must carry exactly one of CODE and SIGNAL")
    if code is not None:
        value = as_int(code)
        if not 0 <= value <= 255:
            raise ProtocolError(f"EXIT code {value} is not 0..255")
        return ExitStatus(code=value)
    assert sig is not None
    value = as_int(sig)
    if not 1 <= value <= 127:
        raise ProtocolError(f"EXIT signal {value} is not 1..127")
    return ExitStatus(signal=value)


def parse_message(body: bytes) -> str:
    """The MESSAGE of an ERROR or EXEC_ERROR, fit for an error message."""
    return safe_text(as_str(need(field_map(body), MessageTag.MESSAGE, "ERROR")))


def parse_stats(body: bytes) -> GuestStats:
    fs = field_map(body)
    ints = {tag.name.lower(): as_int(need(fs, tag, "STATS"))
            for tag in StatsTag if tag != StatsTag.FS}
    return GuestStats(**ints, filesystems=tuple(
        _parse_fs(as_str(v)) for v in fs.get(StatsTag.FS, [])))


def _parse_fs(text: str) -> Filesystem:
    # From the right: a mount point may itself hold a tab.
    parts = text.rsplit("\t", 3)
    try:
        if len(parts) != 4 or not parts[0]:
            raise ValueError
        size, used, avail = (int(p) for p in parts[1:])
    except ValueError:
        raise ProtocolError(f"a STATS FS field is not 'mountpoint<TAB>size<TAB>used<TAB>"
                            f"avail': {safe_text(text, 80)!r}") from None
    if min(size, used, avail) < 0:
        raise ProtocolError(f"a STATS FS field has a negative size: {safe_text(text, 80)!r}")
    return Filesystem(parts[0], size, used, avail)


def exec_fields(argv: Sequence[str], env: Mapping[str, str], cwd: str,
                pty: tuple[int, int] | None) -> list[tuple[int, bytes | str | int]]:
    """The fields of an EXEC; refuses what the agent would refuse (ValueError)."""
    if not argv:
        raise ValueError("exec needs a command (argv is empty)")
    for key in env:
        if not key or "=" in key:
            raise ValueError(f"environment variable name {key!r} is empty or holds '='")
    items: list[tuple[int, bytes | str | int]] = [(ExecTag.ARG, a) for a in argv]
    items += [(ExecTag.ENV, f"{k}={v}") for k, v in env.items()]
    items.append((ExecTag.CWD, cwd))
    for _, value in items:
        if "\0" in str(value):
            raise ValueError(f"exec's argv, env and cwd may not hold NUL: {value!r}")
    if pty is not None:
        rows, cols = pty
        if not (0 <= rows < 1 << 16 and 0 <= cols < 1 << 16):
            raise ValueError(f"pty size {rows}x{cols} is out of range")
        items += [(ExecTag.PTY_ROWS, rows), (ExecTag.PTY_COLS, cols)]
    return items
