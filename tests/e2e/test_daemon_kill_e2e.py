"""A real bangerd SIGKILLed during `banger vm run ./repo`, at several points: the next
daemon (the CLI's autostart) leaves either no VM, or a VM that, once started, has the repo
at /root/repo. Never one that silently lacks it.

The points are hit deterministically with the BANGER_KILLPOINT test hook
(:mod:`banger.daemon.killpoint`): the daemon SIGKILLs itself right after that point.
"""

from __future__ import annotations

import sqlite3
import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import Banger, finish, make_banger, qemu_pids

pytestmark = pytest.mark.e2e

CONTENT = "the host repo, as it was committed\n"


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    r = tmp_path / "proj"
    r.mkdir()
    git(r, "init", "-q", "-b", "main")
    (r / "README").write_text(CONTENT)
    git(r, "add", "-A")
    git(r, "-c", "user.name=Ada", "-c", "user.email=ada@example.invalid", "commit", "-q",
        "-m", "first")
    return r


def left_behind(b: Banger, point: str) -> None:
    """What the kill left, before any daemon runs again: proof it hit its point."""
    assert b.daemon_pid() is None, "the daemon was not killed"
    with sqlite3.connect(b.home / "state" / "banger.db") as db:
        ((vm_id, pending),) = db.execute("SELECT id, pending_workspace FROM vms").fetchall()
    # The repo is written down with the VM until a start that made its work disk ends.
    assert (pending is None) is (point == "running"), pending
    vm_dir = b.home / "state" / "vms" / vm_id
    work_disk = vm_dir / "work.ext4"
    if point == "created":
        assert not work_disk.exists() and qemu_pids(str(b.home)) == []
    elif point == "work_disk_build":
        assert (vm_dir / ".work.ext4.tmp").exists(), "the build was not cut off midway"
        assert not work_disk.exists() and qemu_pids(str(b.home)) == []
    else:  # booting or running: the disk is made; QEMU outlives the daemon
        assert work_disk.exists() and qemu_pids(str(b.home)) != []


@pytest.mark.parametrize("point", ["created", "work_disk_build", "run:wait_agent", "running"])
def test_daemon_killed_during_vm_run_repo(image_dir: Path, repo: Path, point: str) -> None:
    b = make_banger(images_dir=image_dir, extra_env={"BANGER_KILLPOINT": point})
    try:
        proc = b.run("vm", "run", "-d", "--name", "box", str(repo), check=False)
        assert proc.returncode != 0, f"vm run survived its daemon's death: {proc.stdout}"
        left_behind(b, point)
        del b.env["BANGER_KILLPOINT"]  # the next daemon lives
        vms = b.json("vm", "list")  # autostarts it: it sweeps and reconciles
        assert isinstance(vms, list)
        if not vms:
            return  # no VM at all is an acceptable outcome
        (vm,) = vms
        if vm["state"] != "running":
            b.run("vm", "start", "box")
        out = b.run("vm", "ssh", "box", "cat", "/root/repo/README", timeout=120)
        assert out.stdout == CONTENT
    finally:
        finish(b)
