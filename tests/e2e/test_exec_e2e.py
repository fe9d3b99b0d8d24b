"""Commands through the guest agent and the daemon's exec WebSocket on real VMs
(`vm exec`, `vm run -- CMD`): exit codes and 128+n, argv intact, stdin piped through,
output past the agent's old 16 MiB cap, a pty with the terminal's size, Ctrl-C with and
without a pty, an agent killed during an exec, a stop during an exec, Ctrl-C and a late
reader with stdin waiting; and never ssh."""

from __future__ import annotations

import fcntl
import os
import pty
import signal
import struct
import subprocess
import termios
import time
from typing import Any

import pytest

from tests.e2e.conftest import Banger
from tests.e2e.test_interrupt_e2e import _drain, _read_until

pytestmark = pytest.mark.e2e


def _in_pty(banger: Banger, *args: str, rows: int = 24, cols: int = 80,
            send: bytes | None = None, after: bytes = b"", timeout: float = 120
            ) -> tuple[int, bytes]:
    """Run banger on a real pty of ``rows`` x ``cols``: its exit status and what it
    printed. ``send`` is typed once ``after`` has been printed."""
    pid, master = pty.fork()
    if pid == 0:  # the child: its terminal gets the size, then it becomes banger
        fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        os.execve(banger.python, banger.argv(*args), banger.env)
    try:
        out = b""
        if send is not None:
            out = _read_until(master, (after,), timeout)
            os.write(master, send)
        rest, rc = _drain(master, pid, timeout)
    finally:
        os.close(master)
    return rc, out + rest


def test_exec_through_the_agent(banger: Banger) -> None:
    banger.run("vm", "run", "-d", "--name", "box")
    # No ssh anywhere on the CLI's PATH: a command that used ssh would fail.
    no_ssh = Banger(banger.home, {**banger.env, "PATH": "/nonexistent"})
    assert no_ssh.run("vm", "exec", "box", "--", "true").returncode == 0

    def code(*argv: str) -> int:
        return no_ssh.run("vm", "exec", "box", "--", *argv, check=False).returncode

    assert code("false") == 1
    assert code("sh", "-c", "exit 42") == 42
    assert code("sh", "-c", "kill -TERM $$") == 128 + signal.SIGTERM
    proc = no_ssh.run("vm", "exec", "box", "--", "nosuchcommand", check=False)
    assert proc.returncode == 1 and "nosuchcommand" in proc.stderr
    # argv arrives intact (no shell on either side); the default env; cwd /root.
    out = no_ssh.run("vm", "exec", "box", "--", "printf", "%s|", "a b", "c'd", "$HOME")
    assert out.stdout == "a b|c'd|$HOME|"
    out = no_ssh.run("vm", "exec", "box", "--", "sh", "-c", 'echo "$HOME $LANG"; pwd')
    assert out.stdout == "/root C.UTF-8\n/root\n"
    # stdout and stderr stay apart.
    both = no_ssh.run("vm", "exec", "box", "--", "sh", "-c", "echo out; echo err >&2")
    assert both.stdout == "out\n" and both.stderr == "err\n"
    # stdin is piped through, its end closes the command's.
    assert no_ssh.run("vm", "exec", "box", "--", "cat", input="data").stdout == "data"
    big = "x" * 3_000_000
    assert no_ssh.run("vm", "exec", "box", "--", "wc", "-c", input=big).stdout.strip() \
        == "3000000"
    # Output is streamed whole, past the agent client's old per-exec cap (16 MiB).
    n = 20 << 20
    proc = subprocess.run(no_ssh.argv("vm", "exec", "box", "--", "head", "-c", str(n),
                                      "/dev/zero"), env=no_ssh.env, capture_output=True,
                          timeout=600)
    assert proc.returncode == 0 and len(proc.stdout) == n, proc.stderr[-500:]
    # vm run -- CMD goes through the agent too.
    proc = no_ssh.run("vm", "run", "--rm", "--", "sh", "-c", "exit 7", check=False)
    assert proc.returncode == 7, proc.stderr


def test_pty_size_and_ctrl_c(banger: Banger) -> None:
    banger.run("vm", "run", "-d", "--name", "tty")
    rc, out = _in_pty(banger, "vm", "exec", "tty", "--", "stty", "size", rows=37, cols=101)
    assert rc == 0 and b"37 101" in out, out
    rc, out = _in_pty(banger, "vm", "exec", "tty", "--", "sh", "-c", "tty; echo $TERM")
    assert rc == 0 and b"/dev/pts/" in out, out
    # Ctrl-C is the byte ^C through the pty: the guest's tty driver signals `sleep`.
    rc, out = _in_pty(banger, "vm", "exec", "tty", "--", "sh", "-c",
                      "echo ready; exec sleep 100", send=b"\x03", after=b"ready")
    assert rc == 128 + signal.SIGINT, out
    # Without a pty, SIGINT to banger is sent to the guest command.
    assert _interrupted(banger, "tty", subprocess.DEVNULL) == 128 + signal.SIGINT


def _interrupted(banger: Banger, vm: str, stdin: Any) -> int:
    """`vm exec VM -- sleep` (``stdin`` piped to it) sent SIGINT once it runs: banger's
    exit status."""
    proc = subprocess.Popen(banger.argv("vm", "exec", vm, "--", "sh", "-c",
                                        "echo ready; exec sleep 600"), env=banger.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=stdin)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    proc.send_signal(signal.SIGINT)
    return proc.wait(60)


def test_a_stop_during_an_exec_ends_it_with_an_error(banger: Banger) -> None:
    banger.run("vm", "run", "-d", "--name", "st")
    # The agent killed under its exec (its parent): init respawns it, its new HELLO ends
    # the exec with a clear error, and the next exec reconnects.
    proc = banger.run("vm", "exec", "st", "--", "sh", "-c",
                      "kill -KILL $PPID; exec sleep 30", check=False)
    assert proc.returncode == 1 and "guest agent restarted" in proc.stderr, proc.stderr
    assert banger.run("vm", "exec", "st", "--", "echo", "again").stdout == "again\n"
    proc = subprocess.Popen(banger.argv("vm", "exec", "st", "--", "sh", "-c",
                                        "echo ready; exec sleep 300"), env=banger.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline() == b"ready\n"
    banger.run("vm", "stop", "st")
    assert proc.wait(60) == 1
    err = proc.stderr.read().decode()
    assert "'st' was stopped while the command ran" in err, err
    # The daemon goes on serving: the VM starts again and runs commands.
    banger.run("vm", "start", "st")
    assert banger.run("vm", "exec", "st", "--", "echo", "back").stdout == "back\n"


def test_ctrl_c_and_a_late_reader_with_stdin_waiting(banger: Banger) -> None:
    # `yes | banger vm exec box -- sleep 600`, then Ctrl-C: stdin the command never reads
    # must not hold back the signal; the command ends in the guest.
    banger.run("vm", "run", "-d", "--name", "in")
    yes = subprocess.Popen(["yes"], stdout=subprocess.PIPE)
    try:
        assert _interrupted(banger, "in", yes.stdout) == 128 + signal.SIGINT
    finally:
        yes.kill()
        yes.wait()
    deadline = time.monotonic() + 30
    left = banger.run("vm", "exec", "in", "--", "pgrep", "-x", "sleep", check=False)
    while left.returncode == 0 and time.monotonic() < deadline:
        time.sleep(1)
        left = banger.run("vm", "exec", "in", "--", "pgrep", "-x", "sleep", check=False)
    assert left.returncode == 1, left.stdout  # pgrep: no such process
    # A command that reads its stdin only after the host's old 30 s credit limit still
    # gets all of it (`seq 1e9 | vm exec -- sh -c 'sleep 40; wc -l'` used to hang).
    head = subprocess.Popen(["head", "-c", "50M", "/dev/zero"], stdout=subprocess.PIPE)
    try:
        proc = subprocess.run(banger.argv("vm", "exec", "in", "--", "sh", "-c",
                                          "sleep 35; wc -c"), env=banger.env,
                              stdin=head.stdout, capture_output=True, timeout=600)
    finally:
        head.kill()
        head.wait()
    assert proc.returncode == 0 and proc.stdout.strip() == b"52428800", proc.stderr[-500:]
