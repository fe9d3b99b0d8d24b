"""The one choke point for external commands.

Every process banger runs on the host goes through :func:`run`: argv lists only (never a
shell string), the argv, exit code and output are logged, and a failure raises
:class:`CommandError` carrying all of them so the message names what failed and why.

Output is read in a loop and capped per stream (:data:`DEFAULT_MAX_OUTPUT`, lower per
call): a command whose output a guest controls (ssh) must not fill the daemon's memory.
A command that prints more than its cap is killed and :class:`OutputTooLarge` is raised.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import shlex
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

# Per stream. Generous for the host tools banger runs (git ls-files of a big repo, mkfs
# chatter); callers that read a guest's output pass much lower caps.
DEFAULT_MAX_OUTPUT = 16 << 20
# An error message shows at most this much of a command's stderr: the message travels to
# the CLI and the operation log, and a hostile guest chooses what ssh prints.
_DETAIL_LINES = 5
_DETAIL_LINE_CHARS = 300
_CHUNK = 1 << 16


@dataclass(frozen=True)
class Completed:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


class CommandError(Exception):
    """An external command failed (non-zero exit, missing binary, or timeout)."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stdout: str, stderr: str,
                 reason: str | None = None) -> None:
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        self.reason = reason
        what = reason or f"exited with status {returncode}"
        tail = [_clip(line) for line in stderr.strip().splitlines()[-_DETAIL_LINES:]
                ] if stderr else []
        detail = ("\n" + "\n".join(tail)) if tail else ""
        super().__init__(f"{_clip(shlex.join(self.argv), 1000)}: {what}{detail}")


class OutputTooLarge(CommandError):
    """The command printed more than its output cap; it was killed."""


def _clip(text: str, limit: int = _DETAIL_LINE_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + f"… ({len(text) - limit} more)"


def size_text(n: int) -> str:
    """``16 MiB``, ``64 KiB``, ``100 bytes``."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} bytes"


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    input: str | bytes | None = None,
    stdin: IO[bytes] | None = None,
    timeout: float | None = None,
    env: Mapping[str, str | None] | None = None,
    cwd: Path | str | None = None,
    max_output: int = DEFAULT_MAX_OUTPUT,
) -> Completed:
    """Run ``argv`` to completion and return its output as text.

    ``env`` entries are added to the current environment rather than replacing it; an
    entry of None removes that variable.
    ``input`` is written to the command's stdin; ``stdin`` hands it a file instead (a
    pipe from another process). Each of stdout and stderr may carry at most
    ``max_output`` bytes: past that the command is killed and :class:`OutputTooLarge`
    is raised whatever ``check`` says (a cut-off output is never returned as if whole).
    """
    if input is not None and stdin is not None:
        raise ValueError("give input or stdin, not both")
    argv = [os.fspath(a) for a in argv]
    full_env = None
    if env is not None:
        full_env = dict(os.environ)
        for key, value in env.items():
            if value is None:
                full_env.pop(key, None)
            else:
                full_env[key] = value
    data = input.encode() if isinstance(input, str) else input
    log.debug("run: %s", shlex.join(argv))
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE if data is not None else stdin,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full_env, cwd=cwd)
    except FileNotFoundError as exc:
        raise CommandError(argv, None, "", "", reason=f"command not found: {argv[0]}") from exc
    with proc:
        writer = _feed(proc, data) if data is not None else None
        try:
            out, err, failure = _collect(proc, timeout, max_output)
        finally:
            # Over the cap, timed out, or interrupted: it is not to run on unread.
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if writer is not None:
                # Done once the command is gone, unless a process it left behind holds
                # its stdin open without reading: never wait on that for good.
                writer.join(5)
    stdout, stderr = _text(out), _text(err)
    if failure == "timeout":
        raise CommandError(argv, None, stdout, stderr, reason=f"timed out after {timeout} s")
    if failure is not None:
        raise OutputTooLarge(argv, None, "", stderr[-4096:],
                             reason=f"its output on {failure} exceeded "
                                    f"{size_text(max_output)}; the command was killed")
    res = Completed(tuple(argv), proc.returncode, stdout, stderr)
    log.debug("exit %d: %s", proc.returncode, argv[0])
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, res.stdout, res.stderr)
    return res


def _feed(proc: subprocess.Popen[bytes], data: bytes) -> threading.Thread:
    """Write ``data`` to the command's stdin in a thread (a command that prints before it
    has read all of its input must not deadlock against us), then close it."""
    def write() -> None:
        assert proc.stdin is not None
        # The command may exit (or be killed) without reading all of it.
        with contextlib.suppress(BrokenPipeError, OSError):
            proc.stdin.write(data)
        with contextlib.suppress(BrokenPipeError, OSError):
            proc.stdin.close()

    t = threading.Thread(target=write, name=f"feed-{proc.pid}", daemon=True)
    t.start()
    return t


def _collect(proc: subprocess.Popen[bytes], timeout: float | None,
             cap: int) -> tuple[bytes, bytes, str | None]:
    """Read stdout and stderr until both close: (stdout, stderr, failure) where failure
    is None, "timeout", or the name of the stream that went over ``cap``."""
    assert proc.stdout is not None and proc.stderr is not None
    deadline = None if timeout is None else time.monotonic() + timeout
    out, err = bytearray(), bytearray()
    streams = {proc.stdout.fileno(): ("stdout", out), proc.stderr.fileno(): ("stderr", err)}
    with selectors.DefaultSelector() as sel:
        for fd in streams:
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map():
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                return bytes(out), bytes(err), "timeout"
            for key, _ in sel.select(wait):
                chunk = os.read(int(key.fd), _CHUNK)
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                name, buf = streams[int(key.fd)]
                if len(buf) + len(chunk) > cap:
                    return b"", bytes(err), name
                buf += chunk
    # Both pipes closed; the process may still be exiting.
    try:
        proc.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return bytes(out), bytes(err), "timeout"
    return bytes(out), bytes(err), None


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    if isinstance(data, str):
        return data
    return data.decode(errors="replace")


@contextlib.contextmanager
def stream(argv: Sequence[str], *, stdin: int, timeout: float,
           max_stderr: int = 1 << 16) -> Iterator[IO[bytes]]:
    """Run ``argv`` reading the descriptor ``stdin`` and yield its stdout to be read as a
    stream (a decompressor's output, never held whole). Killed once ``timeout`` passes or
    when the caller leaves early; when the caller leaves normally the rest of the output is
    read and dropped, and a non-zero exit raises :class:`CommandError`. Its stderr is
    collected in a thread, capped at ``max_stderr``."""
    argv = [os.fspath(a) for a in argv]
    log.debug("run (stream): %s", shlex.join(argv))
    try:
        proc = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
    except FileNotFoundError as exc:
        raise CommandError(argv, None, "", "", reason=f"command not found: {argv[0]}") from exc
    err = bytearray()

    def collect() -> None:
        assert proc.stderr is not None
        while chunk := proc.stderr.read(_CHUNK):
            if len(err) < max_stderr:
                err.extend(chunk[:max_stderr - len(err)])

    reader = threading.Thread(target=collect, name=f"stderr-{proc.pid}", daemon=True)
    reader.start()
    timed_out = threading.Event()

    def expire() -> None:
        timed_out.set()
        proc.kill()

    timer = threading.Timer(timeout, expire)
    timer.daemon = True
    timer.start()
    assert proc.stdout is not None
    with proc:
        try:
            yield proc.stdout
            while proc.stdout.read(_CHUNK):
                pass  # what the reader did not need: the command must finish to be judged
        except BaseException:
            proc.kill()  # the caller gave up: it is not to run on unread
            raise
        finally:
            proc.wait()
            timer.cancel()
            reader.join(5)
    stderr = _text(bytes(err))
    if proc.returncode != 0:
        reason = f"timed out after {timeout} s" if timed_out.is_set() else None
        raise CommandError(argv, proc.returncode, "", stderr, reason=reason)
