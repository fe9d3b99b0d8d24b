"""bangerd's stop (its :class:`banger.daemon.main.Server`) with clients that read nothing:
a `vm logs -f` piped into a pager that waits, a suspended CLI. uvicorn waits for every
connection to end before it exits; such a client's connection never would."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from banger.api.schema import Doctor
from banger.client.client import Client
from banger.daemon.app import create_app
from banger.daemon.main import WS_SETTINGS, Server
from banger.daemon.sockets import bind_socket
from banger.model.layout import Layout
from tests.fakes import fake_service

WAIT = 30.0  # a fail-safe, never a measure


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
           ) -> Iterator[tuple[Server, threading.Thread, Client, Path]]:
    """bangerd's own Server class on a socket, in a thread; a running (fake) VM named box
    and its serial log."""
    monkeypatch.setenv("BANGER_HOME", str(tmp_path / "h"))
    layout = Layout.for_user()
    service, _images, _disks, _vmm, _guest, db = fake_service(tmp_path, layout)
    stopping = threading.Event()
    app = create_app(service, doctor=lambda: Doctor(checks=[]), ssh_key="k",
                     known_hosts="kh", ssh_argv=lambda addr, alias: ["ssh"],
                     stopping=stopping)
    sock = bind_socket(layout.daemon_socket).sock
    server = Server(uvicorn.Config(app, log_level="warning", **WS_SETTINGS), service.ops,
                    stopping)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    until(lambda: server.started, "the daemon started")
    client = Client(layout.daemon_socket)
    client.create({"name": "box"}, lambda _: None)
    log = service.show("box").paths.serial_log
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_bytes(b"")
    try:
        yield server, thread, client, log
    finally:
        client.close()
        server.should_exit = server.force_exit = True
        thread.join(WAIT)
        db.close()


def until(ok: object, what: str) -> None:
    assert callable(ok)
    deadline = time.monotonic() + WAIT
    while not ok():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.05)


def _read_offset(path: Path) -> int | None:
    """Where this process's open file description of ``path`` is (the follow's), if any."""
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
                    if line.startswith("pos:"):
                        return int(line.split()[1])
        except OSError:
            continue
    return None


def test_a_follower_that_reads_nothing_does_not_hold_the_daemons_stop(served: tuple[
        Server, threading.Thread, Client, Path]) -> None:
    server, thread, client, log = served
    stalled = socket.socket(socket.AF_UNIX)
    stalled.connect(str(client.socket_path))
    stalled.sendall(b"GET /v1/vms/box/logs/stream?follow=true HTTP/1.1\r\nHost: d\r\n"
                    b"Accept: application/x-ndjson\r\n\r\n")
    try:
        until(lambda: _read_offset(log) is not None, "the follow opened the log")
        with log.open("ab") as f:
            f.write(b"console line\n" * ((16 << 20) // 13))
        # The follow stops where its client's socket and the server's buffer are full.
        last = -1

        def stuck() -> bool:
            nonlocal last
            pos = _read_offset(log)
            moved, last = pos != last, pos if pos is not None else -1
            time.sleep(0.3)
            return not moved and pos is not None and pos < log.stat().st_size

        until(stuck, "the follow waits for its client")
        server.handle_exit(signal.SIGTERM, None)
        thread.join(WAIT)
        assert not thread.is_alive(), "bangerd's stop waits for a client that reads nothing"
    finally:
        stalled.close()
