"""LaunchSpec for tests that run the QEMU driver directly (host and e2e tiers, bench):
one user-networking VM whose files all live in one directory."""

from __future__ import annotations

from pathlib import Path

from banger.ports import BootSource, Drive, GuestSettings, LaunchSpec, UserNet


def user_spec(d: Path, *, kernel: Path, initrd: Path | None, ssh_port: int, cmdline: str = "",
              hostname: str = "box", vcpus: int = 1, memory_mib: int = 256,
              backing: Path | None = None, outbound: bool = False,
              serial_log: Path | None = None) -> LaunchSpec:
    """A VM in ``d``: root.qcow2 (over ``backing``), work.ext4, serial.log, vmm.log and
    the control socket qmp.sock."""
    return LaunchSpec(
        vm_id=d.name, boot=BootSource(kernel, initrd, cmdline),
        root=Drive(d / "root.qcow2", backing=backing), work=Drive(d / "work.ext4"),
        vcpus=vcpus, memory_mib=memory_mib, net=UserNet(ssh_port, outbound=outbound),
        guest=GuestSettings(hostname=hostname), serial_log=serial_log or d / "serial.log",
        vmm_log=d / "vmm.log", runtime_dir=d, control_socket=d / "qmp.sock")


def ssh_port(spec: LaunchSpec) -> int:
    assert isinstance(spec.net, UserNet)
    return spec.net.ssh_port
