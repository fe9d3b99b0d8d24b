"""Trust between local users, shared by the CLI and the daemon (stdlib only: a leaf).

Owns three things: banger's private directories (created by banger, verified to be the
user's own, mode 0700, not a symlink, or refused with the owner named), the credentials
of the process at the other end of the daemon's Unix socket (SO_PEERCRED, which the
kernel fills in at connect/listen time, so the other side cannot lie about them), and
the environment variables that must never reach the daemon.

A leaf module so the client may import it (see the import-linter contracts): the CLI runs
the ssh argv the daemon sends back, so it must know who it is talking to.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import socket
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

# Handed to nothing the daemon starts: with them, ssh to an (untrusted) guest could use the
# user's ssh agent or X display. The daemon drops them from its own environment at start,
# and the CLI leaves them out of the environment it autostarts the daemon with.
AGENT_ENV = ("SSH_AUTH_SOCK", "SSH_AGENT_PID", "DISPLAY", "XAUTHORITY")

RUNTIME_FIX = ("remove it if nothing of yours is in it, or set XDG_RUNTIME_DIR (with "
               "BANGER_HOME: BANGER_RUNTIME_DIR) to a directory of your own")


class UnsafeDirectory(Exception):
    """A directory banger would keep its sockets in is not this user's own."""


def who(uid: int) -> str:
    """``uid 65534 (nobody)``: the uid and, where it has one, the user name."""
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid} (no user of that id)"


def without_agent_env(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in AGENT_ENV}


def private_dir(path: Path, *, what: str = "directory", fix: str = RUNTIME_FIX) -> Path:
    """``path`` as a directory only this user can use, created 0700 if it is missing.

    Refused (:class:`UnsafeDirectory`, naming the owner found and ``fix``) when it is a
    symlink, not a directory, or owned by another uid: whoever owns it could put a socket
    of their own where banger looks for bangerd. Group/other bits of a directory that is
    ours are removed. The checks run on an fd opened with O_NOFOLLOW, so the directory
    checked is the one fixed up. Its parents must be yours or root's and not writable by
    others (unless sticky, like /tmp): whoever may rename entries in a parent could swap
    the directory after the check (as ssh's StrictModes reasons).
    """
    path = path.absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    _check_parents(path, what, fix)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        raise UnsafeDirectory(_not_a_dir(f"{what} {path}", path, fix)) from exc
    try:
        st = os.fstat(fd)
        me = os.geteuid()
        if st.st_uid != me:
            raise UnsafeDirectory(
                f"refusing {what} {path}: it is owned by {who(st.st_uid)}, not by you "
                f"({who(me)} here): its owner could stand in for bangerd. Fix: {fix}")
        if stat.S_IMODE(st.st_mode) & 0o077:
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)
    return path


def _check_parents(path: Path, what: str, fix: str) -> None:
    me = os.geteuid()
    for parent in path.parents:
        # A symlink on the way is looked at too: whoever owns it may point it elsewhere
        # later (in a sticky /tmp its owner may replace it), whatever it points at now.
        link = os.lstat(parent)
        if stat.S_ISLNK(link.st_mode) and link.st_uid not in (me, 0):
            raise UnsafeDirectory(
                f"refusing {what} {path}: its parent {parent} is a symlink (to "
                f"{os.readlink(parent)}) owned by {who(link.st_uid)}, who could point it "
                f"elsewhere (you are {who(me)}). Fix: {fix}")
        st = os.stat(parent)
        if st.st_uid not in (me, 0):
            raise UnsafeDirectory(
                f"refusing {what} {path}: its parent {parent} is owned by {who(st.st_uid)}, "
                f"who could replace it (you are {who(me)}). Fix: {fix}")
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise UnsafeDirectory(
                f"refusing {what} {path}: its parent {parent} is writable by group or "
                f"others (mode {stat.S_IMODE(st.st_mode):o}), who could replace it. "
                f"Fix: chmod go-w {parent}, or {fix}")


def _not_a_dir(name: str, path: Path, fix: str) -> str:
    try:
        st = os.lstat(path)
    except OSError as exc:
        return f"refusing {name}: {exc.strerror}. Fix: {fix}"
    if stat.S_ISLNK(st.st_mode):
        return (f"refusing {name}: it is a symlink (to {os.readlink(path)}) owned by "
                f"{who(st.st_uid)}, not a directory banger made. Fix: {fix}")
    return (f"refusing {name}: it is not a directory (owned by {who(st.st_uid)}). "
            f"Fix: {fix}")


@dataclass(frozen=True)
class PeerCred:
    """Who is at the other end of a Unix socket, as the kernel recorded it."""

    pid: int
    uid: int
    gid: int

    def __str__(self) -> str:
        return f"{who(self.uid)}, pid {self.pid}"


_UCRED = struct.Struct("3i")  # struct ucred: pid_t pid; uid_t uid; gid_t gid


def peer_cred(sock: socket.socket) -> PeerCred:
    pid, uid, gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return PeerCred(pid=pid, uid=uid, gid=gid)
