"""One daemon per state directory, a socket removed only while it is its own, the peer
check's allowed uids, and what the daemon keeps tidy (op log, bangerd.log)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from banger.daemon import lock
from banger.daemon.housekeeping import INTERRUPTED, OPS_KEEP_COUNT, Housekeeping, rotate_log
from banger.daemon.peercred import allowed_uids, peer_checked
from banger.daemon.sockets import bind_socket
from banger.model.config import ConfigError, load_config
from banger.store.db import Database
from banger.store.vms import OperationLog


def test_second_lock_refused_naming_the_holder(tmp_path: Path) -> None:
    held = lock.acquire(tmp_path / "bangerd.lock")
    # flock locks belong to open file descriptions: a second open in this process conflicts
    # exactly as another process would.
    with pytest.raises(lock.AlreadyRunning, match=f"pid {os.getpid()}") as exc:
        lock.acquire(tmp_path / "bangerd.lock")
    assert exc.value.holder == os.getpid()
    held.release()
    lock.acquire(tmp_path / "bangerd.lock").release()


def test_socket_released_only_while_it_is_its_own(tmp_path: Path) -> None:
    path = tmp_path / "run" / "d.sock"
    first = bind_socket(path)
    first.release()
    assert not path.exists()
    second = bind_socket(path)
    path.unlink()  # e.g. a racing daemon's stale-socket cleanup ...
    other = socket.socket(socket.AF_UNIX)
    other.bind(str(path))  # ... then its own bind
    second.release()
    assert path.exists(), "released another daemon's socket"
    for s in (first.sock, second.sock, other):
        s.close()


def test_root_allowed_only_when_configured(tmp_path: Path) -> None:
    assert allowed_uids(False) == {os.geteuid()}
    assert allowed_uids(True) == {os.geteuid(), 0}
    cfg = tmp_path / "c.toml"
    cfg.write_text("[daemon]\nallow_root = true\n")
    assert load_config(cfg, tmp_path).allow_root is True
    assert load_config(tmp_path / "none.toml", tmp_path).allow_root is False
    cfg.write_text('[daemon]\nallow_root = "yes"\n')
    with pytest.raises(ConfigError, match=r"\[daemon\] allow_root must be true or false"):
        load_config(cfg, tmp_path)


def test_ops_left_running_interrupted_and_old_ones_pruned(tmp_path: Path) -> None:
    db = Database(tmp_path / "s.db")
    ops = OperationLog(db)
    ops.begin("op-crashed", None, "start")
    ops.event("op-crashed", 0, "run", "launch", None, None)
    now = time.time()
    for i in range(OPS_KEEP_COUNT + 5):
        ops.begin(f"op-{i}", None, "stop")
        ops.finish(f"op-{i}")
    ops.begin("op-old", None, "stop")
    ops.event("op-old", 0, "run", "poweroff", None, None)
    ops.finish("op-old")
    db.query("UPDATE operations SET finished_at=? WHERE id='op-old'", (now - 31 * 86400,))
    db.query("UPDATE operations SET finished_at=? WHERE id LIKE 'op-_'", (now - 86400,))

    Housekeeping(tmp_path / "bangerd.log", ops).at_start()

    crashed = ops.get("op-crashed")
    assert crashed["status"] == "interrupted" and crashed["error"] == INTERRUPTED
    assert crashed["finished_at"] is not None
    left = {r[0] for r in db.query("SELECT id FROM operations")}
    assert "op-old" not in left  # past 30 days
    assert not {"op-0", "op-1", "op-2"} & left  # beyond the newest 1000
    assert len(left) == OPS_KEEP_COUNT and "op-crashed" in left
    assert db.query("SELECT * FROM operation_events WHERE op_id='op-old'") == []


def test_log_rotated_and_the_daemon_stderr_follows(tmp_path: Path) -> None:
    log = tmp_path / "bangerd.log"
    assert rotate_log(log, 10) is False  # absent
    # A process whose stderr is the log, as the CLI's autostart makes it.
    code = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from banger.daemon.housekeeping import rotate_log
        sys.stderr.write("old" * 10)
        assert rotate_log(Path({str(log)!r}), 10)
        sys.stderr.write("new")
        assert not rotate_log(Path({str(log)!r}), 10)
    """)
    with open(log, "ab") as f:
        subprocess.run([sys.executable, "-c", code], stderr=f, check=True)
    assert (tmp_path / "bangerd.log.1").read_text() == "old" * 10
    assert log.read_text() == "new"


def _serve(sock_path: Path, allowed: frozenset[int]) -> tuple[uvicorn.Server, threading.Thread]:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    bound = bind_socket(sock_path)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", http=peer_checked(allowed),
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [bound.sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return server, thread


def _get(sock_path: Path) -> bytes:
    with socket.socket(socket.AF_UNIX) as c:
        c.settimeout(5)
        c.connect(str(sock_path))
        try:
            c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            return c.recv(4096)
        except (BrokenPipeError, ConnectionResetError):
            return b""


@pytest.mark.parametrize("others_only", [True, False])
def test_peer_check_in_the_http_protocol(tmp_path: Path, others_only: bool,
                                         caplog: pytest.LogCaptureFixture) -> None:
    # Allowing only some other uid stands for "root, not configured": this process is refused.
    allowed = frozenset({os.geteuid() + 1}) if others_only else allowed_uids(False)
    server, thread = _serve(tmp_path / "run" / "d.sock", allowed)
    try:
        answer = _get(tmp_path / "run" / "d.sock")
    finally:
        server.should_exit = True
        thread.join(10)
    if others_only:
        assert answer == b""
        assert f"refused a connection from uid {os.geteuid()}" in caplog.text
        assert f"pid {os.getpid()}" in caplog.text
    else:
        assert answer.startswith(b"HTTP/1.1 200")


def test_lock_held_until_operations_whose_client_left_are_done(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An operation whose client went away rolls back (or deletes a --rm VM) after uvicorn
    # stopped: the state lock must outlive it, or a second bangerd starts meanwhile.
    import banger.daemon.main as daemon_main
    from banger.model.layout import Layout

    monkeypatch.setenv("BANGER_HOME", str(tmp_path / "h"))
    monkeypatch.delenv("BANGER_RUNTIME_DIR", raising=False)
    layout = Layout.for_user()
    seen: dict[str, object] = {}

    def rolling_back() -> None:
        time.sleep(0.5)
        try:
            lock.acquire(layout.daemon_lock).release()
            seen["second daemon"] = "got the lock"
        except lock.AlreadyRunning:
            seen["second daemon"] = "refused"

    # Named as app.in_thread names an operation's thread.
    op = threading.Thread(target=rolling_back, name="banger-op")
    monkeypatch.setattr(daemon_main, "serve", lambda *_: op.start())
    daemon_main.main([])
    op.join(10)
    assert seen == {"second daemon": "refused"}
    lock.acquire(layout.daemon_lock).release()  # released once it was done
