"""`banger doctor`: what this host can do, checked for real, with the fix for each problem."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from banger.api.schema import Check, Doctor
from banger.core.ports import VmmPort
from banger.host import sshconfig
from banger.host.runner import CommandError, run
from banger.model.layout import Layout

TOOLS = {
    "qemu-system-x86_64": "apt-get install qemu-system-x86",
    "qemu-img": "apt-get install qemu-utils",
    "mkfs.ext4": "apt-get install e2fsprogs",
    "debugfs": "apt-get install e2fsprogs",
    "mmdebstrap": "apt-get install mmdebstrap",
    "ssh": "apt-get install openssh-client",
    "ssh-keygen": "apt-get install openssh-client",
    "lz4": "apt-get install lz4",
    "busybox": "apt-get install busybox-static",
}


def doctor(layout: Layout, vmm: VmmPort, images_built: list[str], *,
           user_ssh_config: Path) -> Doctor:
    checks = [Check(name="python", status="pass", detail=sys.version.split()[0])]
    for tool, fix in TOOLS.items():
        path = shutil.which(tool) or (shutil.which(tool, path="/usr/sbin:/sbin") if tool in (
            "mkfs.ext4", "debugfs") else None)
        checks.append(Check(name=tool, status="pass" if path else "fail",
                            detail=path or f"not found: {fix}"))
    try:
        out = run(["qemu-system-x86_64", "--version"], timeout=10).stdout.splitlines()[0]
        checks.append(Check(name="qemu version", status="pass", detail=out))
    except (CommandError, IndexError) as exc:
        checks.append(Check(name="qemu version", status="fail", detail=str(exc)))
    accel = vmm.accel()
    checks.append(Check(name="acceleration", status="pass" if accel.accel == "kvm" else "warn",
                        detail=f"{accel.accel}: {accel.reason}"))
    writable = os.access(layout.state_dir, os.W_OK)
    checks.append(Check(name="state dir", status="pass" if writable else "fail",
                        detail=str(layout.state_dir)))
    checks.append(Check(
        name="default image", status="pass" if images_built else "warn",
        detail=", ".join(images_built) if images_built
        else "not built yet: the first `banger vm run` builds it (a few minutes)"))
    checks.append(ssh_config_check(user_ssh_config, layout.ssh_config))
    return Doctor(checks=checks)


def ssh_config_check(user_ssh_config: Path, include: Path) -> Check:
    """Whether ``ssh <name>.vm`` works from any terminal: the user's ssh config Includes
    banger's. A WARN, not a FAIL: ``banger vm ssh`` works without it."""
    fix = "run `banger ssh-config --install` so that `ssh <name>.vm` works"
    try:
        if sshconfig.is_installed(user_ssh_config, include):
            return Check(name="ssh-config", status="pass",
                         detail=f"{user_ssh_config} includes {include}")
        if sshconfig.is_installed(user_ssh_config):
            return Check(name="ssh-config", status="warn",
                         detail=f"banger's block in {user_ssh_config} includes another "
                                f"file, not {include}: {fix}")
    except (sshconfig.SshConfigError, OSError) as exc:
        return Check(name="ssh-config", status="warn", detail=str(exc))
    return Check(name="ssh-config", status="warn",
                 detail=f"not installed in {user_ssh_config}: {fix}")
