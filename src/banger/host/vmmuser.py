"""The unprivileged identity QEMU runs as under a root daemon.

QEMU emulates devices for an untrusted guest; a guest that escapes into it must not land in
a root process. Under a root daemon QEMU is therefore started (``subprocess`` ``user=`` /
``group=`` / ``extra_groups=``, so it never holds root, not even while it starts) as a
dedicated system user, ``banger-qemu`` by default (``BANGER_QEMU_USER`` names another),
created on demand like libvirt's ``libvirt-qemu``. Its only extra group is ``kvm`` where
that group exists, for ``/dev/kvm``.

Every VM's QEMU runs as this one user. The files of another VM stay out of reach (root's,
0600, reopening another QEMU's descriptors through /proc checks those modes), but a QEMU
taken over by its guest could ptrace another VM's QEMU of the same uid where the kernel's
Yama ``ptrace_scope`` is 0; a user per VM would close that too.

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


def resolve(name: str | None = None) -> RunAs | None:
    """The identity QEMU runs as: None when the daemon is not root (QEMU runs as the
    daemon's user); else ``name`` (default ``$BANGER_QEMU_USER`` or ``banger-qemu``),
    created as a system user without home or shell when it does not exist yet."""
    if os.geteuid() != 0:
        return None
    name = name or os.environ.get(ENV_USER) or DEFAULT_USER
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
        run(["useradd", "--system", "--user-group", "--no-create-home",
             "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin",
             "--comment", "banger QEMU (unprivileged VMM)", name])
    except CommandError as exc:
        try:
            pwd.getpwnam(name)  # created meanwhile by another daemon: fine
        except KeyError:
            raise VmmUserError(f"cannot create the unprivileged QEMU user {name!r} "
                               f"(useradd): {exc}; create it yourself or set {ENV_USER} "
                               f"to an existing unprivileged user") from exc
