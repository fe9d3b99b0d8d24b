"""A guest that prints without end must not fill the daemon's memory (issue 8)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from banger.cli.main import cli
from banger.client.client import Client, DaemonUnavailable
from banger.model.layout import Layout

ROOT = Path(__file__).resolve().parents[2]


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


@pytest.fixture
def flood_daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    home = tmp_path / "h"
    monkeypatch.setenv("BANGER_HOME", str(home))
    env = dict(os.environ, BANGER_HOME=str(home), PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "tests.integration.flood_daemon",
                             str(tmp_path / "host")], env=env, cwd=ROOT)
    client = Client(Layout.for_user().daemon_socket)
    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None, "flood daemon exited at start"
        try:
            client.health()
            break
        except DaemonUnavailable:
            assert time.monotonic() < deadline, "flood daemon did not start"
            time.sleep(0.1)
    client.close()
    try:
        yield proc.pid
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_guest_flooding_its_console_costs_a_follow_nothing(flood_daemon: int,
                                                               tmp_path: Path) -> None:
    # One client follows and reads, one follows and never reads (its socket fills: the
    # daemon's stream waits on it), while the "guest" writes 128 MiB to its console and
    # the cap rotates it: the daemon's memory stays where it was.
    runner = CliRunner()
    assert runner.invoke(cli, ["vm", "create", "--name", "box"]).exit_code == 0
    layout = Layout.for_user()
    vm_dir = next(layout.vms_dir.iterdir())
    log = vm_dir / "serial.log"
    log.write_bytes(b"")
    stalled = socket.socket(socket.AF_UNIX)
    stalled.connect(str(layout.daemon_socket))
    stalled.sendall(b"GET /v1/vms/box/logs/stream?follow=true HTTP/1.1\r\nHost: d\r\n"
                    b"Accept: application/x-ndjson\r\n\r\n")
    reader = subprocess.Popen([sys.executable, "-m", "banger.cli.main", "vm", "logs", "-f",
                               "--raw", "box"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    before = _status_kib(flood_daemon, "VmRSS")
    line = b"flood " * 20 + b"\n"
    block = line * ((1 << 20) // len(line))
    with log.open("ab") as f:
        for _ in range(128):
            f.write(block)
            f.flush()
    grown = _status_kib(flood_daemon, "VmHWM") - before
    assert grown < 32 * 1024, f"the daemon grew by {grown} KiB"
    assert runner.invoke(cli, ["vm", "stop", "box"]).exit_code == 0
    assert reader.wait(60) == 0, reader.stderr.read() if reader.stderr else ""
    stalled.close()
    r = runner.invoke(cli, ["vm", "list"], catch_exceptions=False)
    assert r.exit_code == 0 and "box" in r.stdout
