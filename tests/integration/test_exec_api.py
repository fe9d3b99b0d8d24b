"""The exec WebSocket end to end in one process: the real daemon app on its socket, the
real client and CLI (as a subprocess, with real stdin/stdout), scripted guest commands
(tests/fake_exec.py) behind the agent port."""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from banger.client import wsframe
from banger.client.execws import Event, ExecFailed, ExecLost, ExecSession, Exit, Output, open_exec
from banger.daemon.main import WS_SETTINGS
from banger.daemon.peercred import allowed_uids, peer_checked
from banger.daemon.sockets import bind_socket
from tests.fake_exec import CHUNK, FakeExec
from tests.integration.conftest import Daemon

pytestmark = pytest.mark.timeout(60)


def _cli(daemon: Daemon, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "banger.cli.main", *args], input=stdin,
                          capture_output=True, timeout=30, env=os.environ.copy())


def _running(daemon: Daemon, name: str = "box") -> None:
    daemon.client.create({"name": name}, lambda _: None)


def _execs(daemon: Daemon) -> list[FakeExec]:
    agent = daemon.service.host.agent
    return [ex for lst in agent.execs.values() for ex in lst]  # type: ignore[attr-defined]


def _until_exit(s: ExecSession) -> list[Event]:
    """Every event up to the exit (blocking reads); the session is closed after."""
    s.sock.setblocking(True)
    try:
        events = list(s.buffered())
        while not any(isinstance(e, Exit) for e in events):
            events += list(s.receive())
    finally:
        s.close()
    return events


def _collect(daemon: Daemon, ref: str, argv: list[str], stdin: bytes | None = None,
             tty: tuple[int, int] | None = None) -> tuple[list[Output], Exit | None]:
    s = open_exec(str(daemon.layout.daemon_socket), ref, argv, env=None, cwd=None, tty=tty)
    if stdin is not None:
        s.send_stdin(stdin)
        s.send_eof()
    events = _until_exit(s)
    out = [e for e in events if isinstance(e, Output)]
    ends = [e for e in events if isinstance(e, Exit)]
    return out, ends[0] if ends else None


def test_exit_codes_output_and_stdin(daemon: Daemon) -> None:
    _running(daemon)
    out, end = _collect(daemon, "box", ["echo", "hi", "there"])
    assert b"".join(o.data for o in out) == b"hi there\n" and end and end.returncode == 0
    assert _collect(daemon, "box", ["exit", "42"])[1] == Exit(42, None, 42)
    out, end = _collect(daemon, "box", ["err", "oops"])
    assert out == [Output("stderr", b"oops\n")] and end and end.returncode == 3
    out, end = _collect(daemon, "box", ["cat"], stdin=b"data")
    assert b"".join(o.data for o in out) == b"data" and end and end.returncode == 0


def test_the_request_reaches_the_guest_with_the_default_env(daemon: Daemon) -> None:
    _running(daemon)
    s = open_exec(str(daemon.layout.daemon_socket), "box", ["show"],
                  env={"TERM": "xterm", "A": "1"}, cwd="/root/repo", tty=(33, 101))
    events = _until_exit(s)
    shown = json.loads(b"".join(e.data for e in events if isinstance(e, Output)))
    assert shown["argv"] == ["show"] and shown["cwd"] == "/root/repo"
    assert shown["pty"] == [33, 101]
    assert shown["env"]["HOME"] == "/root" and shown["env"]["LANG"] == "C.UTF-8"
    assert shown["env"]["TERM"] == "xterm" and shown["env"]["A"] == "1"
    assert "/usr/bin" in shown["env"]["PATH"]


def test_refusals_are_errors_with_a_code(daemon: Daemon) -> None:
    daemon.client.create({"name": "off", "start": False}, lambda _: None)
    with pytest.raises(ExecFailed, match="not running") as exc:
        open_exec(str(daemon.layout.daemon_socket), "off", ["true"], env=None, cwd=None,
                  tty=None)
    assert exc.value.body.code == "conflict"
    with pytest.raises(ExecFailed) as nf:
        open_exec(str(daemon.layout.daemon_socket), "nope", ["true"], env=None, cwd=None,
                  tty=None)
    assert nf.value.body.code == "not_found"
    _running(daemon)
    with pytest.raises(ExecFailed, match="No such file"):
        open_exec(str(daemon.layout.daemon_socket), "box", ["nosuch"], env=None, cwd=None,
                  tty=None)
    with pytest.raises(ExecFailed, match="rows"):
        open_exec(str(daemon.layout.daemon_socket), "box", ["echo"], env=None, cwd=None,
                  tty=(0, 80))


def test_a_plain_get_is_told_to_upgrade_and_the_route_is_documented(daemon: Daemon) -> None:
    r = daemon.http.get("/v1/vms/box/exec")
    assert r.status_code == 426 and r.json()["error"]["code"] == "upgrade_required"
    doc = daemon.http.get("/openapi.json").json()
    op = doc["paths"]["/v1/vms/{ref}/exec"]["get"]
    assert "101" in op["responses"] and "WebSocket" in op["description"]
    assert '"type": "exit"' in op["description"]


def test_a_flood_streams_with_backpressure(daemon: Daemon) -> None:
    # 32 MiB through a client that reads slowly at first: the guest side is only asked for
    # more as the client takes it, so the daemon holds a few chunks, never the flood.
    _running(daemon)
    n = 512
    s = open_exec(str(daemon.layout.daemon_socket), "box", ["flood", str(n)], env=None,
                  cwd=None, tty=None)
    s.sock.setblocking(True)
    (ex,) = _execs(daemon)
    time.sleep(0.5)  # the client reads nothing meanwhile
    held = n * CHUNK - ex.flood_left * CHUNK - 0
    assert ex.flood_left > n - 64, f"the daemon ran ahead of its client ({held} bytes)"
    events = _until_exit(s)
    total = sum(len(e.data) for e in events if isinstance(e, Output))
    assert total == n * CHUNK and events[-1] == Exit(0, None, 0)


def test_client_gone_mid_exec_ends_the_command(daemon: Daemon) -> None:
    _running(daemon)
    s = open_exec(str(daemon.layout.daemon_socket), "box", ["sleep"], env=None, cwd=None,
                  tty=None)
    (ex,) = _execs(daemon)
    s.close()
    deadline = time.monotonic() + 10
    while not ex.abandoned and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ex.abandoned and ex.signals[:1] == [1]  # SIGHUP first
    assert ex.ended
    assert not [t for t in threading.enumerate() if t.name.startswith("exec-")
                and t.is_alive() and _lingers(t)]


def _lingers(t: threading.Thread) -> bool:
    t.join(3)
    return t.is_alive()


def _pump(s: ExecSession, seconds: float = 15.0,
          tick: Callable[[], None] | None = None) -> list[Event]:
    """Send and receive (non-blocking, as the CLI does) until the exit or ``seconds``."""
    events = list(s.buffered())
    end = time.monotonic() + seconds
    while not any(isinstance(e, Exit) for e in events) and time.monotonic() < end:
        readable, writable, _ = select.select([s], [s] if s.wants_write() else [], [], 0.1)
        if writable:
            s.flush()
        if readable:
            events += list(s.receive())
        if tick is not None:
            tick()
    return events


def _held(daemon: Daemon, argv: list[str] | None = None) -> tuple[ExecSession, FakeExec]:
    """``hold`` (reads no stdin until told) with 4 MiB of stdin sent at it."""
    _running(daemon)
    s = open_exec(str(daemon.layout.daemon_socket), "box", argv or ["hold"], env=None,
                  cwd=None, tty=None)
    (ex,) = _execs(daemon)
    s.send_stdin(bytes(4 << 20))
    _pump(s, 1.0)  # as much as the daemon takes
    return s, ex


def test_a_signal_reaches_a_command_that_reads_no_stdin(daemon: Daemon) -> None:
    # Ctrl-C on `yes | banger vm exec box -- sleep 600`: the signal must not wait
    # behind stdin the command never reads (in the client or the daemon).
    s, ex = _held(daemon)
    assert not ex.stdin and s.pending(), "stdin waits for the command"
    s.signal(2)
    events = _pump(s)
    s.close()
    assert events[-1:] == [Exit(None, 2, 130)] and ex.signals == [2]


def test_a_client_that_leaves_while_stdin_waits_ends_the_command(daemon: Daemon) -> None:
    s, ex = _held(daemon)
    s.close()
    deadline = time.monotonic() + 10
    while not ex.abandoned and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ex.abandoned and ex.ended, "the daemon saw the hang-up behind waiting stdin"
    assert not [t for t in threading.enumerate() if t.name.startswith("exec-")
                and t.is_alive() and _lingers(t)]


def test_a_late_reader_gets_all_of_a_big_stdin(daemon: Daemon) -> None:
    # `seq 1e9 | vm exec -- sh -c 'sleep 40; wc -l'`: stdin waits (bounded), then all
    # of it arrives once the command reads.
    s, ex = _held(daemon)
    s.send_stdin(bytes(12 << 20))
    s.send_eof()
    _pump(s, 1.0)
    assert not ex.stdin and not ex.ended
    ex.take_stdin()
    events = _pump(s, 40)
    s.close()
    out = b"".join(e.data for e in events if isinstance(e, Output))
    assert out == b"%d\n" % (16 << 20) and events[-1] == Exit(0, None, 0)


def test_a_client_gone_during_a_slow_start_ends_the_command(
        daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    # The client hangs up while the command starts (a reconnect to the agent): the
    # command that then starts must not run on unheard.
    _running(daemon)
    gate, asked = threading.Event(), threading.Event()
    real = daemon.agent.exec

    def slow_exec(**kw: Any) -> FakeExec:
        asked.set()
        gate.wait(10)
        return real(**kw)

    monkeypatch.setattr(daemon.agent, "exec", slow_exec)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(daemon.layout.daemon_socket))
    key = wsframe.new_key()
    sock.sendall(wsframe.upgrade_request("/v1/vms/box/exec", key))
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(4096)
    assert b" 101 " in head.split(b"\r\n", 1)[0]
    start = json.dumps({"argv": ["sleep"]}).encode()
    sock.sendall(wsframe.encode(wsframe.OP_TEXT, start, key=os.urandom(4)))
    assert asked.wait(10)
    sock.close()
    time.sleep(0.5)  # the daemon sees the close before the start answers
    gate.set()
    deadline = time.monotonic() + 10
    while not (_execs(daemon) and _execs(daemon)[0].abandoned) and time.monotonic() < deadline:
        time.sleep(0.05)
    (ex,) = _execs(daemon)
    assert ex.abandoned and ex.ended


def test_signal_and_resize_reach_the_command(daemon: Daemon) -> None:
    _running(daemon)
    s = open_exec(str(daemon.layout.daemon_socket), "box", ["sleep"], env=None, cwd=None,
                  tty=(24, 80))
    s.sock.setblocking(True)
    s.resize(40, 120)
    s.signal(15)
    events = list(s.buffered())
    while not events:
        events += list(s.receive())
    s.close()
    assert events == [Exit(None, 15, 143)]
    (ex,) = _execs(daemon)
    assert ex.resizes == [(40, 120)] and ex.signals == [15]


def test_an_agent_gone_mid_exec_is_an_error_and_other_vms_still_run(daemon: Daemon) -> None:
    _running(daemon)
    _running(daemon, "other")
    s = open_exec(str(daemon.layout.daemon_socket), "box", ["drop"], env=None, cwd=None,
                  tty=None)
    s.sock.setblocking(True)
    with pytest.raises(ExecFailed, match="agent") as exc:
        while True:
            list(s.receive())
    assert exc.value.body.code == "operation_failed"
    assert _collect(daemon, "other", ["exit", "7"])[1] == Exit(7, None, 7)


def test_a_stop_during_an_exec_ends_it_saying_so(daemon: Daemon) -> None:
    _running(daemon)
    s = open_exec(str(daemon.layout.daemon_socket), "box", ["sleep"], env=None, cwd=None,
                  tty=None)
    s.sock.setblocking(True)
    daemon.client.stop("box")
    with pytest.raises(ExecFailed, match="was stopped while the command ran"):
        while True:
            list(s.receive())


@pytest.mark.parametrize("foreign", [True, False], ids=["foreign-uid", "own-uid"])
def test_the_peer_check_covers_the_websocket(daemon: Daemon, tmp_path: Path,
                                             foreign: bool) -> None:
    # The daemon's app served as bangerd serves it (peer-checked h11, wsproto), allowing
    # only another uid (root, not configured): the upgrade is never read.
    _running(daemon)
    allowed = frozenset({os.geteuid() + 1}) if foreign else allowed_uids(False)
    path = tmp_path / "run" / "d.sock"
    bound = bind_socket(path)
    server = uvicorn.Server(uvicorn.Config(daemon.app, log_level="warning",
                                           http=peer_checked(allowed), **WS_SETTINGS))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [bound.sock]},
                              daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        if foreign:
            with pytest.raises(ExecLost):
                open_exec(str(path), "box", ["echo", "x"], env=None, cwd=None, tty=None)
            assert _execs(daemon) == []
        else:
            s = open_exec(str(path), "box", ["echo", "x"], env=None, cwd=None, tty=None)
            assert _until_exit(s)[-1] == Exit(0, None, 0)
    finally:
        server.should_exit = True
        thread.join(10)


def test_cli_exec_codes_stdin_and_streams(daemon: Daemon) -> None:
    _running(daemon)
    r = _cli(daemon, "vm", "exec", "box", "--", "exit", "42")
    assert r.returncode == 42, r.stderr
    r = _cli(daemon, "vm", "exec", "box", "--", "cat", stdin=b"piped data")
    assert r.returncode == 0 and r.stdout == b"piped data", r.stderr
    r = _cli(daemon, "vm", "exec", "box", "--", "err", "to stderr")
    assert r.returncode == 3 and r.stderr == b"to stderr\n" and r.stdout == b""
    r = _cli(daemon, "vm", "exec", "box", "--", "show")
    assert json.loads(r.stdout)["cwd"] == "/root"  # no workspace
    r = _cli(daemon, "vm", "exec", "box", "--", "nosuch")
    assert r.returncode == 1 and b"No such file" in r.stderr


def _cli_in_pty(*args: str, rows: int = 30, cols: int = 90) -> tuple[int, bytes, list[Any]]:
    """The CLI on a real pty: exit status, output, and the terminal's modes after."""
    import fcntl
    import pty
    import struct
    import termios

    from tests.e2e.test_interrupt_e2e import _drain
    pid, master = pty.fork()
    if pid == 0:
        fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        os.execve(sys.executable, [sys.executable, "-m", "banger.cli.main", *args],
                  {**os.environ, "TERM": "xterm-test"})
    try:
        out, rc = _drain(master, pid, 30)
        after = termios.tcgetattr(master)
    finally:
        os.close(master)
    return rc, out, after


def test_a_terminal_gets_a_pty_and_is_put_back_on_every_exit(daemon: Daemon) -> None:
    import termios
    _running(daemon)
    rc, out, modes = _cli_in_pty("vm", "exec", "box", "--", "show", rows=33, cols=99)
    assert rc == 0, out
    shown = json.loads(out[out.index(b"{"):].decode().replace("\r\n", "\n"))
    assert shown["pty"] == [33, 99] and shown["env"]["TERM"] == "xterm-test"
    assert modes[3] & termios.ECHO and modes[3] & termios.ICANON  # cooked again
    # The agent goes away mid-exec: an error, and the terminal is still put back.
    rc, out, modes = _cli_in_pty("vm", "exec", "box", "--", "drop")
    assert rc == 1 and b"agent" in out, out
    assert modes[3] & termios.ECHO and modes[3] & termios.ICANON
