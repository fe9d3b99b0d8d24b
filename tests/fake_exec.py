"""Scripted guest commands behind ``FakeAgent.exec`` (tests/fakes.py), for the unit and
integration tiers: the ``GuestExec`` contract (backpressure through ``next``, stdin,
signals, resize, abandonment, a dropped agent) without a guest.

Commands (argv[0]): ``echo ARGS…``; ``exit N``; ``cat`` (stdin to stdout until EOF);
``err TEXT`` (TEXT on stderr, exit 3); ``sleep`` (until a signal; a pty's ^C byte is
SIGINT, as the guest's tty driver makes it); ``flood N`` (N chunks of 64 KiB, produced
only as fast as ``next`` takes them, then exit 0); ``show`` (prints its request as JSON);
``drop`` (the agent goes away after STARTED); ``hold`` (reads no stdin, its writers wait,
until ``take_stdin()``; then at EOF prints how many bytes it read, exit 0; a signal ends
it); anything else fails to start. A command
under the workspace's tools wrapper (``sh -c IN_TOOLS banger-exec CMD…``, no tools
pinned) runs as CMD would, as sh's ``exec "$@"`` makes it; ``show`` prints the wrapper.
"""

from __future__ import annotations

import json
import signal as signals
import threading
from collections import deque

from banger.model.errors import OperationFailed
from banger.ports import ExecExit, ExecOutput, ExecRequest

KNOWN = {"echo", "exit", "cat", "err", "sleep", "flood", "show", "drop", "hold"}
CHUNK = 1 << 16


def command(argv: tuple[str, ...]) -> tuple[str, ...]:
    """The command ``argv`` runs: itself, or what the workspace's wrapper runs."""
    if argv[:2] == ("sh", "-c") and argv[3:4] == ("banger-exec",):
        return argv[4:]
    return argv


class FakeExec:
    def __init__(self, request: ExecRequest) -> None:
        self.request = request
        self.cond = threading.Condition()
        self.queue: deque[ExecOutput | ExecExit] = deque()
        self.signals: list[int] = []
        self.resizes: list[tuple[int, int]] = []
        self.stdin = bytearray()
        self.stdin_closed = False
        self.ended = False
        self.abandoned = False
        self.failure: str | None = None
        self.flood_left = 0
        self.handed_out = 0  # output bytes next() returned
        self.reading = command(request.argv)[0] != "hold"
        with self.cond:
            self._script(request)

    def _script(self, request: ExecRequest) -> None:
        argv = command(request.argv)
        name, args = argv[0], argv[1:]
        if name == "echo":
            self._out(" ".join(args).encode() + b"\n")
            self._exit(code=0)
        elif name == "exit":
            self._exit(code=int(args[0]))
        elif name == "err":
            self.queue.append(ExecOutput("stderr", " ".join(args).encode() + b"\n"))
            self._exit(code=3)
        elif name == "flood":
            self.flood_left = int(args[0])
        elif name == "show":
            self._out(json.dumps({"argv": list(request.argv), "env": dict(request.env),
                                  "cwd": request.cwd, "pty": request.pty}).encode() + b"\n")
            self._exit(code=0)
        elif name == "drop":
            self.failure = "the connection to the agent ended (the agent closed it)"

    def _out(self, data: bytes) -> None:
        self.queue.append(ExecOutput("stdout", data))

    def _exit(self, *, code: int | None = None, signal: int | None = None) -> None:
        if not self.ended:
            self.ended = True
            self.queue.append(ExecExit(code=code, signal=signal))
            self.cond.notify_all()

    # ---- GuestExec ------------------------------------------------------------------

    def next(self, timeout: float) -> ExecOutput | ExecExit | None:
        with self.cond:
            if self.flood_left and not self.queue:
                self.flood_left -= 1
                self._out(b"y" * CHUNK)
                if not self.flood_left:
                    self._exit(code=0)
            if not self.cond.wait_for(lambda: self.queue or self.failure, timeout):
                return None
            if self.failure is not None and not self.queue:
                raise OperationFailed(self.failure)
            item = self.queue.popleft()
            if isinstance(item, ExecOutput):
                self.handed_out += len(item.data)
            return item

    def take_stdin(self) -> None:
        """``hold`` starts reading its stdin."""
        with self.cond:
            self.reading = True
            self.cond.notify_all()

    def write_stdin(self, data: bytes) -> None:
        with self.cond:
            # As the agent's credit wait: until the command reads, it ends, or it fails.
            self.cond.wait_for(lambda: self.reading or self.ended or self.failure)
            if self.ended:
                return
            self._check()
            self.stdin += data
            if command(self.request.argv)[0] == "cat" and not self.ended:
                self._out(data)
            if self.request.pty is not None and b"\x03" in data:
                self._signal(signals.SIGINT)
            self.cond.notify_all()

    def close_stdin(self) -> None:
        with self.cond:
            self._check()
            self.stdin_closed = True
            if command(self.request.argv)[0] == "cat":
                self._exit(code=0)
            elif command(self.request.argv)[0] == "hold" and not self.ended:
                self._out(b"%d\n" % len(self.stdin))
                self._exit(code=0)

    def signal(self, signo: int) -> None:
        with self.cond:
            self._check()
            self._signal(signo)

    def _signal(self, signo: int) -> None:
        self.signals.append(signo)
        if command(self.request.argv)[0] in ("sleep", "cat", "flood", "hold"):
            self.flood_left = 0
            self._exit(signal=signo)

    def resize(self, rows: int, cols: int) -> None:
        with self.cond:
            self._check()
            self.resizes.append((rows, cols))

    def abandon(self) -> None:
        with self.cond:
            self.abandoned = True
            self.signals.append(signals.SIGHUP)
            if not self.ended:
                self.signals.append(signals.SIGKILL)
                self.flood_left = 0
                self._exit(signal=signals.SIGKILL)

    def _check(self) -> None:
        if self.failure is not None:
            raise OperationFailed(self.failure)

    def release(self) -> None:
        """The VM's runtime was released under the exec."""
        with self.cond:
            self.failure = self.failure or "the VM was stopped (its runtime released)"
            self.queue.clear()
            self.cond.notify_all()
