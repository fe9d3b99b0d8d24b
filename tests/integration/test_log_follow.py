"""`banger vm logs -f`: a real CLI process follows the serial log of a fake VM that the
test writes to, through the daemon's log stream (in this process: its fds and threads
are this process's)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from banger.host.seriallog import ROTATIONS, _rotate_if_over, rotate_if_over
from tests.integration.conftest import Daemon

WAIT = 30.0  # a fail-safe, never a measure


class Follower:
    """`banger vm logs ARGS...` as a process, its output collected as it comes."""

    def __init__(self, *args: str) -> None:
        # SIGINT as a terminal's Ctrl-C finds it: a test run started in the background of
        # a non-interactive shell (`pytest &`) has SIGINT ignored, and its children inherit
        # that (the CLI, rightly, keeps an ignored SIGINT ignored).
        self.proc = subprocess.Popen([sys.executable, "-m", "banger.cli.main", "vm", "logs",
                                      *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     preexec_fn=_default_sigint)
        self.out = bytearray()
        self.err = bytearray()
        self._readers = [threading.Thread(target=self._read, args=(s, b), daemon=True)
                         for s, b in ((self.proc.stdout, self.out),
                                      (self.proc.stderr, self.err))]
        for t in self._readers:
            t.start()

    @staticmethod
    def _read(src: object, into: bytearray) -> None:
        assert hasattr(src, "read1")
        while chunk := src.read1(1 << 16):
            into.extend(chunk)

    def wait_for(self, text: bytes) -> None:
        until(lambda: text in self.out, f"{text!r} in the output {bytes(self.out[-300:])!r}"
              f" (stderr {bytes(self.err)!r})")

    def end(self) -> int:
        try:
            rc = self.proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            where = _process_state(self.proc.pid)
            self.proc.kill()
            raise AssertionError(f"the CLI did not exit within {WAIT} s: {where}; stderr "
                                 f"{bytes(self.err[-500:])!r}") from None
        for t in self._readers:
            t.join(WAIT)
        for pipe in (self.proc.stdout, self.proc.stderr):
            assert pipe is not None
            pipe.close()
        return rc


def _process_state(pid: int) -> str:
    """Where a process that does not exit is: its state, kernel wait channel and signal
    masks (a SIGINT pending but blocked or ignored shows here), for a failure's message."""
    parts = []
    with contextlib.suppress(OSError):
        parts.append("wchan=" + Path(f"/proc/{pid}/wchan").read_text())
    with contextlib.suppress(OSError):
        parts += [line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                  if line.startswith(("State", "Threads", "SigPnd", "ShdPnd", "SigBlk",
                                      "SigIgn", "SigCgt", "VmSwap"))]
    return ", ".join(parts)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def until(ok: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not ok():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.02)


@pytest.fixture
def box(daemon: Daemon) -> Iterator[Path]:
    """A running (fake) VM named box; its serial log, which the test writes."""
    daemon.client.create({"name": "box"}, lambda _: None)
    log = daemon.service.show("box").paths.serial_log
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_bytes(b"")
    yield log


def append(log: Path, data: bytes) -> None:
    with log.open("ab") as f:
        f.write(data)


def test_follow_prints_appended_lines_and_ends_when_the_vm_stops(daemon: Daemon,
                                                                  box: Path) -> None:
    append(box, b"boot line 1\n")
    f = Follower("-f", "box")
    f.wait_for(b"boot line 1\n")
    append(box, b"login: ")
    f.wait_for(b"login: ")
    append(box, b"\nlast words\n")
    daemon.client.stop("box")
    assert f.end() == 0, f.err
    assert bytes(f.out) == b"boot line 1\nlogin: \nlast words\n"


def test_follow_of_a_stopped_vm_prints_what_is_there_and_ends(daemon: Daemon,
                                                              box: Path) -> None:
    daemon.client.stop("box")
    append(box, b"it was\nall there\n")
    f = Follower("-f", "box")
    assert f.end() == 0, f.err
    assert bytes(f.out) == b"it was\nall there\n"


def test_lines_shows_the_last_n_then_follows(daemon: Daemon, box: Path) -> None:
    append(box, b"".join(b"line %d\n" % i for i in range(100)))
    f = Follower("-n", "3", "-f", "box")
    f.wait_for(b"line 99\n")
    append(box, b"line 100\n")
    f.wait_for(b"line 100\n")
    daemon.client.stop("box")
    assert f.end() == 0
    assert bytes(f.out) == b"line 97\nline 98\nline 99\nline 100\n"
    once = Follower("-n", "2", "box")  # without -f: those lines, and the end
    assert once.end() == 0
    assert bytes(once.out) == b"line 99\nline 100\n"


A, B, C = b"A" * 50 + b"\n", b"B" * 5000 + b"\n", b"C" * 70 + b"\n"


def _rotate_unread(daemon: Daemon, box: Path, cap: int) -> Follower:
    """A follower has read A; B is written and rotated at ``cap`` before it can read it
    (it cannot read the live file while the lock is held: B reaches it only through the
    rotation's copy); then C; then the VM stops."""
    rotated = daemon.service.show("box").paths.serial_log_rotated
    append(box, A)
    f = Follower("-f", "--raw", "box")
    f.wait_for(A)
    with ROTATIONS.lock:
        append(box, B)
        assert _rotate_if_over(box, rotated, cap)
    append(box, C)
    f.wait_for(C)
    daemon.client.stop("box")
    assert f.end() == 0
    return f


def test_follow_reads_through_a_rotation_without_loss_or_repeat(daemon: Daemon,
                                                                box: Path) -> None:
    f = _rotate_unread(daemon, box, len(B) + 10)
    assert bytes(f.out) == A + B + C
    assert f.err == b""


def test_follow_behind_by_more_than_a_rotation_says_what_it_skipped(daemon: Daemon,
                                                                    box: Path) -> None:
    f = _rotate_unread(daemon, box, 1000)  # keeps only B's last 1000 bytes
    assert bytes(f.out) == A + B[-1000:] + C
    assert b"4001 bytes of the log rotated away" in f.err


def test_follow_under_many_rotations_never_repeats_or_reorders(daemon: Daemon,
                                                               box: Path) -> None:
    # Writes and rotations race the follower (not each other: the copy's lost window is
    # the rotation's own, not the follower's): lines stay in order, none twice, and
    # all of them unless the follower says it skipped some.
    rotated = daemon.service.show("box").paths.serial_log_rotated
    append(box, b"go\n")
    f = Follower("-f", "--raw", "box")
    f.wait_for(b"go\n")
    n, rotations = 20000, 0
    for i in range(n):
        append(box, b"%06d\n" % i)
        if i % 500 == 499:
            rotations += rotate_if_over(box, rotated, 16384)
    f.wait_for(b"%06d\n" % (n - 1))
    assert rotations > 5
    daemon.client.stop("box")
    assert f.end() == 0
    got = bytes(f.out).split()[1:]
    if b"rotated away" not in f.err:
        assert got == [b"%06d" % i for i in range(n)]
    else:  # a skip may start mid-line: whole lines only
        whole = [int(x) for x in got if len(x) == 6]
        assert len(whole) == len(set(whole)), "a line came twice"


def test_escapes_are_shown_unless_raw(daemon: Daemon, box: Path) -> None:
    osc52 = b"\x1b]52;c;cm0gLXJmIH4=\x07"
    append(box, b"before " + osc52 + b" after \xc2\x9b2J\n")
    f = Follower("-f", "box")
    f.wait_for(b"after")
    daemon.client.stop("box")
    assert f.end() == 0
    assert b"\x1b" not in f.out and b"\x07" not in f.out and b"\xc2\x9b" not in f.out
    assert bytes(f.out) == b"before \\x1b]52;c;cm0gLXJmIH4=\\x07 after \\x9b2J\n"
    raw = Follower("-f", "--raw", "box")
    assert raw.end() == 0
    assert osc52 in raw.out


def test_a_daemon_that_stops_ends_the_follow(daemon: Daemon, box: Path) -> None:
    # uvicorn waits for every response to end before it exits: a follow of a VM that
    # runs on must end when the daemon stops, or the daemon never would.
    append(box, b"up\n")
    f = Follower("-f", "box")
    f.wait_for(b"up\n")
    daemon.stopping.set()
    assert f.end() == 1
    assert b"bangerd is stopping" in f.err
    until(lambda: _stream_fds(box) == 0, "the daemon closed the serial log")


def test_follow_into_a_pipe_whose_reader_left_ends_quietly(daemon: Daemon,
                                                           box: Path) -> None:
    append(box, b"first\n")
    proc = subprocess.Popen([sys.executable, "-m", "banger.cli.main", "vm", "logs", "-f",
                             "box"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline() == b"first\n"
    proc.stdout.close()  # `| head -1`
    append(box, b"more\n" * 1000)
    assert proc.wait(WAIT) == 141
    assert proc.stderr.read() == b""
    proc.stderr.close()
    until(lambda: _stream_fds(box) == 0, "the daemon closed the serial log")


def test_follow_of_the_vmm_log(daemon: Daemon, box: Path) -> None:
    vmm_log = daemon.service.show("box").paths.vmm_log
    vmm_log.write_bytes(b"qemu: one\n")
    f = Follower("-f", "--vmm", "box")
    f.wait_for(b"qemu: one\n")
    append(vmm_log, b"qemu: two\n")
    f.wait_for(b"qemu: two\n")
    daemon.client.stop("box")
    assert f.end() == 0
    assert bytes(f.out) == b"qemu: one\nqemu: two\n"


def _stream_fds(path: Path) -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        n += target.startswith(str(path))
    return n


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_ctrl_c_ends_the_cli_quietly_and_frees_the_daemons_stream(daemon: Daemon,
                                                                  box: Path) -> None:
    append(box, b"hello\n")
    daemon.client.health()  # the server's own first-use fds and threads, before counting
    fds, threads = _fd_count(), threading.active_count()
    f = Follower("-f", "box")
    f.wait_for(b"hello\n")
    until(lambda: _stream_fds(box) == 1, "the stream holds the serial log open")
    f.proc.send_signal(signal.SIGINT)
    assert f.end() == 130
    assert b"Traceback" not in f.err and f.err == b"", f.err
    until(lambda: _stream_fds(box) == 0, "the daemon closed the serial log")
    # The reader threads of `Follower` have ended (end() joined them).
    until(lambda: threading.active_count() <= threads, "the daemon's threads are back")
    until(lambda: _fd_count() <= fds, "the daemon's fds are back")
