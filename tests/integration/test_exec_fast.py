"""`vm exec`'s one connection: the client's own WebSocket framer (banger.client.wsframe)
against the real daemon app (uvicorn's wsproto), what its "started" says, the workspace
mode, what the CLI does not import on that path, the autostart fallback; and servers
that misbehave (stall, refuse, break the protocol), each a clear error within a bound."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from banger.client import execws, wsframe
from banger.client.errors import DaemonUnavailable
from banger.client.execws import ExecFailed, ExecLost, Exit, Output, open_exec, start_exec
from banger.core.execs import IN_TOOLS
from banger.model.layout import Layout
from tests.integration.conftest import Daemon
from tests.integration.test_exec_api import _running, _until_exit

pytestmark = pytest.mark.timeout(60)


def _workspace(daemon: Daemon, repo: Path, head: str) -> None:
    repo_ = daemon.service.ctx.repo
    vm = repo_.by_name("box")
    assert vm is not None
    repo_.update(dataclasses.replace(vm, workspace_path=str(repo), workspace_head=head,
                                     workspace_guest_path="/root/proj"))


def _git_repo(path: Path) -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(path), *args], check=True,
                              capture_output=True, text=True).stdout.strip()
    path.mkdir()
    git("init", "-q")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty",
        "-m", "one")
    return git("rev-parse", "HEAD")


def test_started_names_the_vm_and_the_workspace_mode_wraps_the_command(
        daemon: Daemon, tmp_path: Path) -> None:
    _running(daemon)
    sock = str(daemon.layout.daemon_socket)
    s = open_exec(sock, "box", ["show"], env=None, cwd=None, tty=None, in_workspace=True)
    vm = daemon.service.ctx.repo.by_name("box")
    assert vm is not None and s.started.id == vm.id and s.started.name == "box"
    assert s.started.workspace_guest_path is None
    shown = json.loads(b"".join(e.data for e in _until_exit(s) if isinstance(e, Output)))
    assert shown["argv"] == ["show"] and shown["cwd"] == "/root"  # no workspace: as is
    head = _git_repo(tmp_path / "proj")
    _workspace(daemon, tmp_path / "proj", head)
    s = open_exec(sock, "box", ["show", "x"], env=None, cwd=None, tty=None, in_workspace=True)
    assert s.started.workspace_path == str(tmp_path / "proj")
    assert s.started.workspace_head == head
    shown = json.loads(b"".join(e.data for e in _until_exit(s) if isinstance(e, Output)))
    assert shown["argv"] == ["sh", "-c", IN_TOOLS, "banger-exec", "show", "x"]
    assert shown["cwd"] == "/root/proj"
    s = open_exec(sock, "box", ["show"], env=None, cwd="/tmp", tty=None, in_workspace=True)
    assert json.loads(b"".join(e.data for e in _until_exit(s)
                               if isinstance(e, Output)))["cwd"] == "/tmp"
    s = open_exec(sock, "box", ["show"], env=None, cwd=None, tty=None)  # the API's default
    assert json.loads(b"".join(e.data for e in _until_exit(s)
                               if isinstance(e, Output)))["argv"] == ["show"]


def test_cli_exec_warns_when_head_moved_and_runs_in_the_workspace(
        daemon: Daemon, tmp_path: Path) -> None:
    _running(daemon)
    _git_repo(tmp_path / "proj")
    _workspace(daemon, tmp_path / "proj", "0" * 40)  # copied at another commit
    r = subprocess.run([sys.executable, "-m", "banger.cli.main", "vm", "exec", "box", "--",
                        "show"], capture_output=True, timeout=30, env=os.environ.copy())
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["cwd"] == "/root/proj"
    err = " ".join(r.stderr.decode().split())  # as the console wrapped it
    assert "HEAD moved since the workspace was copied (000000000000 ->" in err
    assert "banger vm workspace prepare box" in err


# What `vm exec` must not load: the HTTP client (http.client, email), wsproto and h11,
# and the client's answer types; `--version` loads none of them either.
NOT_ON_EXEC = {"http", "email", "wsproto", "h11", "banger.client.client",
               "banger.client.types"}


def test_cli_exec_imports_neither_the_http_client_nor_wsproto(daemon: Daemon) -> None:
    _running(daemon)
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "banger.cli.main", "vm",
                        "exec", "box", "--", "echo", "hi"], capture_output=True, text=True,
                       timeout=30, env=os.environ.copy())
    assert r.returncode == 0 and r.stdout == "hi\n", r.stderr
    mods = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines()
            if line.startswith("import time:")}
    assert "banger.client.execws" in mods  # the list is real
    loaded = {m for m in mods if m in NOT_ON_EXEC or m.split(".")[0] in NOT_ON_EXEC}
    assert not loaded, sorted(loaded)


def test_start_exec_asks_nothing_else_of_a_running_daemon(daemon: Daemon) -> None:
    _running(daemon)

    def no_connect(layout: Layout) -> None:
        raise AssertionError("connect() (its /health) is for a daemon not running")
    s = start_exec("box", ["echo", "x"], env=None, cwd=None, tty=None,
                   layout=daemon.layout, connect=no_connect)
    assert Exit(0, None, 0) in _until_exit(s)


def test_start_exec_starts_the_daemon_through_connect_when_none_listens(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BANGER_HOME", str(tmp_path / "h"))
    layout = Layout.for_user()
    layout.runtime_dir.mkdir(parents=True, mode=0o700)
    calls: list[Layout] = []
    with pytest.raises(DaemonUnavailable, match="not answering"):
        start_exec("box", ["true"], env=None, cwd=None, tty=None, layout=layout,
                   connect=calls.append)
    assert calls == [layout]  # connect's autostart, then the exec once more


# ---- servers that misbehave ------------------------------------------------------------

Serve = Callable[[socket.socket], None]


@pytest.fixture
def fake_daemon(tmp_path: Path) -> Iterator[Callable[[Serve], str]]:
    """A Unix socket (served by this user, so the peer check passes) whose one
    connection ``serve`` answers as it likes."""
    socks: list[socket.socket] = []
    threads: list[threading.Thread] = []

    def start(serve: Serve) -> str:
        path = str(tmp_path / f"d{len(socks)}.sock")
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(path)
        srv.listen(1)
        socks.append(srv)

        def run() -> None:
            conn, _ = srv.accept()
            socks.append(conn)
            with contextlib.suppress(OSError):
                serve(conn)
        t = threading.Thread(target=run, daemon=True)
        t.start()
        threads.append(t)
        return path

    yield start
    for s in socks:
        s.close()
    for t in threads:
        t.join(5)


def _read_request(conn: socket.socket) -> str:
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = conn.recv(4096)
        if not data:
            break
        buf += data
    for line in buf.decode().split("\r\n"):
        if line.lower().startswith("sec-websocket-key:"):
            return line.split(":", 1)[1].strip()
    return ""


def _accept(conn: socket.socket, key: str, accept: str | None = None) -> None:
    conn.sendall(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                  "Connection: Upgrade\r\nSec-WebSocket-Accept: "
                  f"{accept or wsframe.accept_for(key)}\r\n\r\n").encode())


def _stall(conn: socket.socket) -> None:
    threading.Event().wait(10)


def _open(path: str) -> None:
    open_exec(path, "box", ["true"], env=None, cwd=None, tty=None)


def test_a_daemon_that_stalls_in_the_handshake(fake_daemon: Callable[[Serve], str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(execws, "HANDSHAKE_TIMEOUT", 0.3)
    def serve(c: socket.socket) -> None:
        _read_request(c)
        _stall(c)
    path = fake_daemon(serve)
    with pytest.raises(ExecLost, match="did not take the exec"):
        _open(path)


def test_a_daemon_that_stalls_before_started(fake_daemon: Callable[[Serve], str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(execws, "START_TIMEOUT", 0.3)
    def serve(c: socket.socket) -> None:
        _accept(c, _read_request(c))
        _stall(c)
    path = fake_daemon(serve)
    with pytest.raises(ExecLost, match="did not start within"):
        _open(path)


def test_a_wrong_accept_key_is_refused(fake_daemon: Callable[[Serve], str]) -> None:
    path = fake_daemon(lambda c: _accept(c, _read_request(c), accept="bm9wZQ=="))
    with pytest.raises(ExecLost, match="Accept does not match"):
        _open(path)


def test_an_endless_answer_head_is_refused(fake_daemon: Callable[[Serve], str]) -> None:
    def serve(c: socket.socket) -> None:
        _read_request(c)
        c.sendall(b"HTTP/1.1 101 x\r\n" + b"X-Y: z\r\n" * 5000)
        _stall(c)
    with pytest.raises(ExecLost, match="head is longer than"):
        _open(fake_daemon(serve))


def test_a_refusal_with_the_daemon_error_body(fake_daemon: Callable[[Serve], str]) -> None:
    body = json.dumps({"error": {"code": "conflict", "message": "box is stopped"}}).encode()

    def serve(c: socket.socket) -> None:
        _read_request(c)
        c.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    with pytest.raises(ExecFailed, match="box is stopped") as exc:
        _open(fake_daemon(serve))
    assert exc.value.body.code == "conflict" and exc.value.status == 409


@pytest.mark.parametrize("frame", [
    bytes((0x82, 127)) + (1 << 40).to_bytes(8, "big"),  # a terabyte announced
    bytes((0x83, 1)) + b"x",  # opcode 3
    bytes((0x81, 3)) + b"\xff\xfe\xfd",  # text that is not UTF-8 (nor JSON)
])
def test_hostile_frames_after_the_upgrade(fake_daemon: Callable[[Serve], str],
                                          frame: bytes) -> None:
    def serve(c: socket.socket) -> None:
        _accept(c, _read_request(c))
        c.sendall(frame)
        _stall(c)
    with pytest.raises(ExecLost, match=r"broke the WebSocket protocol|not JSON"):
        _open(fake_daemon(serve))


def test_a_ping_is_answered_and_a_close_before_started_is_an_error(
        fake_daemon: Callable[[Serve], str]) -> None:
    got: list[bytes] = []

    def serve(c: socket.socket) -> None:
        _accept(c, _read_request(c))
        c.sendall(bytes((0x89, 2)) + b"hi")  # ping
        c.settimeout(5)
        buf = b""
        while len(buf) < 2 or len(buf) < 6 + (buf[1] & 0x7F):  # the start message
            buf += c.recv(4096)
        n = 6 + (buf[1] & 0x7F)
        buf = buf[n:]
        while len(buf) < 8:  # the pong: 2 + 4 (mask) + 2
            buf += c.recv(4096)
        got.append(wsframe.mask(buf[6:8], buf[2:6]) if buf[0] == 0x8A else b"?")
        c.sendall(bytes((0x88, 2)) + (1011).to_bytes(2, "big"))
    with pytest.raises(ExecLost, match="closed the exec before the command started"):
        _open(fake_daemon(serve))
    assert got == [b"hi"]
