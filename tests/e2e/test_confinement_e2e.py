"""QEMU confined (seccomp sandbox, unprivileged user, handed only its own files), paths
with commas, and a full host disk: through the real CLI and daemon."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import Banger, assert_nothing_left, finish, make_banger, qemu_pids

pytestmark = pytest.mark.e2e


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


# Run as QEMU's identity: which of these paths can it open (or connect to)?
_PROBE = """
import json, os, socket, sys
opened = []
for p in sys.argv[1:]:
    try:
        if p.endswith(".sock"):
            s = socket.socket(socket.AF_UNIX); s.connect(p); s.close()
        else:
            os.close(os.open(p, os.O_RDONLY))
        opened.append(p)
    except OSError:
        pass
print(json.dumps(opened))
"""


def test_qemu_is_sandboxed_unprivileged_and_reaches_nothing_of_banger(banger: Banger) -> None:
    banger.run("vm", "run", "--name", "sb", "--", "true")
    (pid,) = qemu_pids(str(banger.home))
    status = proc_status(pid)
    assert status["Seccomp"] == "2", status  # -sandbox: seccomp filter mode
    uids = {int(u) for u in status["Uid"].split()}
    gids = {int(g) for g in status["Gid"].split()}
    groups = {int(g) for g in status["Groups"].split()}
    if os.geteuid() == 0:
        assert 0 not in uids | gids | groups, status  # real, effective, saved, fs: none root
        (uid,), (gid,) = uids, gids
        vm = banger.show("sb")
        vm_dir = Path(str(vm["dir"]))
        secrets = [banger.home / "state" / "banger.db",
                   banger.home / "state" / "ssh" / "id_ed25519",
                   banger.home / "state" / "ssh" / "known_hosts",
                   vm_dir / "root.qcow2", vm_dir / "work.ext4", vm_dir / "serial.log",
                   *(banger.home / "run" / "vms").glob("*/*.sock"),
                   banger.home / "run" / "bangerd.sock", Path("/etc/hostname")]
        assert all(p.exists() for p in secrets), [p for p in secrets if not p.exists()]
        # The system python: the test venv may sit where that user cannot reach.
        probe = subprocess.run(["/usr/bin/python3", "-I", "-c", _PROBE, *map(str, secrets)],
                               user=uid, group=gid, extra_groups=sorted(groups),
                               capture_output=True, text=True, check=True, cwd="/")
        # /etc/hostname: the probe does open what that user may read.
        assert json.loads(probe.stdout) == ["/etc/hostname"], "QEMU's user opens banger's files"
    # The daemon still finds it after a restart, with its handles file gone too.
    before = banger.show("sb")["runtime"]
    banger.stop_daemon()
    for handles in (banger.home / "state" / "vms").glob("*/handles.json"):
        handles.unlink()
    assert banger.show("sb")["state"] == "running"
    after = banger.show("sb")["runtime"]
    assert isinstance(before, dict) and isinstance(after, dict)
    assert (after["pid"], after["ssh_port"]) == (before["pid"], before["ssh_port"])
    banger.run("vm", "ssh", "sb", "--", "true")
    banger.run("vm", "stop", "sb")  # QMP (and the guest's poweroff) still work
    assert banger.show("sb")["state"] == "stopped"
    assert qemu_pids(str(banger.home)) == []
    banger.run("vm", "delete", "sb")
    assert_nothing_left(banger)


def test_a_comma_in_banger_home_works(image_dir: Path) -> None:
    b = make_banger(images_dir=image_dir, prefix="bg-a,b-")
    assert "," in str(b.home)
    try:
        proc = b.run("vm", "run", "--name", "cm", "--", "cat", "/etc/hostname")
        assert proc.stdout.strip() == "cm"
        (pid,) = qemu_pids(str(b.home))
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert str(b.home).encode() not in b"".join(cmdline)  # only ever escaped
        b.run("vm", "delete", "cm")
        assert_nothing_left(b)
    finally:
        finish(b)


def _fill(mount: Path, leave: int) -> None:
    """Fill ``mount`` until ``leave`` bytes are free."""
    st = os.statvfs(mount)
    with (mount / "filler").open("wb") as f, contextlib.suppress(OSError):
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))


def test_full_host_disk_is_said_and_leaves_nothing(image_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    b = make_banger(images_dir=image_dir)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0700", "tmpfs",
                    str(b.home)], check=True)
    try:
        b.run("vm", "list")  # the daemon, its database and socket exist first
        _fill(b.home, 1 << 20)
        proc = b.run("vm", "run", "--rm", "--name", "full", "--", "true", check=False)
        assert proc.returncode == 1
        err = " ".join(proc.stderr.split())
        assert "the host disk holding" in err and "is full (" in err, proc.stderr
        assert "free space or move BANGER_HOME" in err and "too small" not in err
        assert qemu_pids(str(b.home)) == []
        # --rm leaves nothing, a failed start included: no record, no partial disk.
        assert "the VM full is deleted (--rm)" in err
        assert json.loads(b.run("vm", "list", "--json").stdout) == []
        (b.home / "filler").unlink()
        assert_nothing_left(b)
        assert not any((b.home / "state" / "vms").iterdir())
        assert json.loads(b.run("vm", "list", "--json").stdout) == []
    finally:
        b.stop_daemon()
        for pid in qemu_pids(str(b.home)):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while subprocess.run(["umount", str(b.home)]).returncode != 0:
            assert time.monotonic() < deadline, f"cannot unmount {b.home}"
            time.sleep(0.2)
        shutil.rmtree(b.home, ignore_errors=True)
