"""Observation and reconcile: what a VM's record says against what runs on the host.

:func:`observe_locked` demotes a VM whose VMM is gone and rediscovers the handles of one
that still runs (every use case calls it under the VM's lock); :func:`reconcile` does so
for every VM when the daemon starts, and sweeps the taps and NAT rules left behind.
"""

from __future__ import annotations

import logging
from ipaddress import IPv4Address
from typing import TYPE_CHECKING

from banger.core.runtime import Handles
from banger.model.vm import VM, NetworkMode, VMState

if TYPE_CHECKING:
    from banger.core.service import VMService

log = logging.getLogger(__name__)

LIVE_STATES = frozenset({VMState.RUNNING, VMState.STARTING, VMState.STOPPING})


def observe_locked(svc: VMService, vm: VM) -> VM:
    """Demote a VM whose VMM is gone; rediscover handles of one that still runs."""
    if vm.state not in LIVE_STATES:
        return vm
    paths = svc.layout.vm(vm.id)
    h = svc.handles.get(vm.id) or svc.handles.load(paths)
    if h is not None and svc.host.vmm.alive(h.pid, paths.control_socket):
        return vm
    found = svc.host.vmm.rediscover(paths.control_socket)
    if found is not None:
        log.warning("VM %s: handles lost; rediscovered VMM pid %d", vm.name, found.pid)
        tap = vm.spec.network is NetworkMode.TAP and vm.guest_ip is not None
        svc.handles.put(paths, Handles(
            pid=found.pid, ssh_port=22 if tap else found.ssh_port,
            control_socket=str(paths.control_socket),
            accel=svc.host.vmm.accel().accel, boot_id=vm.boot_id or "",
            started_at=svc.clock(), vmm=svc.host.vmm.name,
            accel_reason=svc.host.vmm.accel().reason,
            ssh_host=vm.guest_ip if tap and vm.guest_ip else "127.0.0.1",
            tap=paths.names.tap if tap else None))
        return vm
    svc._release(vm, paths)
    demoted = vm.with_state(
        VMState.STOPPED, svc.clock(),
        error=None if vm.state is VMState.STOPPING else "the VMM process exited",
        stage=None)
    svc.repo.update(demoted)
    return demoted


def reconcile(svc: VMService) -> list[VM]:
    """At daemon start: keep live VMs (same pid), tear down dead or half-started ones."""
    out = []
    for vm in svc.repo.list():
        with svc._lock(vm.id):
            if vm.state is VMState.STARTING:
                # A start interrupted by a daemon crash: nothing finished it.
                svc._release(vm, svc.layout.vm(vm.id))
                vm = vm.with_state(VMState.ERROR, svc.clock(),
                                   error="the daemon stopped during this start",
                                   stage=vm.last_error_stage)
                svc.repo.update(vm)
            else:
                vm = observe_locked(svc, vm)
        out.append(vm)
    _sweep_network(svc, out)
    return out


def _sweep_network(svc: VMService, vms: list[VM]) -> None:
    """Remove taps and NAT rules banger made for VMs that are not running (left by a
    crash, or by a VM deleted while the daemon was down), and put back the rules of
    running --nat VMs (a firewall reload or a Docker start since may have dropped
    them or added a drop chain they must be accepted in)."""
    if svc.host.net.unavailable() is not None:
        return
    live = {v.id for v in vms if v.state in LIVE_STATES}
    bridge = svc._config().network.bridge
    for vm in vms:
        if (vm.state in LIVE_STATES and vm.spec.network is NetworkMode.TAP
                and vm.spec.nat and vm.guest_ip):
            svc.host.net.add_nat(vm.id, IPv4Address(vm.guest_ip), bridge)
    for tap in svc.host.net.taps():
        owner = tap[2:]
        if not any(vm_id.startswith(owner) for vm_id in live):
            log.info("removing leftover tap %s", tap)
            svc.host.net.delete_tap(tap)
    for vm_id in svc.host.net.nat_vm_ids() - live:
        log.info("removing leftover NAT rules of VM %s", vm_id)
        svc.host.net.remove_nat(vm_id)
