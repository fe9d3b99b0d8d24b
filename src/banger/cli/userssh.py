"""The edit of the user's ``~/.ssh/config``: one marker-fenced ``Include`` of banger's
ssh_config at its top (:func:`install`), removed again on request (:func:`uninstall`).

The file is the user's, so the CLI, running as the user, edits it, never the daemon.
The rest of the file is kept byte for byte, as are its mode and owner. Run as root in
someone's home, it writes only into files and directories of that home's owner, never
through a link that leads elsewhere (:func:`_edit`). The block's format is shared with
the daemon (its doctor checks for it): :mod:`banger.local.sshconfig`.
"""

from __future__ import annotations

import errno
import os
import pwd
import stat
from collections.abc import Callable
from pathlib import Path

from banger.local.sshconfig import SshConfigError, block, find_block, replace_at


def install(user_ssh_config: Path, include_path: Path) -> bool:
    """Put the ``Include "<include_path>"`` block first in ``user_ssh_config``; True when
    the file changed. Creates ``~/.ssh`` (0700) and the file (0600) when missing. An
    existing block for another path, or not at the top, is replaced. See
    :func:`_edit` for what is refused."""
    wanted = block(include_path)

    def change(path: Path, data: bytes | None) -> bytes | None:
        rest = data or b""
        span = find_block(path, rest)
        if span is not None:
            if span[0] == 0 and rest[span[0]:span[1]] == wanted:
                return None
            rest = rest[:span[0]] + rest[span[1]:]
        return wanted + rest

    return _edit(user_ssh_config, change, create=True)


def uninstall(user_ssh_config: Path) -> bool:
    """Remove banger's block (and nothing else); True when the file changed."""
    if not os.path.lexists(user_ssh_config):
        return False

    def change(path: Path, data: bytes | None) -> bytes | None:
        span = find_block(path, data) if data is not None else None
        if data is None or span is None:
            return None
        return data[:span[0]] + data[span[1]:]

    return _edit(user_ssh_config, change, create=False)


# -- editing a file in someone's home, possibly as root --------------------------------------

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _edit(user_ssh_config: Path, change: Callable[[Path, bytes | None], bytes | None], *,
          create: bool) -> bool:
    """Replace the file ``user_ssh_config`` names (its target when it is a symlink) with
    ``change(path, old bytes or None)`` unless that returns None; True when it did.

    The file belongs to the owner of the home it is in (``~/.ssh/config``'s grandparent):
    the caller, or anyone when the caller is root (root setting up a user's ssh). As root
    banger must not be led by that user (or a third) to write elsewhere, so it refuses,
    naming the path and its owner, when: the home's owner is not the caller (and the
    caller is not root); a directory on the way to the file is owned by anyone but that
    owner or root; the directory the file is in, or the file itself, is not that owner's.
    A symlinked ~/.ssh/config (dotfile managers) works when its target passes the same
    checks. Every step goes through directory file descriptors opened without following
    symlinks, so a path swapped between the checks and the write is refused, not
    followed; the write is a new file in the same directory renamed over the old one.
    """
    path = Path(os.path.abspath(user_ssh_config))
    home = path.parent.parent
    owner = _existing_owner(home)
    me = os.geteuid()
    if me not in (0, owner[0]):
        raise SshConfigError(f"refusing to edit {path}: the home {home} belongs to "
                             f"{_who(owner[0])}, not to you ({_who(me)})")
    trusted = {0, owner[0]}
    try:
        fd = _walk(path.parent, trusted, owner if create else None)
    except FileNotFoundError:
        if create:
            raise
        return False  # nothing there to remove a block from
    try:
        name = path.name
        if _is_link(fd, name):
            # Resolved once, then walked again without following: a link swapped in
            # meanwhile ends the walk with an error instead of being followed.
            target = Path(os.path.realpath(path))
            os.close(fd)
            fd = -1
            try:
                fd = _walk(target.parent, trusted, owner if create else None)
            except FileNotFoundError:
                if create:
                    raise
                return False  # a dangling link: no block to remove
            name = target.name
            path = target
        dst = os.fstat(fd)
        if dst.st_uid != owner[0]:
            raise SshConfigError(f"refusing to edit {path}: its directory belongs to "
                                 f"{_who(dst.st_uid)}, not to {_who(owner[0])} whose home "
                                 f"{home} it is for")
        data, st = _read(fd, name, path)
        if st is not None and st.st_uid != owner[0]:
            raise SshConfigError(f"refusing to edit {path}: it belongs to {_who(st.st_uid)}, "
                                 f"not to {_who(owner[0])} whose home {home} it is in; "
                                 f"fix its owner (chown) and retry")
        if data is None and not create:
            return False
        new = change(path, data)
        if new is None:
            return False
        if st is None:
            mode, keep = 0o600, (owner[0], dst.st_gid)
        else:
            mode, keep = st.st_mode & 0o7777, (st.st_uid, st.st_gid)
        replace_at(fd, name, new, mode=mode, owner=keep)
        return True
    finally:
        if fd >= 0:
            os.close(fd)


def _existing_owner(path: Path) -> tuple[int, int]:
    """(uid, gid) of ``path``, or of its nearest existing parent (a home not made yet)."""
    while True:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            if path.parent == path:
                raise
            path = path.parent
            continue
        return st.st_uid, st.st_gid


def _who(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _walk(directory: Path, trusted: set[int], create: tuple[int, int] | None) -> int:
    """An fd of ``directory``, reached from / one component at a time without following
    a symlink, each owned by a uid in ``trusted``. Missing ones are made (0700, owned by
    ``create``) when ``create`` is given."""
    real = Path(os.path.realpath(directory))
    fd = os.open("/", _DIR)
    try:
        walked = Path("/")
        for part in real.parts[1:]:
            walked = walked / part
            try:
                nfd = os.open(part, _DIR, dir_fd=fd)
            except FileNotFoundError:
                if create is None:
                    raise
                # mkdir's mode passes through the umask, and ssh insists on a private
                # ~/.ssh; root making a user's ~/.ssh makes it that user's.
                os.mkdir(part, 0o700, dir_fd=fd)
                nfd = os.open(part, _DIR, dir_fd=fd)
                os.fchmod(nfd, 0o700)
                if os.geteuid() == 0:
                    os.fchown(nfd, *create)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise SshConfigError(f"refusing to edit under {directory}: {walked} "
                                         f"changed into a symlink or file while banger "
                                         f"looked at it; check it and retry") from exc
                raise
            os.close(fd)
            fd = nfd
            uid = os.fstat(fd).st_uid
            if uid not in trusted:
                raise SshConfigError(f"refusing to edit under {directory}: {walked} belongs "
                                     f"to {_who(uid)}, who could redirect the write; only "
                                     f"{' or '.join(_who(u) for u in sorted(trusted))} "
                                     f"may own it")
        return fd
    except BaseException:
        os.close(fd)
        raise


def _is_link(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode)
    except FileNotFoundError:
        return False


def _read(dir_fd: int, name: str, path: Path) -> tuple[bytes | None, os.stat_result | None]:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dir_fd)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SshConfigError(f"refusing to edit {path}: it changed into a symlink while "
                                 f"banger looked at it; check it and retry") from exc
        raise
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise SshConfigError(f"refusing to edit {path}: it is not a regular file")
        return f.read(), st
