"""VM lifecycle use cases: create, start, stop, kill, restart, delete, set.

Each runs under the VM's lock (:meth:`VMContext.locked`). A start is the start pipeline
(:mod:`banger.core.starting`), a stop or kill the stop pipeline (:mod:`banger.core.stopping`),
a restart both, under one lock and one control. A stop, kill or delete of a VM whose start
is in flight cancels that start first (it rolls back) rather than wait behind it.
"""

from __future__ import annotations

import shutil
import signal as signals
from collections.abc import Callable
from dataclasses import replace
from ipaddress import IPv4Address

from banger.core import pendingws
from banger.core.context import LIVE_STATES, VMContext
from banger.core.operations import OpControl, ProgressSink
from banger.core.stages import WORKSPACE_GUEST_PATH
from banger.core.starting import cancel_start, start_locked
from banger.core.startplan import check_bootstrap, check_network
from banger.core.stopping import stop_locked
from banger.model import netalloc
from banger.model.errors import ConflictError, InvalidRequest, NotFoundError, OperationFailed
from banger.model.vm import (
    VM,
    InvalidSpec,
    NetworkMode,
    VMSpec,
    VMState,
    default_name,
    new_vm_id,
    validate_name,
)
from banger.ports import WorkspaceRequest, WorkspaceSelection
from banger.store.vms import Conflict


def create(ctx: VMContext, *, name: str | None, spec: VMSpec, start: bool,
           sink: ProgressSink, workspace: WorkspaceRequest | None,
           control: OpControl | None, on_record: Callable[[VM], None] | None) -> VM:
    """A new VM record (and directory); started unless ``start`` is false. ``on_record``
    is told the record as soon as it exists."""
    try:
        spec = spec.validated()
        if name is not None:
            validate_name(name)
    except InvalidSpec as exc:
        raise InvalidRequest(str(exc)) from exc
    check_network(ctx.host, spec.network)
    if spec.image not in ctx.host.images.known():
        raise NotFoundError(f"unknown image {spec.image!r}; known images: "
                            f"{', '.join(ctx.host.images.known())}")
    # Read the repo before anything exists: a repo that cannot be copied exactly is
    # refused with nothing created.
    selection = ctx.host.workspace.select(workspace) if workspace else None
    if selection is not None:
        check_bootstrap(selection, spec.nat, name)
    vm_id = new_vm_id()
    now = ctx.clock()
    vm = VM(id=vm_id, name=name or default_name(vm_id), spec=spec, state=VMState.CREATED,
            created_at=now, updated_at=now,
            workspace_path=str(selection.repo) if selection else None,
            workspace_guest_path=WORKSPACE_GUEST_PATH if selection else None,
            workspace_head=selection.head if selection else None,
            # Kept with the record, in the same write: a daemon that dies before the
            # work disk is made still copies the repo in at the next start.
            pending_workspace=pendingws.record(selection.request) if selection else None)
    with ctx.create_lock:
        if spec.network is NetworkMode.TAP:
            vm = replace(vm, guest_ip=str(_allocate_ip(ctx, vm_id)))
        try:
            ctx.repo.insert(vm)
        except Conflict as exc:
            raise ConflictError(str(exc)) from exc
    ctx.layout.vm(vm_id).dir.mkdir(parents=True, exist_ok=True)
    if on_record is not None:
        on_record(vm)
    if start:
        return start_vm(ctx, vm.id, sink=sink, control=control, just_read=selection)
    return vm


def _allocate_ip(ctx: VMContext, vm_id: str) -> IPv4Address:
    subnet = ctx.config().network.subnet
    used = {IPv4Address(v.guest_ip) for v in ctx.repo.list() if v.guest_ip}
    try:
        return netalloc.allocate_ip(vm_id, subnet, used)
    except netalloc.SubnetFull as exc:
        raise ConflictError(str(exc)) from exc


def start_vm(ctx: VMContext, ref: str, *, sink: ProgressSink, control: OpControl | None,
             just_read: WorkspaceSelection | None = None) -> VM:
    with ctx.locked(ref) as vm:
        if vm.state is VMState.RUNNING:
            raise ConflictError(f"VM {vm.name!r} is already running")
        return start_locked(ctx, vm, sink, control, just_read)


def stop(ctx: VMContext, ref: str, *, sink: ProgressSink) -> VM:
    vm = ctx.resolve(ref)
    cancel_start(ctx, vm, "the VM is being stopped")
    with ctx.locked(vm) as vm:
        if vm.state not in LIVE_STATES:
            return vm
        return stop_locked(ctx, vm, sink, None)


def kill(ctx: VMContext, ref: str, *, signal: int = signals.SIGKILL,
         sink: ProgressSink) -> VM:
    vm = ctx.resolve(ref)
    cancel_start(ctx, vm, "the VM is being killed")
    with ctx.locked(vm, observe=False) as vm:
        return stop_locked(ctx, vm, sink, None, kind="kill", signal=signal)


def restart(ctx: VMContext, ref: str, *, sink: ProgressSink,
            control: OpControl | None) -> VM:
    """Stop (if live), then start, under one lock. One control for both halves, so that
    a cancel during the stop half (also a kill or delete of this VM) stops the start
    half; the stop half itself runs to its end."""
    control = control or OpControl()
    with ctx.locked(ref) as vm:
        if vm.state in LIVE_STATES:
            vm = stop_locked(ctx, vm, sink, control)
        return start_locked(ctx, vm, sink, control)


def delete(ctx: VMContext, ref: str, *, sink: ProgressSink, only_idle: bool) -> VM:
    """``only_idle`` (prune): keep the VM if, by the time its lock is ours, it runs or
    is starting; the list prune chose from may be older than a start or restart."""
    vm = ctx.resolve(ref)
    if not only_idle:  # prune leaves a VM that is starting alone
        cancel_start(ctx, vm, "the VM is being deleted")
    with ctx.locked(vm, observe=only_idle) as vm:
        if only_idle and vm.state in LIVE_STATES:
            raise ConflictError(f"VM {vm.name!r} is {vm.state.value} now: kept "
                                f"(prune deletes only VMs that are not running)")
        paths = ctx.layout.vm(vm.id)
        with ctx.ops.track("delete", vm.id, vm.name, sink):
            ctx.release(vm, paths)
            ctx.host.guest.forget_host(paths.names.ssh_alias)
            # The daemon's serial-log cap runs on a thread of its own: a copy it was
            # making as the VM died may land in the directory after rmtree listed
            # it. Once more then, rather than fail the delete (a `vm run --rm` one
            # would leave the VM's record behind).
            for _ in range(3):
                shutil.rmtree(paths.dir, ignore_errors=True)
                if not paths.dir.exists():
                    break
            else:
                raise OperationFailed(f"could not remove {paths.dir}")
            ctx.repo.delete(vm.id)
    ctx.forget_lock(vm.id)
    return vm


def set_spec(ctx: VMContext, ref: str, *, vcpus: int | None, memory_mib: int | None,
             work_disk_mib: int | None) -> VM:
    """Change a stopped VM's shape; it applies at the next start."""
    with ctx.locked(ref) as vm:
        if vm.state in LIVE_STATES:
            raise ConflictError(f"VM {vm.name!r} is {vm.state.value}: stop it first "
                                f"(`banger vm stop {vm.name}`); changes apply at next start")
        try:
            spec = vm.spec.with_changes(vcpus=vcpus, memory_mib=memory_mib,
                                        work_disk_mib=work_disk_mib)
        except InvalidSpec as exc:
            raise InvalidRequest(str(exc)) from exc
        if (spec.work_disk_mib != vm.spec.work_disk_mib
                and ctx.layout.vm(vm.id).work_disk.exists()):
            raise InvalidRequest("the work disk already exists; its size cannot be changed "
                                 "yet (create a new VM with --disk-size)")
        updated = replace(vm, spec=spec, updated_at=ctx.clock())
        ctx.repo.update(updated)
        return updated
