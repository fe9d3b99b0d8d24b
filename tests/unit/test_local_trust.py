"""banger's private directories and the peer credentials of its socket."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from banger.local.trust import (
    UnsafeDirectory,
    peer_cred,
    private_dir,
    who,
    without_agent_env,
)


def test_made_owner_only_and_loose_modes_of_ours_fixed(tmp_path: Path) -> None:
    d = private_dir(tmp_path / "a" / "run")
    assert stat.S_IMODE(d.stat().st_mode) == 0o700 and d.stat().st_uid == os.geteuid()
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o777)
    private_dir(loose)
    assert stat.S_IMODE(loose.stat().st_mode) == 0o700


@pytest.mark.skipif(os.geteuid() != 0, reason="making a directory of another uid needs root")
def test_a_directory_of_another_uid_is_refused_naming_the_owner(tmp_path: Path) -> None:
    d = tmp_path / "run"
    d.mkdir()
    d.chmod(0o777)
    os.chown(d, 65534, 65534)
    with pytest.raises(UnsafeDirectory) as exc:
        private_dir(d, what="runtime directory")
    msg = str(exc.value)
    assert f"refusing runtime directory {d}" in msg
    assert "owned by uid 65534 (nobody)" in msg and "XDG_RUNTIME_DIR" in msg
    assert stat.S_IMODE(d.stat().st_mode) == 0o777  # not ours: left as it is


def test_a_symlink_is_refused_even_to_a_directory_of_ours(tmp_path: Path) -> None:
    target = tmp_path / "mine"
    target.mkdir(mode=0o700)
    link = tmp_path / "run"
    link.symlink_to(target)
    with pytest.raises(UnsafeDirectory, match=rf"it is a symlink \(to {target}\) owned by uid"):
        private_dir(link)


def test_a_file_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "run"
    f.write_text("")
    with pytest.raises(UnsafeDirectory, match="not a directory"):
        private_dir(f)


def test_peer_cred_is_the_kernel_record_of_the_other_end() -> None:
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        peer = peer_cred(a)
    assert (peer.pid, peer.uid, peer.gid) == (os.getpid(), os.geteuid(), os.getegid())
    assert str(peer) == f"{who(os.geteuid())}, pid {os.getpid()}"


def test_agent_and_display_dropped() -> None:
    env = {"SSH_AUTH_SOCK": "/a", "SSH_AGENT_PID": "1", "DISPLAY": ":0",
           "XAUTHORITY": "/x", "HOME": "/h"}
    assert without_agent_env(env) == {"HOME": "/h"}


def test_a_parent_writable_by_others_is_refused_unless_sticky(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(UnsafeDirectory, match=rf"its parent {shared} is writable by group or "
                                              r"others \(mode 777\)"):
        private_dir(shared / "run")
    shared.chmod(0o1777)  # sticky, like /tmp: only an entry's owner may rename it
    assert private_dir(shared / "run").is_dir()


@pytest.mark.skipif(os.geteuid() != 0, reason="making a directory of another uid needs root")
def test_a_parent_of_another_uid_is_refused(tmp_path: Path) -> None:
    # e.g. root's banger under `sudo -E` with the user's XDG_RUNTIME_DIR
    theirs = tmp_path / "user-runtime"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(UnsafeDirectory, match=rf"its parent {theirs} is owned by uid 65534"):
        private_dir(theirs / "banger")


@pytest.mark.skipif(os.geteuid() != 0, reason="making a symlink of another uid needs root")
def test_a_parent_that_is_another_uids_symlink_is_refused(tmp_path: Path) -> None:
    # XDG_RUNTIME_DIR=/tmp/x where /tmp/x is someone else's link to a directory of ours:
    # the directory checked is ours, but the link's owner may re-point it at any time.
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o700)
    sticky = tmp_path / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    link = sticky / "x"
    link.symlink_to(mine)
    os.lchown(link, 65534, 65534)
    with pytest.raises(UnsafeDirectory) as exc:
        private_dir(link / "banger", what="runtime directory")
    msg = str(exc.value)
    assert f"its parent {link} is a symlink (to {mine}) owned by uid 65534 (nobody)" in msg
    assert not (mine / "banger").exists()
    # A link of our own on the way is fine (what it points at is checked as before).
    own = sticky / "own"
    own.symlink_to(mine)
    assert private_dir(own / "banger") == own / "banger"
