"""Fixtures for booting real VMs: the default image (built once, cached) and a VM dir."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from banger.host import disks, imagebuild, kvm, qemu, ssh

DEFAULT_IMAGE_DIR = Path.home() / ".cache/banger-test/images/debian-bookworm"


@pytest.fixture(scope="session")
def image() -> imagebuild.ImageArtifacts:
    for tool in (qemu.QEMU, "qemu-img", "mmdebstrap", "ssh"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    d = Path(os.environ.get("BANGER_TEST_IMAGE_DIR", DEFAULT_IMAGE_DIR))
    if (d / imagebuild.MANIFEST).exists():
        return imagebuild.load_image(d)
    return imagebuild.build_default_image(d, on_progress=lambda s: print(f"image: {s}"))


@pytest.fixture(scope="session")
def accel() -> str:
    choice = kvm.probe_accel()
    print(f"accel: {choice.accel} ({choice.reason})")
    return choice.accel


@dataclass
class Vm:
    dir: Path
    cfg: qemu.QemuConfig
    key: Path
    known_hosts: Path
    alias: str
    pid: int | None = None

    def ssh_argv(self, command: str) -> list[str]:
        return [*ssh.ssh_base_argv(port=self.cfg.ssh_port, key=self.key,
                                   known_hosts=self.known_hosts, alias=self.alias),
                command]


@pytest.fixture
def vm(image: imagebuild.ImageArtifacts, accel: str) -> Iterator[Vm]:
    """Disks and config of a fresh VM (not launched); afterwards, nothing may be left."""
    d = Path(tempfile.mkdtemp(prefix="bvm-", dir="/tmp"))  # short: QMP socket path limit
    key = d / "id_ed25519"
    pub = ssh.ensure_key(key)
    disks.create_overlay(image.rootfs, d / "root.qcow2")
    disks.build_work_disk(d / "work.ext4", 1 << 30, {
        ".ssh/authorized_keys": (f"{pub}\n".encode(), 0o600),
        ".banger/hostname": (b"e2e-box\n", 0o644),
    })
    cfg = qemu.QemuConfig(
        kernel=image.kernel, initrd=image.initrd, root_disk=d / "root.qcow2",
        work_disk=d / "work.ext4", vcpus=1, memory_mib=512, ssh_port=qemu.free_port(),
        serial_log=d / "serial.log", qmp_socket=d / "qmp.sock", accel=accel,
        hostname="e2e-box", cmdline=image.cmdline)
    machine = Vm(dir=d, cfg=cfg, key=key, known_hosts=d / "known_hosts", alias="e2e-box")
    try:
        yield machine
    finally:
        leftover = qemu.find_qemu_pid(cfg.qmp_socket)
        if leftover is not None:
            qemu.kill_and_wait(leftover, signal.SIGKILL, 5)
        shutil.rmtree(d, ignore_errors=True)
        assert leftover is None, f"a QEMU (pid {leftover}) was left running"
