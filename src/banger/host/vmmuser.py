"""The unprivileged identity QEMU runs as under a root daemon.

QEMU emulates devices for an untrusted guest; a guest that escapes into it must not land in
a root process. Under a root daemon QEMU is therefore started (``subprocess`` ``user=`` /
``group=`` / ``extra_groups=``, so it never holds root, not even while it starts) as a
dedicated system user, created on demand like libvirt's ``libvirt-qemu``: ``banger-qemu``
(``BANGER_QEMU_USER`` names another), and for each further VM running at the same time
``banger-qemu-1``, ``banger-qemu-2`` ... (:func:`user_name`), each with its own group, so
that no two running QEMUs share a uid: a QEMU taken over by its guest cannot ptrace or
signal another VM's QEMU. Their only extra group is ``kvm`` where that group exists, for
``/dev/kvm``.

Not QEMU's own ``-runas``: that switches user only after QEMU has opened its files and
set up its devices as root, and keeps root's supplementary groups out only by
``initgroups``; starting it as the user means no QEMU code ever runs as root.

That user owns no file and can open none of banger's: the daemon opens every file QEMU
needs (and attaches to the VM's tap, which has no owner) and hands it over as an inherited
descriptor (see :mod:`banger.host.qemu`). Where
the daemon is not root, QEMU runs as the daemon's own user, as before (:func:`resolve`
returns None).
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import shutil
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

from banger.host.runner import CommandError, run

DEFAULT_USER = "banger-qemu"
ENV_USER = "BANGER_QEMU_USER"


class VmmUserError(Exception):
    """The unprivileged QEMU user is missing and could not be created, or is root."""


@dataclass(frozen=True)
class RunAs:
    """An identity to start QEMU as: uid, primary gid, supplementary groups."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    def can_access(self, path: Path, mode: int) -> bool:
        """Whether this identity passes the permission bits of ``path`` for ``mode``
        (``os.R_OK``/``os.W_OK`` bits), as the kernel checks them on open."""
        try:
            st = os.stat(path)
        except OSError:
            return False
        want = ((4 if mode & os.R_OK else 0) | (2 if mode & os.W_OK else 0)
                | (1 if mode & os.X_OK else 0))
        if st.st_uid == self.uid:
            bits = (st.st_mode & stat.S_IRWXU) >> 6
        elif st.st_gid == self.gid or st.st_gid in self.groups:
            bits = (st.st_mode & stat.S_IRWXG) >> 3
        else:
            bits = st.st_mode & stat.S_IRWXO
        return bits & want == want


_lock = threading.Lock()


MAX_SLOTS = 512  # VMs running at once under a root daemon: one user each


def user_name(slot: int = 0) -> str:
    """The QEMU user of ``slot``: the base name, then ``<base>-1``, ``<base>-2`` ..."""
    base = os.environ.get(ENV_USER) or DEFAULT_USER
    return base if slot == 0 else f"{base}-{slot}"


def is_vmm_user(uid: int) -> bool:
    """Whether ``uid`` is one of the QEMU users (:func:`user_name` of some slot)."""
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        return False
    base = user_name(0)
    return uid != 0 and (name == base or re.fullmatch(re.escape(base) + r"-[0-9]+", name)
                         is not None)


def resolve(slot: int = 0) -> RunAs | None:
    """The identity QEMU runs as: None when the daemon is not root (QEMU runs as the
    daemon's user); else the user of ``slot`` (:func:`user_name`), created as a system
    user with its own group, without home or shell, when it does not exist yet."""
    if os.geteuid() != 0:
        return None
    if not 0 <= slot < MAX_SLOTS:
        raise VmmUserError(f"no QEMU user left: {MAX_SLOTS} VMs already run at once")
    name = user_name(slot)
    with _lock:
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            _create(name)
            pw = pwd.getpwnam(name)
    if pw.pw_uid == 0 or pw.pw_gid == 0:
        raise VmmUserError(f"QEMU user {name!r} is root (uid {pw.pw_uid}, gid {pw.pw_gid}): "
                           f"set {ENV_USER} to an unprivileged user")
    groups: tuple[int, ...] = ()
    # No kvm group: /dev/kvm, if any, stays root's and the probe picks TCG.
    with contextlib.suppress(KeyError):
        groups = (grp.getgrnam("kvm").gr_gid,)
    return RunAs(name, pw.pw_uid, pw.pw_gid, groups)


def _create(name: str) -> None:
    try:
        # sbin may be missing from the PATH the daemon inherited (sudo, cron).
        useradd = shutil.which("useradd", path=os.pathsep.join(
            [os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])) or "useradd"
        run([useradd, "--system", "--user-group", "--no-create-home",
             "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin",
             "--comment", "banger QEMU (unprivileged VMM)", name])
    except CommandError as exc:
        try:
            pwd.getpwnam(name)  # created meanwhile by another daemon: fine
        except KeyError:
            raise VmmUserError(f"cannot create the unprivileged QEMU user {name!r} "
                               f"(useradd): {exc}; create it yourself or set {ENV_USER} "
                               f"to an existing unprivileged user") from exc
