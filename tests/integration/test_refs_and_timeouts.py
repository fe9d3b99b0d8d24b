"""The client's side of the wire: refs travel as one URL path segment, and a plain request
never waits forever on a daemon that stopped answering."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from banger.cli.main import cli
from banger.client import client as client_mod
from banger.client.client import Client, DaemonUnavailable
from tests.integration.conftest import Daemon


def banger(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def test_a_ref_with_url_syntax_acts_on_no_other_vm(daemon: Daemon) -> None:
    assert banger("vm", "create", "--name", "box")[0] == 0
    # Unencoded, these became POST /vms/box/stop?/start (stops box) and DELETE /vms/box?x.
    for args in (["vm", "start", "box/stop?"], ["vm", "restart", "box/stop#"],
                 ["vm", "delete", "box?x"], ["vm", "show", ".."], ["vm", "stop", "box/kill?"]):
        code, _, err = banger(*args)
        assert code != 0, (args, err)
        assert daemon.service.show("box").vm.state.value == "running", args
    assert len(daemon.vmm.procs) == 1
    # A VM whose id-prefix or name is looked up as one segment still works.
    assert banger("vm", "stop", "box")[0] == 0


@pytest.fixture
def silent_socket(tmp_path: Path) -> Iterator[Path]:
    """A socket that accepts connections and never answers (a wedged daemon)."""
    path = Path(f"/tmp/banger-silent-{id(tmp_path)}.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except TimeoutError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield path
    stop.set()
    t.join()
    for c in held:
        c.close()
    srv.close()
    path.unlink()


@pytest.mark.timeout(60)
def test_plain_requests_time_out_reads_short_changes_long(
        silent_socket: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_mod, "READ_TIMEOUT", 0.5)
    monkeypatch.setattr(client_mod, "CHANGE_TIMEOUT", 2.0)
    c = Client(silent_socket)
    try:
        t0 = time.monotonic()
        with pytest.raises(DaemonUnavailable, match=r"did not answer GET /v1/vms within"):
            c.list_vms()
        assert time.monotonic() - t0 < 2
        t0 = time.monotonic()
        with pytest.raises(DaemonUnavailable, match=r"did not answer POST /v1/vms/b%2Fx/stop"):
            c.stop("b/x")
        assert 2 <= time.monotonic() - t0 < 5
    finally:
        c.close()


@pytest.mark.timeout(60)
def test_a_silent_progress_stream_is_given_up_after_the_silence_limit(
        silent_socket: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The daemon sends a heartbeat every HEARTBEAT_SECONDS: a stream this quiet is dead.
    monkeypatch.setattr(client_mod, "STREAM_SILENCE_LIMIT", 0.5)
    t0 = time.monotonic()
    with pytest.raises(DaemonUnavailable, match=r"sent nothing for 0 s \(not even its "
                                                r"heartbeat\)"):
        Client(silent_socket).start("box", lambda _: None)
    assert time.monotonic() - t0 < 5


def test_no_socket_and_a_hung_up_stream_are_said(tmp_path: Path) -> None:
    with pytest.raises(DaemonUnavailable, match=r"bangerd is not answering on \S*nothing"):
        Client(tmp_path / "nothing").list_vms()
    path = Path(f"/tmp/banger-hangup-{id(tmp_path)}.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen(1)

    def hang_up() -> None:
        conn, _ = srv.accept()
        conn.recv(65536)
        conn.close()  # the request read, no answer

    t = threading.Thread(target=hang_up, daemon=True)
    t.start()
    try:
        with pytest.raises(DaemonUnavailable, match=r"lost bangerd on"):
            Client(path).start("box", lambda _: None)
    finally:
        t.join(10)
        srv.close()
        path.unlink()


def test_an_empty_ref_is_an_error_not_a_traceback(daemon: Daemon) -> None:
    # `GET /v1/vms/` is answered with a redirect (to the list) and an empty body, which
    # the client used to parse as JSON: a JSONDecodeError traceback.
    for args in (["vm", "show", ""], ["vm", "start", ""], ["vm", "logs", ""],
                 ["vm", "delete", ""]):
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 1 and isinstance(r.exception, SystemExit), (args, r.exception)
        assert "no VM" in r.stderr, (args, r.stderr)


@pytest.fixture
def canned(tmp_path: Path) -> Iterator[tuple[Path, list[bytes]]]:
    """A socket that answers each connection with the next canned bytes, then hangs up."""
    path = Path(f"/tmp/banger-canned-{id(tmp_path)}.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen(8)
    answers: list[bytes] = []
    stop = threading.Event()

    def serve() -> None:
        srv.settimeout(0.1)
        while not stop.is_set():
            try:
                conn = srv.accept()[0]
            except TimeoutError:
                continue
            with conn:
                conn.recv(65536)
                conn.sendall(answers.pop(0))

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield path, answers
    stop.set()
    t.join()
    srv.close()
    path.unlink()


def _http(status: str, body: bytes, ctype: str = "application/json") -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode() + body


def test_answers_the_client_cannot_read_are_said_not_raised(
        canned: tuple[Path, list[bytes]]) -> None:
    path, answers = canned
    c = Client(path)
    answers.append(_http("200 OK", b"<html>not json</html>"))
    with pytest.raises(DaemonUnavailable, match=r"answer to GET /v1/vms is not JSON"):
        c.list_vms()
    answers.append(_http("307 Temporary Redirect", b""))
    with pytest.raises(client_mod.ApiError, match=r"HTTP 307"):
        c.show("box")
    answers.append(_http("200 OK", b'{"type": "heartbeat"}\n\x1b[2Jgarbage\n',
                         "application/x-ndjson"))
    with pytest.raises(DaemonUnavailable, match=r"progress line this banger cannot read"):
        c.start("box", lambda _: None)
    answers.append(_http("200 OK", b'[1, 2]\n', "application/x-ndjson"))
    with pytest.raises(DaemonUnavailable, match=r"progress line this banger cannot read"):
        c.start("box", lambda _: None)


def test_a_progress_kind_this_cli_does_not_know_is_passed_over(
        canned: tuple[Path, list[bytes]]) -> None:
    # A newer daemon's event kind: the renderer's exhaustive match raised AssertionError
    # (assert_never), a traceback that closed the stream, which cancels the operation.
    from banger.cli.render import Progress

    path, answers = canned
    vm = {"id": "abc", "name": "box", "state": "running", "image": "i", "vcpus": 1,
          "memory_mib": 512, "disk_mib": 4096, "network": "user", "nat": False,
          "created_at": 0.0, "updated_at": 0.0, "dir": "/d", "serial_log": "/d/s"}
    lines = [{"type": "progress", "op_id": "op1", "vm": "box", "kind": "snapshotted",
              "stage": "s"},
             {"type": "progress", "op_id": "op1", "vm": "box", "kind": "ok", "stage": "s"},
             {"type": "result", "result": vm}]
    answers.append(_http("200 OK", b"".join(json.dumps(x).encode() + b"\n" for x in lines),
                         "application/x-ndjson"))
    progress = Progress()
    with progress:
        out = Client(path).start("box", progress)
    assert out.name == "box" and progress.op_id == "op1"
