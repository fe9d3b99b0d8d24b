"""Completion of VM names never fails a Tab: whatever stands in the way of asking the
daemon, the Tab offers nothing (it runs inside the user's shell on every keypress)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from banger.cli import complete


def test_a_runtime_dir_whose_socket_cannot_be_looked_at_offers_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # What another user's 0700 /tmp/banger-<uid> gives a non-root user (EACCES), made
    # here for root too: looking up the socket's name raises an OSError exists() passes on.
    monkeypatch.setenv("BANGER_HOME", str(tmp_path / "h"))
    monkeypatch.setenv("BANGER_RUNTIME_DIR", str(tmp_path / ("x" * 300)))
    assert complete.vm_names() == []


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv to play two users")
def test_another_users_runtime_dir_gives_a_tab_no_traceback() -> None:
    # A non-root user whose runtime directory another user made first (0700): banger
    # refuses it everywhere, and a Tab must simply offer nothing.
    victim, other = 65534, 65533
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        _tab_as(victim, other, Path(tmp))


def _tab_as(victim: int, other: int, tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    home, xdg = tmp_path / "home", tmp_path / "xdg"
    home.mkdir()
    xdg.mkdir()
    os.chown(home, victim, victim)
    os.chown(xdg, victim, victim)
    (xdg / "banger").mkdir(mode=0o700)
    os.chown(xdg / "banger", other, other)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
           "XDG_RUNTIME_DIR": str(xdg), "PYTHONPATH": os.pathsep.join(sys.path),
           "_BANGER_COMPLETE": "bash_complete", "COMP_WORDS": "banger vm stop ",
           "COMP_CWORD": "3"}
    r = subprocess.run(["setpriv", f"--reuid={victim}", f"--regid={victim}",
                        "--clear-groups", sys.executable, "-m", "banger.cli.main"],
                       env=env, capture_output=True, text=True, timeout=60, cwd="/")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout.strip() == ""  # no name offered (click ends the list with a newline)
