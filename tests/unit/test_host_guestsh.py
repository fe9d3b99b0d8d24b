"""The shell programs banger runs in guests (banger/host/guest/sh/), run here by the
host's own sh exactly as a guest's login shell gets them from ssh."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from importlib import resources
from pathlib import Path

import pytest

from banger.host import guestsh
from banger.host.guestports import SS_COMMAND, parse_ss

PROGRAMS = sorted(p.name for p in (resources.files("banger.host") / "guest" / "sh").iterdir())
# Words a path or URL may hold that a shell would act on if they reached it unquoted.
HOSTILE = "a b'c\"d$(touch pwned)`touch pwned2`;touch pwned3 *"


def _as_login_shell(command: str, cwd: Path, *, stdin: bytes = b"",
                    env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    # ssh sends the command line as one string; the guest's login shell runs `sh -c` on it.
    return subprocess.run(["sh", "-c", command], cwd=cwd, input=stdin, capture_output=True,
                          timeout=30, env=env)


def test_every_program_is_valid_sh() -> None:
    assert set(PROGRAMS) >= {"push-tree", "push-files", "start-bootstrap", "git-identity",
                             "list-sockets"}
    for name in PROGRAMS:
        done = subprocess.run(["sh", "-n", "-c", guestsh.program(name)], capture_output=True)
        assert done.returncode == 0, (name, done.stderr)


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_push_tree_swaps_the_directory_for_the_stream(tmp_path: Path) -> None:
    target = tmp_path / HOSTILE
    target.mkdir()
    (target / "old").write_text("gone")
    done = _as_login_shell(guestsh.command("push-tree", str(target)), tmp_path,
                           stdin=_tar({"new": b"here", "sub/f": b"x"}))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in target.iterdir()) == ["new", "sub"]
    assert (target / "new").read_text() == "here"
    assert sorted(p.name for p in tmp_path.iterdir()) == [HOSTILE]  # no .new, no pwned


def test_push_tree_keeps_the_old_directory_when_the_stream_is_broken(tmp_path: Path) -> None:
    target = tmp_path / "repo"
    target.mkdir()
    (target / "old").write_text("kept")
    done = _as_login_shell(guestsh.command("push-tree", str(target)), tmp_path,
                           stdin=b"not a tar stream" * 100)
    assert done.returncode != 0
    assert (target / "old").read_text() == "kept"


def test_git_identity_sets_each_pair_and_reports_the_last(tmp_path: Path) -> None:
    env = {**os.environ, "HOME": str(tmp_path), "GIT_CONFIG_NOSYSTEM": "1"}
    env.pop("GIT_CONFIG_GLOBAL", None)
    done = _as_login_shell(guestsh.command("git-identity", "user.email", "a@b",
                                           "user.name", HOSTILE), tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    config = (tmp_path / ".gitconfig").read_text()
    assert "email = a@b" in config and "pwned" not in " ".join(os.listdir(tmp_path))
    got = subprocess.run(["git", "config", "--global", "user.name"], env=env,
                         capture_output=True, text=True)
    assert got.stdout == HOSTILE + "\n"
    bad = _as_login_shell(guestsh.command("git-identity", "user.name", "x", "nokey", "y"),
                          tmp_path, env=env)
    assert bad.returncode != 0


def test_list_sockets_output_is_what_parse_ss_reads(tmp_path: Path) -> None:
    done = _as_login_shell(SS_COMMAND, tmp_path)
    if done.returncode == 127:
        pytest.skip("no ss on this host (iproute2)")
    assert done.returncode == 0, done.stderr
    parse_ss(done.stdout.decode())
    assert not done.stdout.startswith(b"Netid")  # -H: no header
