"""The client waits for `/vms/{ref}/ssh` longer than the daemon waits for a guest's sshd,
so the daemon's "sshd did not take banger's key" reaches the user, never a client timeout
(CI once saw exactly that: both were 30 s)."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest

from banger.client import client as client_mod
from banger.core.context import Timeouts


def _slow_daemon(path: Path, delay: float, body: dict[str, object]) -> threading.Thread:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)

    def serve() -> None:
        conn, _ = srv.accept()
        with conn, srv:
            buf = b""
            while b"\r\n\r\n" not in buf:
                buf += conn.recv(4096)
            time.sleep(delay)
            data = json.dumps(body).encode()
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(data) + data)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


def test_the_ssh_target_outwaits_the_daemons_sshd_wait(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    assert Timeouts().sshd + 10 < client_mod.GUEST_TIMEOUT, \
        "the daemon's sshd wait plus its answer fits in the client's wait"
    # A plain read gives up at 0.2 s here; the ssh target's answer comes after 0.6 s.
    monkeypatch.setattr(client_mod, "READ_TIMEOUT", 0.2)
    target = {"host": "127.0.0.1", "port": 2222, "user": "root", "key": "/k",
              "known_hosts": "/kh", "alias": "a.vm", "vm": "a", "argv": ["ssh", "a.vm"]}
    sock = tmp_path / "d.sock"
    t = _slow_daemon(sock, 0.6, target)
    got = client_mod.Client(sock).ssh_target("a")
    t.join(5)
    assert (got.vm, got.port) == ("a", 2222)
