"""A guest agent in Python for the host side's tests: it speaks protocol v1 over one end
of a socketpair, with a few scripted commands instead of processes.

- :class:`FakeAgent`: an honest agent (a thread). Its commands (argv[0]):
  ``echo ARGS…`` prints them; ``exit N``; ``cat`` copies stdin to stdout until EOF;
  ``both N`` prints N numbered lines alternately on stdout and stderr, several per frame;
  ``sleep`` runs until a SIGNAL and ends by it; ``flood`` prints until SIGKILL;
  ``show`` prints the EXEC it got (argv, env, cwd, pty, resizes) as JSON lines;
  ``stall`` starts and then never ends; anything else fails with EXEC_ERROR.
- :class:`RawGuest`: the other end of the socket for a test that plays a hostile guest
  frame by frame (or byte by byte).
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from banger.host.agent_proto import (
    Decoder,
    ExecTag,
    Frame,
    Kind,
    as_int,
    as_str,
    fields,
    frame,
    parse_fields,
)

BOOT_ID = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"


def hello_body(protocol: int = 1, boot_id: str = BOOT_ID, token: int | None = None) -> bytes:
    token_field = [] if token is None else [(4, token)]
    return fields([(1, protocol), (2, "0.1.0-fake"), (3, boot_id), *token_field])


@dataclass
class _Exec:
    argv: list[str]
    env: list[str]
    cwd: str
    pty: tuple[int, int] | None
    stdin: bytearray = field(default_factory=bytearray)
    resizes: list[tuple[int, int]] = field(default_factory=list)
    killed_by: int | None = None
    done: bool = False


class FakeAgent:
    """An honest agent on ``sock`` (the guest's end), running in a thread."""

    def __init__(self, sock: socket.socket, *, hello: bool = True) -> None:
        self.sock = sock
        self._send_lock = threading.Lock()
        self._execs: dict[int, _Exec] = {}
        self.received: list[Frame] = []
        self._threads: list[threading.Thread] = []
        self._thread = threading.Thread(target=self._run, args=(hello,),
                                        name="fake-agent", daemon=True)
        self._thread.start()

    def join(self, timeout: float = 5.0) -> None:
        self._thread.join(timeout)
        for t in self._threads:
            t.join(timeout)

    def send(self, kind: int, chan: int, body: bytes = b"") -> None:
        with self._send_lock:
            self.sock.sendall(frame(kind, chan, body))

    def _run(self, hello: bool) -> None:
        if hello:
            self.send(Kind.HELLO, 0, hello_body())
        decoder = Decoder()
        try:
            while data := self.sock.recv(1 << 16):
                for f in decoder.feed(data):
                    self.received.append(f)
                    self._handle(f)
        except OSError:
            pass
        finally:
            for ex in self._execs.values():
                ex.done = True
            self.sock.close()

    def _handle(self, f: Frame) -> None:
        simple = {Kind.PING: Kind.PONG, Kind.SYNC: Kind.DONE, Kind.POWEROFF: Kind.DONE,
                  Kind.TIME_SET: Kind.DONE}
        if f.kind in simple:
            self.send(simple[Kind(f.kind)], f.chan)
        elif f.kind == Kind.STATS_REQ:
            self.send(Kind.STATS, f.chan, fields(
                [(tag, tag * 100) for tag in range(1, 11)]
                + [(20, "/\t1000\t400\t600"), (20, "/root\t2000\t100\t1900"), (99, b"new")]))
        elif f.kind == Kind.HELLO_REQ:
            token = dict(parse_fields(f.body)).get(1)
            self.send(Kind.HELLO, 0, hello_body(token=None if token is None else as_int(token)))
        elif f.kind == Kind.EXEC:
            self._exec(f)
        elif f.chan not in self._execs or self._execs[f.chan].done:
            self.send(Kind.ERROR, f.chan, fields([(1, f"unknown chan {f.chan}")]))
        else:
            self._to_exec(f, self._execs[f.chan])

    def _exec(self, f: Frame) -> None:
        items = parse_fields(f.body)
        argv = [as_str(v) for t, v in items if t == ExecTag.ARG]
        env = [as_str(v) for t, v in items if t == ExecTag.ENV]
        cwd = next((as_str(v) for t, v in items if t == ExecTag.CWD), "/")
        rows = next((as_int(v) for t, v in items if t == ExecTag.PTY_ROWS), None)
        cols = next((as_int(v) for t, v in items if t == ExecTag.PTY_COLS), None)
        pty = (rows, cols) if rows is not None and cols is not None else None
        known = {"echo", "exit", "cat", "both", "sleep", "flood", "show", "stall"}
        if argv[0] not in known:
            self.send(Kind.EXEC_ERROR, f.chan,
                      fields([(1, f"execvp {argv[0]}: No such file or directory")]))
            return
        ex = self._execs[f.chan] = _Exec(argv, env, cwd, pty)
        self.send(Kind.STARTED, f.chan, fields([(1, 1000 + f.chan)]))
        name, args = argv[0], argv[1:]
        if name == "echo":
            self._out(f.chan, " ".join(args).encode() + b"\n")
            self._exit(f.chan, code=0)
        elif name == "exit":
            self._exit(f.chan, code=int(args[0]))
        elif name == "both":
            for i in range(int(args[0])):
                self.send(Kind.STDOUT if i % 2 == 0 else Kind.STDERR, f.chan,
                          f"line {i}\n".encode())
            self._exit(f.chan, code=0)
        elif name == "flood":
            self._spawn(self._flood, f.chan, ex)

    def _to_exec(self, f: Frame, ex: _Exec) -> None:
        name = ex.argv[0]
        if f.kind == Kind.STDIN:
            ex.stdin += f.body
            if name == "cat":
                self._out(f.chan, f.body)
        elif f.kind == Kind.STDIN_EOF:
            if name in ("cat", "show"):
                if name == "show":
                    self._show(f.chan, ex)
                self._exit(f.chan, code=0)
        elif f.kind == Kind.RESIZE:
            items = dict(parse_fields(f.body))
            ex.resizes.append((as_int(items[1]), as_int(items[2])))
        elif f.kind == Kind.SIGNAL:
            signo = as_int(dict(parse_fields(f.body))[1])
            if name == "flood":
                if signo == signal.SIGKILL:
                    ex.killed_by = signo
            elif name in ("sleep", "cat", "show"):
                self._exit(f.chan, signal=signo)

    def _show(self, chan: int, ex: _Exec) -> None:
        doc = {"argv": ex.argv, "env": ex.env, "cwd": ex.cwd, "pty": ex.pty,
               "resizes": ex.resizes, "stdin": ex.stdin.decode()}
        self._out(chan, json.dumps(doc).encode() + b"\n")

    def _flood(self, chan: int, ex: _Exec) -> None:
        chunk = b"y\n" * (1 << 15)
        try:
            while ex.killed_by is None and not ex.done:
                self._out(chan, chunk)
            self._exit(chan, signal=signal.SIGKILL)
        except OSError:
            pass

    def _spawn(self, fn: Callable[..., None], *args: object) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)
        self._threads.append(t)
        t.start()

    def _out(self, chan: int, data: bytes) -> None:
        self.send(Kind.STDOUT, chan, data)

    def _exit(self, chan: int, *, code: int | None = None, signal: int | None = None) -> None:
        ex = self._execs[chan]
        if ex.done:
            return
        ex.done = True
        self.send(Kind.EXIT, chan, fields([(1, code)] if code is not None else [(2, signal or 0)]))


class RawGuest:
    """The guest's end of the socket, driven by the test one frame (or byte) at a time."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._decoder = Decoder()
        self._frames: list[Frame] = []

    def send(self, kind: int, chan: int, body: bytes = b"") -> None:
        self.sock.sendall(frame(kind, chan, body))

    def recv(self, timeout: float = 5.0) -> Frame:
        """The next frame the host sent."""
        deadline = time.monotonic() + timeout
        while not self._frames:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = self.sock.recv(1 << 16)
            if not data:
                raise EOFError("the host closed the connection")
            self._frames += self._decoder.feed(data)
        return self._frames.pop(0)

    def closed_by_host(self, timeout: float = 5.0) -> bool:
        """True once the host has closed its end (reads reach EOF)."""
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(1 << 16):
                pass
        except (TimeoutError, OSError):
            return False
        return True
