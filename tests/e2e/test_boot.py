"""Boot the default image for real (KVM if it truly works here, else TCG) and use it."""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import time

import pytest

from banger.host import disks, imagebuild, qemu, qemu_cmdline, ssh, vmmproc

from .conftest import Vm, agent_uname, wait_agent_hello

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

BOOT_TIMEOUT = 180.0  # TCG on a loaded 2-core machine


def test_boot_ssh_and_poweroff(vm: Vm, image: imagebuild.ImageArtifacts) -> None:
    # banger's microVM kernel, no initramfs: it mounts /dev/vda itself.
    assert vm.cfg.boot.initrd is None and vm.cfg.boot.kernel == image.microvm_kernel
    pid = qemu.launch(vm.cfg, vm.accel)
    # The agent says HELLO first (it starts before sshd); then ssh answers too.
    hello = wait_agent_hello(qemu_cmdline.agent_socket(vm.cfg), pid, vm.cfg.serial_log)
    print(f"boot to the agent's hello: guest boot id {hello.boot_id}")
    waited = ssh.wait_ready(port=vm.ssh_port, key=vm.key, known_hosts=vm.known_hosts,
                            alias=vm.alias, timeout=BOOT_TIMEOUT,
                            serial_log=vm.cfg.serial_log, alive=lambda: vmmproc.pid_alive(pid))
    print(f"boot to ssh: {waited:.1f} s ({vm.accel})")
    assert "banger: " in vm.cfg.serial_log.read_text()
    assert "sshd started" in vm.cfg.serial_log.read_text()

    assert vm.ssh('sh -c "exit 42"').returncode == 42
    assert "bookworm" in vm.ssh("cat /etc/os-release").stdout
    facts = vm.ssh("hostname; findmnt -no SOURCE /root; findmnt -no SOURCE /; "
                        "stat -c %a /root/.ssh; cat /proc/1/comm")
    assert facts.returncode == 0, facts.stderr
    assert facts.stdout.split() == ["e2e-box", "/dev/vdb", "/dev/vda", "700", "busybox"]
    # Orphans are reaped by PID 1: no zombies after a background child's parent exits.
    zombies = vm.ssh("sh -c '(sleep 0.2 &) ; sleep 1; ps -eo stat= | grep -c ^Z'")
    assert zombies.stdout.strip() == "0"
    assert vmmproc.qmp_status(vm.cfg.control_socket) == "running"
    # The agent runs the guest's commands: the same kernel ssh sees, the boot id its
    # hello said (a second connection: the agent took the first one's end in its stride).
    boot_id, release = agent_uname(qemu_cmdline.agent_socket(vm.cfg))
    assert boot_id == hello.boot_id == vm.ssh("cat /proc/sys/kernel/random/boot_id"
                                               ).stdout.strip()
    assert release == vm.ssh("uname -r").stdout.strip() == image.microvm_kernel_version
    assert "banger@banger" in vm.ssh("cat /proc/version").stdout  # built by kernelbuild
    assert "banger-initrd" not in vm.cfg.serial_log.read_text()
    # No udev: the port is a devtmpfs node (/dev/vportNp1, N as the virtio devices were
    # enumerated), found by the name sysfs gives it.
    port = vm.ssh("for p in /sys/class/virtio-ports/*; do "
                  "echo ${p##*/} $(cat $p/name); done; ls /dev/vport*")
    name, label, node = port.stdout.split()
    assert (label, node) == ("banger.agent", f"/dev/{name}"), port.stdout + port.stderr
    # busybox init respawns the agent: killed, it says hello again.
    assert vm.ssh("pkill -KILL -x banger-agent").returncode == 0
    assert agent_uname(qemu_cmdline.agent_socket(vm.cfg)) == (boot_id, release)

    vm.assert_powers_off(pid, "banger-poweroff", within=10)


def test_cloud_kernel_fallback_boots_with_its_initramfs(
        cloud_vm: Vm, image: imagebuild.ImageArtifacts) -> None:
    vm = cloud_vm
    assert vm.cfg.boot.initrd == image.initrd
    pid = qemu.launch(vm.cfg, vm.accel)
    wait_agent_hello(qemu_cmdline.agent_socket(vm.cfg), pid, vm.cfg.serial_log)
    _, release = agent_uname(qemu_cmdline.agent_socket(vm.cfg))
    assert release == image.kernel_version and release.endswith("-cloud-amd64")
    ssh.wait_ready(port=vm.ssh_port, key=vm.key, known_hosts=vm.known_hosts, alias=vm.alias,
                   timeout=BOOT_TIMEOUT, serial_log=vm.cfg.serial_log,
                   alive=lambda: vmmproc.pid_alive(pid))
    vm.assert_powers_off(pid, "banger-poweroff", within=10)


def test_killed_right_after_launch_is_reported(vm: Vm) -> None:
    pid = qemu.launch(vm.cfg, vm.accel)
    assert vmmproc.kill_and_wait(pid, signal.SIGKILL, 5)
    started = time.monotonic()
    with pytest.raises(ssh.VmmDied) as err:
        ssh.wait_ready(port=vm.ssh_port, key=vm.key, known_hosts=vm.known_hosts,
                       alias=vm.alias, timeout=60, serial_log=vm.cfg.serial_log,
                       alive=lambda: vmmproc.pid_alive(pid))
    assert time.monotonic() - started < 2
    assert str(vm.cfg.serial_log) in str(err.value)
    assert vmmproc.port_is_free(vm.ssh_port)


def test_kill_during_boot_is_reported(vm: Vm) -> None:
    pid = qemu.launch(vm.cfg, vm.accel)
    killer = subprocess.Popen(["sh", "-c", f"sleep 2; kill -9 {pid}"])
    try:
        with pytest.raises(ssh.VmmDied, match="exited while waiting"):
            ssh.wait_ready(port=vm.ssh_port, key=vm.key, known_hosts=vm.known_hosts,
                           alias=vm.alias, timeout=60, serial_log=vm.cfg.serial_log,
                           alive=lambda: vmmproc.pid_alive(pid))
    finally:
        killer.wait()


@pytest.mark.parametrize(("machine", "said"), [
    # banger's kernel mounts the root itself: its panic (panic=-1) ends the VMM.
    ("vm", "VFS: Unable to mount root fs"),
    # the cloud kernel's initramfs says so and powers off.
    ("cloud_vm", "root device /dev/vdz did not appear"),
])
def test_missing_root_disk_is_said_on_the_console_and_ends_the_vm(
        machine: str, said: str, request: pytest.FixtureRequest) -> None:
    vm: Vm = request.getfixturevalue(machine)
    cfg = dataclasses.replace(vm.cfg, boot=dataclasses.replace(
        vm.cfg.boot, cmdline=f"{vm.cfg.boot.cmdline} root=/dev/vdz"))
    pid = qemu.launch(cfg, vm.accel)
    with pytest.raises(ssh.VmmDied) as err:
        ssh.wait_ready(port=vm.ssh_port, key=vm.key, known_hosts=vm.known_hosts,
                       alias=vm.alias, timeout=BOOT_TIMEOUT, serial_log=cfg.serial_log,
                       alive=lambda: vmmproc.pid_alive(pid))
    assert str(cfg.serial_log) in str(err.value)
    assert said in cfg.serial_log.read_text()
    assert not vmmproc.pid_alive(pid)


def test_host_key_from_the_work_disk_needs_no_trust_on_first_use(vm: Vm) -> None:
    private, public = ssh.host_keypair(vm.dir)
    work = vm.cfg.work.path
    work.unlink()
    disks.build_work_disk(work, 256 << 20, {
        ".ssh/authorized_keys": ((ssh.ensure_key(vm.key) + "\n").encode(), 0o600),
        ".banger/ssh_host_ed25519_key": (private, 0o600),
        ".banger/ssh_host_ed25519_key.pub": ((public + "\n").encode(), 0o644),
    })
    ssh.trust_host_key(vm.known_hosts, vm.alias, public)
    pid = qemu.launch(vm.cfg, vm.accel)
    ssh.wait_ready(port=vm.ssh_port, key=vm.key, known_hosts=vm.known_hosts,
                   alias=vm.alias, timeout=BOOT_TIMEOUT, serial_log=vm.cfg.serial_log,
                   alive=lambda: vmmproc.pid_alive(pid))
    strict = [a.replace("accept-new", "yes") for a in vm.ssh_argv("hostname")]
    res = subprocess.run(strict, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    # No hostname file on this work disk: the kernel argument names the guest.
    assert res.stdout.strip() == vm.cfg.guest.hostname
    assert vm.known_hosts.read_text().count(vm.alias) == 1
    vm.ssh("banger-poweroff")
    deadline = time.monotonic() + 10
    while vmmproc.pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not vmmproc.pid_alive(pid)
