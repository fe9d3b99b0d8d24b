"""A command in a guest, from this terminal (`vm exec`, `vm run -- CMD`): the exec
WebSocket (:mod:`banger.client.execws`) between the command and this process's stdin,
stdout and stderr. No ssh.

- The command's stdout and stderr bytes go to ours as they come (the user's own output,
  as ssh passes it); a slow reader of ours slows the guest command, nothing piles up.
- stdin: when stdin and stdout are a terminal, the command runs on a guest pty of the
  terminal's size; the terminal is raw meanwhile (put back on every way out), a resize
  follows SIGWINCH, and Ctrl-C is the byte ^C, which the guest's tty driver turns into
  SIGINT for the foreground group. Otherwise stdin is streamed, and its end closes the
  command's stdin; Ctrl-C sends SIGINT to the command, a second one SIGKILL and leaves.
- SIGTERM or SIGHUP to banger: it hangs up (the daemon ends the command: SIGHUP, then
  SIGKILL) and exits 128 + n, so `vm run --rm` still deletes its VM.
- The exit code is the command's; a signal n that ended it is 128 + n.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from banger.client.client import Client
    from banger.client.execws import Event, ExecSession, Started

# Stop reading stdin while this much of it waits for the daemon (it reads as fast as
# the guest command does).
STDIN_HIGH = 1 << 20
READ = 1 << 16
EXIT_PIPE = 128 + signal.SIGPIPE
_LEAVE = (signal.SIGTERM, signal.SIGHUP)


def terminal_size() -> tuple[int, int]:
    size = os.get_terminal_size(sys.stdout.fileno())
    return size.lines, size.columns


def wants_pty() -> bool:
    """A pty in the guest when this is an interactive terminal (stdin and stdout)."""
    try:
        return os.isatty(0) and os.isatty(1)
    except OSError:
        return False


def run_in_guest(client: Client | None, ref: str, argv: Sequence[str], *, cwd: str | None,
                 in_workspace: bool = False,
                 on_started: Callable[[Started], None] | None = None) -> int:
    """Run ``argv`` in VM ``ref``; its exit status (128 + n for signal n).

    Without a ``client``, straight to the daemon's socket (one connection; bangerd is
    started first if it is not running): what `vm exec` costs above `--version` is that
    connection, not the HTTP client's imports. ``on_started`` sees the VM the command
    runs in before any of its output is written."""
    pty = wants_pty()
    env = {"TERM": os.environ.get("TERM") or "xterm-256color"} if pty else None
    tty = terminal_size() if pty else None
    if client is not None:
        session = client.exec(ref, argv, env=env, cwd=cwd, tty=tty, in_workspace=in_workspace)
    else:
        from banger.client.execws import start_exec
        session = start_exec(ref, argv, env=env, cwd=cwd, tty=tty, in_workspace=in_workspace)
    try:
        if on_started is not None:
            on_started(session.started)
        return _Loop(session, pty=pty).run()
    finally:
        session.close()


class _Loop:
    def __init__(self, session: ExecSession, *, pty: bool) -> None:
        self.session = session
        self.pty = pty
        self.signals: list[int] = []
        self.interrupts = 0
        self.stdin_open = True

    def run(self) -> int:
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        watched = [signal.SIGINT, *_LEAVE] + ([signal.SIGWINCH] if self.pty else [])
        old_wakeup = signal.set_wakeup_fd(wake_w)
        old = {s: signal.signal(s, self._on_signal) for s in watched}
        try:
            with _raw(self.pty):
                return self._loop(wake_r)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            signal.set_wakeup_fd(old_wakeup)
            os.close(wake_r)
            os.close(wake_w)

    def _on_signal(self, signum: int, _frame: object) -> None:
        # Only noted: the loop, woken by the wakeup fd, acts on it between two I/Os.
        self.signals.append(signum)

    def _loop(self, wake: int) -> int:
        rc = self._events(self.session.buffered())
        while rc is None:
            s = self.session
            reads: list[int] = [s.fileno(), wake]
            if self.stdin_open and s.pending() < STDIN_HIGH:
                reads.append(0)
            writes = [s.fileno()] if s.wants_write() else []
            readable, writable, _ = select.select(reads, writes, [])
            if wake in readable:
                with contextlib.suppress(OSError):
                    os.read(wake, 512)
                rc = self._act_on_signals()
                if rc is not None:
                    return rc
            if writable:
                s.flush()
            if s.fileno() in readable:
                rc = self._events(s.receive())
            if rc is None and 0 in readable:
                self._read_stdin()
        return rc

    def _events(self, events: Iterator[Event]) -> int | None:
        from banger.client.execws import Exit
        for ev in events:
            if isinstance(ev, Exit):
                return ev.returncode
            if not _write(1 if ev.stream == "stdout" else 2, ev.data):
                return EXIT_PIPE  # our reader is gone: hang up, as ssh would
        return None

    def _read_stdin(self) -> None:
        try:
            data = os.read(0, READ)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EINTR):
                return
            data = b""  # a closed or unreadable stdin ends the command's
        if data:
            self.session.send_stdin(data)
        else:
            self.stdin_open = False
            self.session.send_eof()

    def _act_on_signals(self) -> int | None:
        pending, self.signals = self.signals, []
        for signum in pending:
            if signum == signal.SIGWINCH:
                with contextlib.suppress(OSError):
                    self.session.resize(*terminal_size())
            elif signum in _LEAVE:
                return 128 + signum
            elif signum == signal.SIGINT:
                self.interrupts += 1
                if self.interrupts == 1:
                    self.session.signal(signal.SIGINT)
                else:
                    self.session.signal(signal.SIGKILL)
                    self.session.flush()
                    return 128 + signal.SIGINT
        return None


def _write(fd: int, data: bytes) -> bool:
    """All of ``data`` to ``fd`` (blocking: a slow reader is backpressure); False when
    the reader is gone."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        except BrokenPipeError:
            return False
        view = view[n:]
    return True


@contextlib.contextmanager
def _raw(on: bool) -> Iterator[None]:
    """The terminal on stdin raw (keys go to the guest's pty as they are typed), put back
    however the block ends."""
    if not on:
        yield
        return
    import termios
    import tty

    saved = termios.tcgetattr(0)
    try:
        tty.setraw(0, termios.TCSANOW)
        yield
    finally:
        termios.tcsetattr(0, termios.TCSADRAIN, saved)
