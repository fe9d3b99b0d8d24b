"""The guest program of `banger vm workspace export`: its words are data, whatever the
daemon names as the workspace directory or the user gives as --base-commit."""

from __future__ import annotations

import subprocess
from pathlib import Path
from shlex import quote

from banger.cli.workspace import _EXPORT


def test_a_workdir_or_base_with_shell_syntax_runs_nothing(tmp_path: Path) -> None:
    evil = "$(touch ran)`touch ran`"
    workdir = tmp_path / evil
    workdir.mkdir()
    subprocess.run(["git", "init", "-q", str(workdir)], check=True)
    script = _EXPORT.format(workdir=quote(str(workdir)), base=quote(evil))
    r = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2, r.stderr  # no such base commit, said
    assert "no base commit" in r.stderr and evil in r.stderr, r.stderr
    assert not (workdir / "ran").exists(), "the export script ran a word of its workdir"
