"""`banger doctor`: what this host can do, checked for real, with the fix for each problem."""

from __future__ import annotations

import os
import shutil
import sys

from banger.api.schema import Check, Doctor
from banger.core.ports import VmmPort
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


def doctor(layout: Layout, vmm: VmmPort, images_built: list[str]) -> Doctor:
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
    return Doctor(checks=checks)
