"""Reading VMs: a VM as shown to users, observed against the host, and a running guest's
listening ports. Reads never wait for a VM's lock: a VM busy with an operation is shown
as its record says."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from banger.core.context import LIVE_STATES, VMContext
from banger.core.guestports import GuestSocketView, reachability
from banger.core.runtime import Handles
from banger.model.errors import ConflictError, NotFoundError
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
    """The running guest's listening sockets and where the host reaches each one."""
    shown = view(ctx, ctx.resolve(ref))
    vm = shown.vm
    addr = ctx.endpoint_of(vm, shown.handles)
    if addr is None:
        raise ConflictError(f"VM {vm.name!r} is {vm.state.value}, not running: its ports "
                            f"are read from the running guest; start it with "
                            f"`banger vm start {vm.name}`")
    sockets = ctx.host.guest.listening(addr=addr, alias=shown.paths.names.ssh_alias)
    return vm, reachability(vm, addr, sockets)


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
