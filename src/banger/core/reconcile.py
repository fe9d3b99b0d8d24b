"""Reconcile at daemon start: what the records say against what runs on the host.

Every VM is observed (:meth:`VMContext.observe`: a dead VMM demotes its VM, a live one
keeps it with the same pid), a start the daemon died in is finished (torn down), and the
taps and NAT rules left behind are swept.
"""

from __future__ import annotations

import logging
from ipaddress import IPv4Address

from banger.core.context import LIVE_STATES, VMContext
from banger.model.vm import VM, NetworkMode, VMState

log = logging.getLogger(__name__)


def reconcile(ctx: VMContext) -> list[VM]:
    """At daemon start: keep live VMs (same pid), tear down dead or half-started ones."""
    out = []
    for vm in ctx.repo.list():
        with ctx.lock(vm.id):
            if vm.state is VMState.STARTING:
                # A start interrupted by a daemon crash: nothing finished it.
                ctx.release(vm, ctx.layout.vm(vm.id))
                vm = vm.with_state(VMState.ERROR, ctx.clock(),
                                   error="the daemon stopped during this start",
                                   stage=vm.last_error_stage)
                ctx.repo.update(vm)
            else:
                vm = ctx.observe(vm)
        out.append(vm)
    _sweep_network(ctx, out)
    return out


def _sweep_network(ctx: VMContext, vms: list[VM]) -> None:
    """Remove taps and NAT rules banger made for VMs that are not running (left by a
    crash, or by a VM deleted while the daemon was down), and put back the rules of
    running --nat VMs (a firewall reload or a Docker start since may have dropped
    them or added a drop chain they must be accepted in)."""
    net = ctx.host.net
    if net.unavailable() is not None:
        return
    live = {v.id for v in vms if v.state in LIVE_STATES}
    bridge = ctx.config().network.bridge
    for vm in vms:
        if (vm.state in LIVE_STATES and vm.spec.network is NetworkMode.TAP
                and vm.spec.nat and vm.guest_ip):
            net.add_nat(vm.id, IPv4Address(vm.guest_ip), bridge)
    for tap in net.taps():
        owner = tap[2:]
        if not any(vm_id.startswith(owner) for vm_id in live):
            log.info("removing leftover tap %s", tap)
            net.delete_tap(tap)
    for vm_id in net.nat_vm_ids() - live:
        log.info("removing leftover NAT rules of VM %s", vm_id)
        net.remove_nat(vm_id)
