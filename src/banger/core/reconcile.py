"""Reconcile at daemon start: what the records say against what runs on the host.

Every VM is observed (:meth:`VMContext.observe`: a dead VMM demotes its VM, a live one
keeps it with the same pid), a start the daemon died in is finished (torn down), and the
taps and NAT rules left behind are swept. What cannot be released does not keep the daemon
from starting: a VM's failure is recorded on it (error, stage ``release_runtime``), a sweep
item's is logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from ipaddress import IPv4Address

from banger.core.context import LIVE_STATES, VMContext
from banger.core.runtime import ReleaseFailed
from banger.core.stages import Stage
from banger.model.vm import VM, NetworkMode, VMState

log = logging.getLogger(__name__)


def reconcile(ctx: VMContext) -> list[VM]:
    """At daemon start: keep live VMs (same pid), tear down dead or half-started ones."""
    out = []
    for vm in ctx.repo.list():
        with ctx.lock(vm.id):
            try:
                out.append(_reconcile_one(ctx, vm))
            except ReleaseFailed as exc:
                # One VM whose tap or VMM will not go must not keep the daemon from
                # starting: its record says what is left (a delete or start retries).
                log.error("VM %s: %s", vm.name, exc)
                failed = vm.with_state(VMState.ERROR, ctx.clock(), error=exc.message,
                                       stage=Stage.RELEASE_RUNTIME.value)
                ctx.repo.update(failed)
                out.append(failed)
    _sweep_network(ctx, out)
    return out


def _reconcile_one(ctx: VMContext, vm: VM) -> VM:
    if vm.state is not VMState.STARTING:
        return ctx.observe(vm)
    # A start interrupted by a daemon crash: nothing finished it.
    ctx.release(vm, ctx.layout.vm(vm.id))
    vm = vm.with_state(VMState.ERROR, ctx.clock(), error="the daemon stopped during this start",
                       stage=vm.last_error_stage)
    ctx.repo.update(vm)
    return vm


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
            _attempt(f"restoring the NAT rules of VM {vm.name}", net.add_nat, vm.id,
                     IPv4Address(vm.guest_ip), bridge)
    for tap in net.taps():
        owner = tap[2:]
        if not any(vm_id.startswith(owner) for vm_id in live):
            log.info("removing leftover tap %s", tap)
            _attempt(f"removing leftover tap {tap}", net.delete_tap, tap)
    for vm_id in net.nat_vm_ids() - live:
        log.info("removing leftover NAT rules of VM %s", vm_id)
        _attempt(f"removing leftover NAT rules of VM {vm_id}", net.remove_nat, vm_id)


def _attempt(what: str, fn: Callable[..., object], *args: object) -> None:
    """One sweep item: a failure is logged and the sweep goes on (the daemon must start;
    the next reconcile, or the VM's own start or delete, tries again)."""
    try:
        fn(*args)
    except Exception as exc:
        log.error("%s failed: %s", what, exc)
