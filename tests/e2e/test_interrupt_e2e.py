"""Ctrl-C, SIGHUP and SIGTERM to `banger vm run --rm` with real VMs: nothing is left."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import time

import pytest

from tests.e2e.conftest import Banger, assert_nothing_left, qemu_pids

pytestmark = pytest.mark.e2e

BOOT_STAGES = (b"qemu_launch", b"wait_agent")


def _read_until(fd: int, needles: tuple[bytes, ...], timeout: float) -> bytes:
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the child closed the pty
            break
        if not chunk:
            break
        out += chunk
        if any(n in out for n in needles):
            return out
    raise AssertionError(f"none of {needles} within {timeout:.0f} s; output:\n{out!r}")


def _drain(fd: int, pid: int, timeout: float) -> tuple[bytes, int]:
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                chunk = b""
            out += chunk
            if chunk:
                continue
        if done:
            return out, os.waitstatus_to_exitcode(status)
    os.kill(pid, signal.SIGKILL)
    raise AssertionError(f"the CLI did not exit within {timeout:.0f} s; output:\n{out!r}")


def _signal_when(banger: Banger, args: tuple[str, ...], needles: tuple[bytes, ...], sig: int,
                 *, on_stdout: bool = False) -> tuple[int, str]:
    """`banger vm run --rm ARGS` on pipes, sent ``sig`` once its stderr (or stdout)
    shows a needle; its exit code and output."""
    proc = subprocess.Popen(banger.argv("vm", "run", "--rm", *args), env=banger.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    assert proc.stderr is not None and proc.stdout is not None
    try:
        watched = proc.stdout if on_stdout else proc.stderr
        seen = _read_until(watched.fileno(), needles, 300)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, (seen + out + err).decode(errors="replace")


def _assert_no_vm(banger: Banger) -> None:
    assert json.loads(banger.run("vm", "list", "--json").stdout) == [], "a VM is left"
    assert qemu_pids(str(banger.home)) == [], "a QEMU process is left"
    assert_nothing_left(banger)


def test_ctrl_c_in_a_pty_during_boot_of_run_rm_leaves_no_vm(banger: Banger) -> None:
    banger.run("vm", "list")  # the daemon is up: the pty sees only the boot
    pid, fd = pty.fork()
    if pid == 0:  # the child: the real CLI on the pty, as a user at a terminal runs it
        argv = banger.argv("vm", "run", "--rm", "--name", "ctrlc", "--", "true")
        os.execvpe(argv[0], argv, banger.env)
    try:
        _read_until(fd, BOOT_STAGES, 300)
        os.write(fd, b"\x03")  # Ctrl-C: the terminal sends SIGINT to the foreground group
        out, code = _drain(fd, pid, 300)
    finally:
        os.close(fd)
    text = out.decode(errors="replace")
    assert code == 130, text
    assert "cancelling op-" in text and "cancelled" in text, text
    assert qemu_pids(str(banger.home)) == []
    _assert_no_vm(banger)


def test_a_second_ctrl_c_leaves_at_once_and_the_daemon_deletes_the_vm(
        banger: Banger) -> None:
    banger.run("vm", "list")
    pid, fd = pty.fork()
    if pid == 0:
        argv = banger.argv("vm", "run", "--rm", "--name", "twice", "--", "true")
        os.execvpe(argv[0], argv, banger.env)
    try:
        _read_until(fd, (b"wait_agent",), 300)
        os.write(fd, b"\x03")
        _read_until(fd, (b"cancelling op-",), 30)
        os.write(fd, b"\x03")  # impatient: leave now
        started = time.monotonic()
        out, code = _drain(fd, pid, 30)
    finally:
        os.close(fd)
    assert code == 130, out
    assert time.monotonic() - started < 5, "a second Ctrl-C leaves at once"
    # The stream closed: the daemon cancels the boot and deletes the --rm VM itself.
    deadline = time.monotonic() + 120
    while json.loads(banger.run("vm", "list", "--json").stdout):
        assert time.monotonic() < deadline, "the daemon did not delete the --rm VM"
        time.sleep(0.5)
    _assert_no_vm(banger)
    log = (banger.home / "state" / "bangerd.log").read_text()
    assert "deleting twice: its client went away" in log, "the daemon, not the CLI, deleted it"


def test_sighup_during_boot_of_run_rm_leaves_no_vm(banger: Banger) -> None:
    code, err = _signal_when(banger, ("--name", "hup", "--", "true"), BOOT_STAGES,
                             signal.SIGHUP)  # the terminal went away
    assert code == 128 + signal.SIGHUP, err
    _assert_no_vm(banger)


def test_sigterm_while_the_guest_command_runs_deletes_the_vm(banger: Banger) -> None:
    # Signalled once the guest command said it runs.
    code, err = _signal_when(banger, ("--name", "term", "--", "sh", "-c",
                                      "echo in-guest; exec sleep 600"),
                             (b"in-guest",), signal.SIGTERM, on_stdout=True)
    assert code == 128 + signal.SIGTERM, err
    _assert_no_vm(banger)
