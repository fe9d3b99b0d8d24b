"""The root disk of an OCI image: banger's boot path put into the rootfs directory, then an
ext4 built from it with ``mke2fs -d`` (no mount, no root).

The boot path lives in ``/.banger/`` and needs nothing of the image: ``init`` (the shell
script ``host/guest/oci-init``) run by a static busybox (Debian's busybox-static, copied
from the host) whose applets are linked in ``/.banger/bin`` for that script alone, and the
static guest agent. busybox init stays PID 1 (it reaps orphans; the agent cannot be PID 1
today) with banger's ``/etc/inittab`` written over the image's: the image's own init
system, if it has one, is not used. The image's files keep their owners: ``mke2fs -d``
records every file as root (run in a user namespace when banger is not root) and
``debugfs`` then sets the owners the layers recorded.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

from banger.host.runner import CommandError, run

BOOT_DIR = ".banger"
INIT = f"/{BOOT_DIR}/init"
CMDLINE = f"init={INIT}"
BUSYBOX_HOST = Path("/bin/busybox")  # Debian's busybox-static: no libc needed in the image
MOUNTPOINTS = ("proc", "sys", "dev", "run", "tmp", "root", "etc")
log = logging.getLogger(__name__)
_NOFOLLOW_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class DiskError(Exception):
    """The root disk could not be built."""


def guest_file(name: str) -> bytes:
    return (resources.files("banger.host") / "guest" / name).read_bytes()


def inject_boot_path(rootfs: Path, agent: Path, busybox: Path = BUSYBOX_HOST) -> None:
    """Put /.banger/{init,busybox,banger-agent,bin/} and /etc/inittab into ``rootfs``,
    replacing whatever the image had at those names (never writing through its links)."""
    root_fd = os.open(rootfs, _NOFOLLOW_DIR)
    try:
        for name in (BOOT_DIR, *MOUNTPOINTS):
            if name == BOOT_DIR or not _is_dir(root_fd, name):
                _remove(root_fd, name)
                os.mkdir(name, 0o755, dir_fd=root_fd)
        boot = os.open(BOOT_DIR, _NOFOLLOW_DIR, dir_fd=root_fd)
        try:
            _write(boot, "init", guest_file("oci-init"), 0o755)
            _write(boot, "busybox", busybox.read_bytes(), 0o755)
            _write(boot, "banger-agent", agent.read_bytes(), 0o755)
            os.mkdir("bin", 0o755, dir_fd=boot)
            bin_fd = os.open("bin", _NOFOLLOW_DIR, dir_fd=boot)
            try:
                for applet in _applets(busybox):
                    os.symlink(f"/{BOOT_DIR}/busybox", applet, dir_fd=bin_fd)
            finally:
                os.close(bin_fd)
        finally:
            os.close(boot)
        etc = os.open("etc", _NOFOLLOW_DIR, dir_fd=root_fd)
        try:
            _remove(etc, "inittab")
            _write(etc, "inittab", guest_file("oci-inittab"), 0o644)
        finally:
            os.close(etc)
    finally:
        os.close(root_fd)


def build_ext4(rootfs: Path, out: Path, owners: Mapping[str, tuple[int, int]]) -> int:
    """ext4 at ``out`` holding ``rootfs``, every file root's but ``owners``; returns the
    MiB of files."""
    used, entries = _used(rootfs)
    size_mib = max(1024, used * 3 // 2 // (1 << 20) + 256)  # sparse: headroom is free
    inodes = entries * 5 // 4 + 4096  # by count too: many small files outrun the bytes
    out.unlink(missing_ok=True)
    mkfs = ["mkfs.ext4", "-q", "-F", "-L", "banger-root", "-m", "0", "-N", str(inodes),
            "-d", str(rootfs), str(out), f"{size_mib}M"]
    if os.geteuid() != 0:
        mkfs = ["unshare", "-r", *mkfs]  # uid 0 inside: files recorded as root's
    try:
        run(mkfs, timeout=1800)
        if owners:
            script = out.with_name(out.name + ".owners")
            script.write_bytes(b"".join(_owner_cmds(rootfs, owners)))
            try:
                done = run(["debugfs", "-w", "-f", str(script), str(out)], timeout=1800)
            finally:
                script.unlink(missing_ok=True)
            # debugfs exits 0 whatever its commands did: its complaints are on stderr.
            bad = [ln for ln in done.stderr.splitlines()
                   if ln.strip() and not ln.startswith("debugfs ")]
            if bad:
                out.unlink(missing_ok=True)
                raise DiskError(f"could not set owners on the root disk: {bad[0][:300]}")
    except CommandError as exc:
        out.unlink(missing_ok=True)
        raise DiskError(f"could not build the root disk: {exc}") from exc
    return used >> 20


def _owner_cmds(rootfs: Path, owners: Mapping[str, tuple[int, int]]) -> list[bytes]:
    """debugfs commands setting ``owners``, as bytes (a name need not be UTF-8). A name
    with a symlink or a non-directory along its path in ``rootfs`` is skipped (debugfs
    follows links mid-path: it would set the owner of what the link points to)."""
    cmds = []
    real_dirs: set[str] = {""}
    for rel, (uid, gid) in sorted(owners.items()):
        if rel == BOOT_DIR or rel.startswith(BOOT_DIR + "/"):
            continue
        if any(c in rel for c in '"\n\r\\'):
            log.info("owner of %r not set: debugfs cannot quote it (it stays root's)", rel)
            continue
        if not _real_parents(rootfs, rel, real_dirs):
            log.info("owner of %r not set: a symlink or a file along its path", rel)
            continue
        path = os.fsencode("/" + rel)
        cmds.append(b'sif "%s" uid %d\nsif "%s" gid %d\n' % (path, int(uid), path, int(gid)))
    return cmds


def _real_parents(rootfs: Path, rel: str, real_dirs: set[str]) -> bool:
    """Every parent of ``rel`` is a directory in ``rootfs``, not a symlink (each checked
    with lstat after its own parent was, so no lstat goes through a link)."""
    parts = rel.split("/")
    for i in range(1, len(parts)):
        prefix = "/".join(parts[:i])
        if prefix in real_dirs:
            continue
        try:
            st = os.lstat(rootfs / prefix)
        except OSError:
            return False
        if not stat.S_ISDIR(st.st_mode):
            return False
        real_dirs.add(prefix)
    return True


def _used(root: Path) -> tuple[int, int]:
    """Bytes the tree takes on disk, and how many entries it has."""
    total = count = 0
    for parent, dirs, files in os.walk(root):
        for n in files + dirs:
            count += 1
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(parent, n)).st_blocks * 512
    return total, count


def _applets(busybox: Path) -> list[str]:
    out = run([str(busybox), "--list"], timeout=30).stdout.split()
    return [a for a in out if a and "/" not in a and not a.startswith(".")]


def _is_dir(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(name, dir_fd=dir_fd).st_mode)
    except FileNotFoundError:
        return False


def _remove(dir_fd: int, name: str) -> None:
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)


def _write(dir_fd: int, name: str, data: bytes, mode: int) -> None:
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 mode, dir_fd=dir_fd)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        os.fchmod(f.fileno(), mode)
