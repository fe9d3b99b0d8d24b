"""Reading VMs: a VM as shown to users, observed against the host, a running guest's
listening ports, and its sshd for a person's ssh. Reads never wait for a VM's lock: a VM
busy with an operation is shown as its record says."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from banger.core.context import LIVE_STATES, VMContext
from banger.core.guestports import GuestSocketView, reachability
from banger.core.runtime import Handles
from banger.model.errors import ConflictError, NotFoundError, OperationFailed
from banger.model.layout import VMPaths
from banger.model.vm import VM, VMState
from banger.store.vms import NotFound


@dataclass(frozen=True)
class VMView:
    """A VM as shown to users: the record plus what was observed of it just now."""

    vm: VM
    handles: Handles | None
    paths: VMPaths


def view(ctx: VMContext, vm: VM) -> VMView:
    lock = ctx.lock(vm.id)
    if lock.acquire(blocking=False):
        try:
            vm = ctx.observe(ctx.repo.get(vm.id))
        except NotFound as exc:
            raise NotFoundError(f"VM {vm.name!r} no longer exists") from exc
        finally:
            lock.release()
    paths = ctx.layout.vm(vm.id)
    h = ctx.handles.get(vm.id) if vm.state in LIVE_STATES else None
    return VMView(vm=vm, handles=h, paths=paths)


def list_views(ctx: VMContext) -> list[VMView]:
    return [view(ctx, v) for v in ctx.repo.list()]


def ports(ctx: VMContext, ref: str) -> tuple[VM, list[GuestSocketView]]:
    """The running guest's listening sockets (from its agent) and where the host reaches
    each one."""
    shown, channel = agent_channel(ctx, ref, "its ports are read")
    sockets = ctx.host.agent.listening(channel=channel)
    assert shown.handles is not None
    return shown.vm, reachability(shown.vm, shown.handles.endpoint, sockets)


def ssh_view(ctx: VMContext, ref: str) -> VMView:
    """A running VM whose sshd takes banger's key, for a person's ssh (`vm ssh`, `vm run`
    without a command). A start ends at the agent's HELLO, before sshd may be up: the
    first ask after a boot waits for sshd (``timeouts.sshd``), later ones do not."""
    shown = view(ctx, ctx.resolve(ref))
    vm, h = shown.vm, shown.handles
    addr = None if h is None else h.endpoint
    if vm.state is not VMState.RUNNING or h is None or addr is None:
        raise ConflictError(f"VM {vm.name!r} is {vm.state.value}, not running: start it "
                            f"with `banger vm start {vm.name}`")
    seen = (vm.id, h.boot_id or "")
    if seen in ctx.sshd_ready:
        return shown
    paths, vmm, timeout = shown.paths, ctx.host.vmm, ctx.timeouts.sshd
    try:
        ctx.host.guest.wait_ready(
            addr=addr, alias=paths.names.ssh_alias, timeout=timeout,
            serial_log=paths.serial_log,
            alive=lambda: vmm.alive(h.pid, paths.control_socket))
    except Exception as exc:
        raise OperationFailed(
            f"sshd in VM {vm.name!r} did not take banger's key within {timeout:g} s: ssh "
            f"needs it (banger's own commands do not: `banger vm exec {vm.name} -- CMD` "
            f"works without sshd): {exc}") from exc
    ctx.sshd_ready.add(seen)
    return shown


def agent_channel(ctx: VMContext, ref: str, what: str) -> tuple[VMView, Path]:
    """A running VM and its guest agent's channel; ConflictError naming the fix when the
    VM is not running or has no agent channel. ``what`` says what needs the guest ("its
    stats are read", "a command runs")."""
    shown = view(ctx, ctx.resolve(ref))
    vm, h = shown.vm, shown.handles
    if vm.state is not VMState.RUNNING or h is None:
        raise ConflictError(f"VM {vm.name!r} is {vm.state.value}, not running: {what} "
                            f"in the running guest; start it with "
                            f"`banger vm start {vm.name}`")
    if h.agent is None:
        raise ConflictError(f"VM {vm.name!r} runs without a guest agent channel (it was "
                            f"started by an older banger): restart it with "
                            f"`banger vm restart {vm.name}`")
    return shown, Path(h.agent)
