"""`banger doctor`: what this host can do, checked for real, with the fix for each problem."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from banger.api.schema import Check, Doctor
from banger.daemon.names import VmNames
from banger.host import nat, net
from banger.host.runner import CommandError, run
from banger.local import sshconfig
from banger.model import netalloc
from banger.model.config import Config, NetworkConfig
from banger.model.layout import Layout
from banger.ports import VmmPort

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
           user_ssh_config: Path, names: VmNames | None = None,
           load_config: Callable[[], Config] | None = None) -> Doctor:
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
    if load_config is not None:
        try:
            cfg = load_config()
        except ValueError as exc:
            checks.append(Check(name="config", status="fail", detail=str(exc)))
        else:
            checks += network_checks(cfg.network, names)
    return Doctor(checks=checks)


def network_checks(cfg: NetworkConfig, names: VmNames | None) -> list[Check]:
    """Tap networking: can it work here, what it found and changed on the host."""
    checks = [Check(name="network default", status="pass",
                    detail=f"{cfg.mode} ([network] mode; --network overrides)")]
    if os.geteuid() != 0:
        checks.append(Check(name="tap networking", status="warn", detail=(
            "needs a root daemon (bridge, taps, NAT); user networking works without it")))
    else:
        link = net.get_link(cfg.bridge)
        status: Literal["pass", "warn", "fail"]
        gateway = f"{netalloc.gateway(cfg.subnet)}/{cfg.subnet.prefixlen}"
        if link is None:
            detail, status = f"bridge {cfg.bridge} ({gateway}) is made at the first tap start", \
                "pass"
        elif link.owned:
            detail, status = f"bridge {cfg.bridge} ({gateway}) is banger's", "pass"
        else:
            detail, status = (f"{cfg.bridge} exists and is not banger's: tap VMs cannot start; "
                              "set [network] bridge to another name"), "fail"
        checks.append(Check(name="tap networking", status=status, detail=detail))
        try:
            forwarding = "on" if nat.ip_forward_enabled() else "off (turned on by the first --nat)"
            drops = [d.describe() for d in nat.forward_drop_chains()]
            checks.append(Check(name="ip forwarding", status="pass", detail=forwarding))
            checks.append(Check(
                name="forward policy", status="warn" if drops else "pass",
                detail="; ".join(drops) + ": --nat adds accept rules for its VMs there"
                if drops else "no foreign FORWARD chain drops by default"))
        except (net.NetworkError, CommandError) as exc:
            checks.append(Check(name="nftables", status="fail", detail=str(exc)))
    if names is not None:
        if names.host_listener is not None:
            host, port = names.host_listener
            checks.append(Check(name="dns", status="pass", detail=(
                f"<name>.vm answered on {host}:{port}; route .vm there to use it from the "
                f"host (dig @{host} -p {port} box.vm)")))
        else:
            checks.append(Check(name="dns", status="warn", detail="; ".join(names.problems)
                                or "host-side .vm DNS is off ([network] dns_port = 0)"))
    return checks


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
