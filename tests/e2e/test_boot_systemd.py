"""Boot the systemd image variant: banger-init's setup, then systemd as PID 1."""

from __future__ import annotations

import pytest

from banger.host import qemu, qemu_cmdline, ssh, vmmproc

from .conftest import Vm, agent_uname, wait_agent_hello

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

BOOT_TIMEOUT = 240.0  # systemd under TCG on a loaded 2-core machine


def test_systemd_image_boots_runs_and_powers_off(systemd_vm: Vm) -> None:
    vm = systemd_vm
    assert "banger.init=systemd" in vm.cfg.boot.cmdline.split()
    assert vm.cfg.boot.initrd is None, "the systemd image boots the microVM kernel too"
    pid = qemu.launch(vm.cfg, vm.accel)
    channel = qemu_cmdline.agent_socket(vm.cfg)
    hello = wait_agent_hello(channel, pid, vm.cfg.serial_log)
    waited = ssh.wait_ready(port=vm.ssh_port, key=vm.key, known_hosts=vm.known_hosts,
                            alias=vm.alias, timeout=BOOT_TIMEOUT,
                            serial_log=vm.cfg.serial_log, alive=lambda: vmmproc.pid_alive(pid))
    print(f"systemd image, boot to ssh: {waited:.1f} s ({vm.accel})")
    # The agent runs under systemd as its own early unit, restarted if it dies.
    boot_id, release = agent_uname(channel)
    assert boot_id == hello.boot_id
    assert release == vm.ssh("uname -r").stdout.strip()
    assert "banger@banger" in vm.ssh("cat /proc/version").stdout  # kernelbuild's banner
    agent_unit = vm.ssh("systemctl is-active banger-agent.service; "
                        "systemctl show -p Restart --value banger-agent.service")
    assert agent_unit.stdout.split() == ["active", "always"], agent_unit.stderr
    assert vm.ssh("systemctl kill -s KILL banger-agent.service").returncode == 0
    assert agent_uname(channel) == (boot_id, release)
    serial = vm.cfg.serial_log.read_text()
    assert "handing PID 1 to systemd" in serial
    assert "sshd started" in serial  # from banger-sshd-ready.service

    state = vm.ssh("systemctl is-system-running --wait", timeout=180)
    if state.stdout.strip() != "running":
        failed = vm.ssh("systemctl --failed --no-legend --plain").stdout
        print(f"system state {state.stdout.strip()!r}; failed units:\n{failed}")
    assert state.stdout.strip() in ("running", "degraded"), state.stdout + state.stderr

    facts = vm.ssh("cat /proc/1/comm; hostname; findmnt -no SOURCE /root; "
                        "findmnt -no SOURCE /; stat -c %a /root/.ssh; "
                        "ip -4 -o addr show dev eth0 | awk '{print $4}'; "
                        "systemctl is-active ssh.service dbus.service; "
                        "systemctl is-enabled systemd-resolved.service serial-getty@ttyS0 "
                        "apt-daily.timer || true")
    assert facts.returncode == 0, facts.stderr
    assert facts.stdout.split() == ["systemd", "e2e-box", "/dev/vdb", "/dev/vda", "700",
                                    "10.0.2.15/24", "active", "active",
                                    "masked", "masked", "masked"]
    # The journal stays in memory.
    journal = vm.ssh("find /run/log/journal /var/log/journal -type f -name '*.journal'")
    assert journal.stdout.strip(), journal.stderr
    assert all(f.startswith("/run/log/journal/") for f in journal.stdout.split())
    assert vmmproc.qmp_status(vm.cfg.control_socket) == "running"

    vm.assert_powers_off(pid, "banger-poweroff", within=15)


def test_systemd_image_orderly_poweroff_ends_the_vmm(systemd_vm: Vm) -> None:
    """systemd's own `poweroff` (stop units, unmount, power off) also ends QEMU."""
    vm = systemd_vm
    pid = qemu.launch(vm.cfg, vm.accel)
    ssh.wait_ready(port=vm.ssh_port, key=vm.key, known_hosts=vm.known_hosts,
                   alias=vm.alias, timeout=BOOT_TIMEOUT, serial_log=vm.cfg.serial_log,
                   alive=lambda: vmmproc.pid_alive(pid))
    vm.assert_powers_off(pid, "systemctl poweroff", within=30)
