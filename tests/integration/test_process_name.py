"""The daemon is `bangerd` to the process tools (pgrep -x, ps): the one the CLI
autostarts. Real banger and bangerd processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.integration.processes import Home, home

__all__ = ["home"]  # the fixture, imported for the tests below


def _assert_named_bangerd(pid: int) -> None:
    assert Path(f"/proc/{pid}/comm").read_text() == "bangerd\n"
    found = subprocess.run(["pgrep", "-x", "bangerd"], capture_output=True, text=True)
    assert str(pid) in found.stdout.split(), found
    ps = subprocess.run(["ps", "-o", "comm=", "-p", str(pid)], capture_output=True, text=True)
    assert ps.stdout.strip() == "bangerd", ps
    by_name = subprocess.run(["ps", "-C", "bangerd", "-o", "pid="], capture_output=True,
                             text=True)
    assert str(pid) in by_name.stdout.split(), by_name


def test_autostarted_daemon_is_bangerd_to_pgrep_and_ps(home: Home) -> None:
    r = home.cli("vm", "list")
    assert r.returncode == 0, (r.stderr, home.log_text())
    [pid] = home.daemons()
    _assert_named_bangerd(pid)
    # Named, not rewritten: its command line and environment stay readable (leak checks
    # and the trust tests read them).
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert cmdline[:4] == [sys.executable.encode(), b"-P", b"-m", b"banger.daemon.main"]
    assert f"BANGER_HOME={home.root}".encode() in Path(f"/proc/{pid}/environ").read_bytes()
    # Its threads (uvicorn's, the housekeeping ones) are named after it too.
    tasks = list(Path(f"/proc/{pid}/task").iterdir())
    assert len(tasks) > 1 and {(t / "comm").read_text() for t in tasks} == {"bangerd\n"}

