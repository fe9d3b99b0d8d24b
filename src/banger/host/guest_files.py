"""Files in and out of a running guest (`vm cp`) through its kept agent session: the
agent port's ``put_files`` and ``get_files`` (:class:`~banger.host.guest_agent.LocalAgent`
delegates here).

The tar bytes pass through untouched, both ways: the guest's agent extracts what banger
sends (safely, in the guest), and the CLI extracts what the guest sends (safely, on the
host: :mod:`banger.cli.tarsafe`). What this module adds is the port's error vocabulary:
an agent without the "files" feature is a conflict naming the fix, the guest's refusal
of a path or entry is an invalid request, anything else (the agent gone, a timeout, the
protocol broken) an operation failure; and a session whose connection broke is dropped
so that the next call reconnects.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Iterator
from pathlib import Path

from banger.host.agent_proto import FEATURE_FILES
from banger.host.agent_records import AgentError, AgentRequestError, safe_text
from banger.host.agent_sessions import AgentSessions, Session
from banger.model.errors import ConflictError, InvalidRequest, OperationFailed


def _session(sessions: AgentSessions, channel: Path, timeout: float) -> Session:
    session = sessions.get(channel, timeout)
    if FEATURE_FILES not in session.conn.features():
        raise ConflictError(
            "the VM's guest agent is older than this banger and cannot copy files (its "
            "HELLO lacks the 'files' feature): restart the VM (`banger vm restart NAME`); "
            "a VM whose image predates the feature needs a rebuilt image (recreate it)")
    return session


def _error(exc: AgentError, what: str, channel: Path) -> Exception:
    if isinstance(exc, AgentRequestError):
        return InvalidRequest(str(exc))
    return OperationFailed(f"{what} through the guest agent on {channel} failed: {exc}")


class _Counted:
    """``source``'s chunks, counted as they go."""

    def __init__(self, source: Iterable[bytes]) -> None:
        self.source, self.bytes = source, 0

    def __iter__(self) -> Generator[bytes, None, None]:
        for chunk in self.source:
            self.bytes += len(chunk)
            yield chunk


def put_files(sessions: AgentSessions, *, channel: Path, dest: str,
              source: Iterable[bytes], timeout: float) -> int:
    session = _session(sessions, channel, timeout)
    counted = _Counted(source)
    try:
        session.conn.put_tar(dest, counted, timeout)
    except ValueError as exc:  # NUL in the path, too long
        raise InvalidRequest(str(exc)) from exc
    except AgentError as exc:
        raise _error(exc, f"copying into {safe_text(dest, 80)}", channel) from exc
    return counted.bytes


def get_files(sessions: AgentSessions, *, channel: Path, path: str,
              timeout: float) -> Generator[bytes, None, None]:
    session = _session(sessions, channel, timeout)
    what = f"copying {safe_text(path, 80)} out"
    try:
        chunks = session.conn.get_tar(path, timeout)
        first = next(chunks, b"")
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from exc
    except AgentError as exc:
        raise _error(exc, what, channel) from exc
    return _rest(chunks, first, what, channel)


def _rest(chunks: Iterator[bytes], first: bytes, what: str,
          channel: Path) -> Generator[bytes, None, None]:
    try:
        if first:
            yield first
        try:
            yield from chunks
        except AgentError as exc:
            raise _error(exc, what, channel) from exc
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()  # early: cancels the guest's side
