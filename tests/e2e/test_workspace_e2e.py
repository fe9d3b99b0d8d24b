"""Workspace mode on real VMs: `banger vm run ./repo` puts a real git checkout at /root/repo."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import Banger, assert_nothing_left

pytestmark = pytest.mark.e2e


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                          text=True).stdout


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    r = tmp_path / "proj"
    r.mkdir()
    git(r, "init", "-q", "-b", "main")
    git(r, "config", "user.name", "Ada Dev")
    git(r, "config", "user.email", "ada@example.invalid")
    (r / "README").write_text("hello\n")
    (r / "run.sh").write_text("#!/bin/sh\necho ran\n")
    (r / "run.sh").chmod(0o755)
    (r / "escape").symlink_to("/etc/passwd")
    (r / ".gitignore").write_text("*.log\n")
    git(r, "add", "-A")
    git(r, "commit", "-q", "-m", "first")
    (r / "README").write_text("hello, changed\n")  # uncommitted change comes along
    (r / "notes.txt").write_text("untracked\n")
    (r / "debug.log").write_text("ignored\n")
    return r


def test_run_repo_command_in_checkout(banger: Banger, repo: Path) -> None:
    dry = banger.run("vm", "run", "--dry-run", str(repo))
    assert "README" in dry.stdout and "notes.txt" not in dry.stdout
    proc = banger.run(
        "vm", "run", "--rm", str(repo), "--", "sh", "-c",
        "pwd; git status --porcelain; cat README; ./run.sh; readlink escape; "
        "test -e notes.txt || echo no-untracked; test -e debug.log || echo no-ignored; "
        "git config user.email; git branch --show-current; exit 5", check=False)
    assert proc.returncode == 5, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "/root/repo"
    assert " M README" in lines  # the same status as on the host
    assert "hello, changed" in lines and "ran" in lines
    assert "/etc/passwd" in lines, "a symlink out of the repo is copied as a link"
    assert "no-untracked" in lines and "no-ignored" in lines
    assert "ada@example.invalid" in lines and "main" in lines
    assert_nothing_left(banger)


def test_untracked_and_guest_branch(banger: Banger, repo: Path) -> None:
    proc = banger.run(
        "vm", "run", "--rm", "--include-untracked", "--branch", "feat", "--from", "main",
        str(repo), "--", "sh", "-c",
        "git branch --show-current; cat notes.txt; cat README; git status --porcelain")
    lines = proc.stdout.splitlines()
    assert lines[:3] == ["feat", "untracked", "hello"]  # --from main: the committed README
    assert "?? notes.txt" in lines
    assert "feat" not in git(repo, "branch"), "the branch exists only in the guest"
    assert_nothing_left(banger)


def test_bad_repo_refused_before_anything_is_created(banger: Banger, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    proc = banger.run("vm", "run", str(plain), "--", "true", check=False)
    assert proc.returncode == 1 and str(plain) in proc.stderr
    assert banger.run("vm", "list", "--json").stdout.strip() == "[]"


def test_exec_runs_in_the_workspace(banger: Banger, repo: Path) -> None:
    banger.run("vm", "run", "-d", "--name", "wx", str(repo))
    proc = banger.run("vm", "exec", "wx", "--", "sh", "-c", "pwd; exit 3", check=False)
    assert proc.returncode == 3 and proc.stdout.strip() == "/root/repo"
    other = banger.run("vm", "exec", "wx", "--guest-path", "/tmp", "--", "pwd")
    assert other.stdout.strip() == "/tmp"
    banger.run("vm", "create", "--name", "bare")
    proc = banger.run("vm", "exec", "bare", "--", "true", check=False)
    assert proc.returncode == 2 and "has no workspace" in proc.stderr


def test_export_round_trips_and_touches_nothing(banger: Banger, repo: Path,
                                               tmp_path: Path) -> None:
    banger.run("vm", "run", "-d", "--name", "ex", "--include-untracked", str(repo))
    guest_changes = (
        "set -e; echo guest-commit > committed.txt; git add committed.txt; "
        "git -c user.name=g -c user.email=g@x commit -q -m 'in guest'; "
        "echo edited >> README; printf '\\000\\001\\002binary' > blob.bin; "
        "mkdir -p new/dir; echo deep > new/dir/file; rm run.sh; "
        "git status --porcelain > /tmp/before")
    banger.run("vm", "exec", "ex", "--", "sh", "-c", guest_changes)
    patch = subprocess.run(banger.argv("vm", "workspace", "export", "ex"), env=banger.env,
                           capture_output=True, timeout=120)
    assert patch.returncode == 0, patch.stderr
    # Non-mutating: the guest's status is what it was before the export.
    after = banger.run("vm", "exec", "ex", "--", "sh", "-c",
                       "git status --porcelain | diff /tmp/before - && echo same")
    assert after.stdout.strip() == "same"
    # The host applies it cleanly onto its own (uncommitted, untracked) state.
    (tmp_path / "p.patch").write_bytes(patch.stdout)
    git(repo, "apply", "--check", str(tmp_path / "p.patch"))
    git(repo, "apply", str(tmp_path / "p.patch"))
    assert (repo / "committed.txt").read_text() == "guest-commit\n"
    assert (repo / "README").read_text() == "hello, changed\nedited\n"
    assert (repo / "blob.bin").read_bytes() == b"\0\1\2binary"
    assert (repo / "new" / "dir" / "file").read_text() == "deep\n"
    assert not (repo / "run.sh").exists()
    assert (repo / "notes.txt").read_text() == "untracked\n"
    # Against an explicit base: the guest commit and the rest, relative to host HEAD.
    head = git(repo, "rev-parse", "HEAD").strip()
    again = subprocess.run(banger.argv("vm", "workspace", "export", "ex", "--base-commit",
                                       head), env=banger.env, capture_output=True,
                           timeout=120)
    assert again.returncode == 0 and b"notes.txt" in again.stdout


def test_prepare_resyncs_a_running_vm(banger: Banger, repo: Path) -> None:
    banger.run("vm", "create", "--name", "pr")
    (repo / "later.txt").write_text("added on the host\n")
    git(repo, "add", "later.txt")
    out = banger.run("vm", "workspace", "prepare", "pr", str(repo))
    assert "/root/repo" in out.stdout
    proc = banger.run("vm", "exec", "pr", "--", "sh", "-c",
                      "cat later.txt; git status --porcelain; stat -c %u .")
    lines = proc.stdout.splitlines()
    assert lines[0] == "added on the host"
    assert "A  later.txt" in lines and " M README" in lines and lines[-1] == "0"
    banger.run("vm", "stop", "pr")
    proc = banger.run("vm", "workspace", "prepare", "pr", str(repo), check=False)
    assert proc.returncode == 1 and "start it first" in proc.stderr
