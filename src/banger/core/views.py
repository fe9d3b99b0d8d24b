"""Reading VMs: a VM as shown to users, observed against the host, a running guest's
listening ports, and its sshd for a person's ssh. Reads never wait for a VM's lock: a VM
busy with an operation is shown as its record says."""

from __future__ import annotations

import contextlib
import time
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
    if vm.state is not VMState.RUNNING or h is None or h.endpoint is None:
        raise ConflictError(f"VM {vm.name!r} is {vm.state.value}, not running: start it "
                            f"with `banger vm start {vm.name}`")
    image = ctx.host.images.describe(vm.spec.image)
    if image is not None and image.kind == "oci":
        # banger's init in an OCI image starts the agent only: no sshd to wait 30 s for.
        raise ConflictError(f"VM {vm.name!r} boots the OCI image {image.name!r}, where banger "
                            f"starts no sshd: run commands with `banger vm exec {vm.name} -- "
                            "CMD` (a shell through the agent is not there yet)")
    _wait_sshd(ctx, shown, ctx.timeouts.sshd)
    return shown


def await_sshd(ctx: VMContext, budget: float = 10.0) -> None:
    """Wait, ``budget`` s at most in all, for the sshd of every running VM whose sshd was
    not looked at yet on this boot (banger's ssh_config names them: `ssh <name>.vm`
    right after a start). A VM whose sshd does not answer is passed over, once a boot."""
    deadline = time.monotonic() + budget
    for shown in list_views(ctx):
        h = shown.handles
        if shown.vm.state is not VMState.RUNNING or h is None or h.endpoint is None:
            continue
        image = ctx.host.images.describe(shown.vm.spec.image)
        if image is not None and image.kind == "oci":
            continue  # no sshd there (ssh_view)
        if (shown.vm.id, h.boot_id or "") in ctx.sshd_ready:
            continue
        with contextlib.suppress(OperationFailed):
            _wait_sshd(ctx, shown, max(0.1, deadline - time.monotonic()))


def _wait_sshd(ctx: VMContext, shown: VMView, timeout: float) -> None:
    """Wait for ``shown``'s sshd unless it took banger's key before on this boot."""
    vm, h, paths = shown.vm, shown.handles, shown.paths
    assert h is not None and h.endpoint is not None
    seen = (vm.id, h.boot_id or "")
    if ctx.sshd_ready.get(seen):
        return
    vmm = ctx.host.vmm
    try:
        ctx.host.guest.wait_ready(
            addr=h.endpoint, alias=paths.names.ssh_alias, timeout=timeout,
            serial_log=paths.serial_log,
            alive=lambda: vmm.alive(h.pid, paths.control_socket))
    except Exception as exc:
        ctx.sshd_ready[seen] = False
        raise OperationFailed(
            f"sshd in VM {vm.name!r} did not take banger's key within {timeout:g} s: ssh "
            f"needs it (banger's own commands do not: `banger vm exec {vm.name} -- CMD` "
            f"works without sshd): {exc}") from exc
    ctx.sshd_ready[seen] = True


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
