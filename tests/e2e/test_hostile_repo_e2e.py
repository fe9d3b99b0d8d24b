"""A hostile repo through the real daemon: `banger vm run ./repo` runs none of the programs
its config and hooks name on the host, and the guest still gets the right checkout."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import Banger, assert_nothing_left

pytestmark = pytest.mark.e2e


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                          text=True).stdout


def test_hostile_repo_runs_nothing_on_the_host(banger: Banger, tmp_path: Path) -> None:
    repo = tmp_path / "proj"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / ".gitattributes").write_text("*.txt filter=evil\n")
    (repo / "data.txt").write_text("committed\n")
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=x", "-c", "user.email=x@x", "commit", "-q", "-m", "first")
    (repo / "data.txt").write_text("changed on the host\n")
    markers = tmp_path / "markers"
    markers.mkdir()
    program = tmp_path / "mark"
    program.write_text(f"#!/bin/sh\necho \"$0 $*\" >> {markers}/ran\ncat\n")
    program.chmod(0o755)
    for key in ("core.fsmonitor", "filter.evil.clean", "filter.evil.smudge",
                "core.sshCommand", "credential.helper"):
        git(repo, "config", key, str(program))
    for hook in ("post-index-change", "reference-transaction", "post-checkout"):
        (repo / ".git" / "hooks" / hook).symlink_to(program)

    proc = banger.run("vm", "run", "--rm", str(repo), "--", "sh", "-c",
                      "git status --porcelain; cat data.txt")
    assert proc.stdout.splitlines() == [" M data.txt", "changed on the host"], proc.stderr
    assert list(markers.iterdir()) == [], (markers / "ran").read_text()
    assert_nothing_left(banger)
