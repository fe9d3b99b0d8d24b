"""A guest that prints without end must not fill the daemon's memory (issue 8)."""

from __future__ import annotations

import os
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
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # The "guest": 1 GiB on stdout for any ssh command.
    fake_ssh = bin_dir / "ssh"
    fake_ssh.write_text("#!/bin/sh\nexec head -c 1073741824 /dev/zero\n")
    fake_ssh.chmod(0o755)
    env = dict(os.environ, BANGER_HOME=str(home),
               PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHONPATH=str(ROOT))
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


def test_a_guest_printing_a_gib_to_vm_ports_ends_in_a_clear_error(flood_daemon: int) -> None:
    runner = CliRunner()
    r = runner.invoke(cli, ["vm", "create", "--name", "box"], catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    started = time.monotonic()
    r = runner.invoke(cli, ["vm", "ports", "box"], catch_exceptions=False)
    took = time.monotonic() - started
    assert r.exit_code == 1
    assert "could not list the guest's sockets" in r.stderr
    assert "exceeded 1 MiB; the command was killed" in r.stderr
    assert took < 30
    peak = _status_kib(flood_daemon, "VmHWM")
    assert peak < 200 * 1024, f"daemon peak RSS {peak} KiB"
    # The daemon still answers.
    r = runner.invoke(cli, ["vm", "list"], catch_exceptions=False)
    assert r.exit_code == 0 and "box" in r.stdout
