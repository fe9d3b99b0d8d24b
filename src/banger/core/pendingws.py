"""The pending workspace: the repo of a VM whose work disk is not made yet.

``banger vm run ./repo``, ``vm create ./repo --no-start`` and ``vm workspace prepare`` on a
never-started VM choose a repo that the start's ``work_disk`` step copies into the new work
disk. The choice is kept with the VM's record (:class:`banger.model.vm.PendingWorkspace`),
written in the same SQLite write that creates or updates the VM, never only in daemon
memory: a daemon restarted (or killed) in between still copies the repo in, or fails the
start saying why, and never boots the VM without it.

The request stays until a start succeeds. A work disk is renamed into place only once
complete (:func:`banger.host.disks.build_work_disk`), so one that exists holds the repo: a
start that finds it (its predecessor died after making it) copies nothing again.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from banger.core.stages import WORKSPACE_GUEST_PATH, Stage
from banger.core.startplan import StartContext
from banger.model.errors import InvalidRequest
from banger.model.layout import VMPaths
from banger.model.vm import VM, PendingWorkspace
from banger.ports import HostPorts, WorkspaceRequest, WorkspaceSelection


def record(req: WorkspaceRequest) -> PendingWorkspace:
    """What is kept with the VM of a workspace request."""
    return PendingWorkspace(path=str(req.path), include_untracked=req.include_untracked,
                            branch=req.branch, from_ref=req.from_ref, bootstrap=req.bootstrap)


def request(p: PendingWorkspace) -> WorkspaceRequest:
    return WorkspaceRequest(path=Path(p.path), include_untracked=p.include_untracked,
                            branch=p.branch, from_ref=p.from_ref, bootstrap=p.bootstrap)


class WorkspaceLost(InvalidRequest):
    """The repo a never-started VM is to get can no longer be read."""


def for_start(host: HostPorts, vm: VM, paths: VMPaths,
              just_read: WorkspaceSelection | None = None) -> WorkspaceSelection | None:
    """The repo this start puts on the work disk it makes, read again now; None when
    there is none to copy. Raises :class:`WorkspaceLost`, naming the repo and the fix,
    when it can no longer be copied: a VM must never start without its repo.

    ``just_read``: the selection the create that runs this start made a moment ago (``vm
    run ./repo``); used as it is when it is still the VM's pending request, so that a
    repo is not read twice in one command."""
    pending = vm.pending_workspace
    if pending is None:
        return None
    if (just_read is not None and record(just_read.request) == pending
            and not paths.work_disk.exists()):
        return just_read
    if paths.work_disk.exists():
        # Made whole by a start that died before it ended: the repo is on it already.
        # Read the repo only to learn whether its tool install is still to be started.
        if not pending.bootstrap:
            return None
        try:
            return host.workspace.select(request(pending))
        except Exception:  # the repo is in the guest already; only the install is lost
            return None
    try:
        return host.workspace.select(request(pending))
    except Exception as exc:  # whatever the host says, the repo cannot be copied
        raise WorkspaceLost(
            f"VM {vm.name!r} has no work disk yet and was to get the repo {pending.path} "
            f"at {WORKSPACE_GUEST_PATH} on it, but that repo can no longer be copied "
            f"({exc}). Give the VM a repo again with `banger vm workspace prepare "
            f"{vm.name} PATH` then `banger vm start {vm.name}`, or delete the VM with "
            f"`banger vm delete {vm.name}`") from exc


def settled(vm: VM, ctx: StartContext) -> VM:
    """``vm`` once its start ``ctx`` succeeded: the work disk holds the repo, nothing is
    pending (and the record names the commit this start copied, if it made the disk)."""
    if vm.pending_workspace is None:
        return vm
    head = vm.workspace_head
    if ctx.workspace is not None and Stage.WORK_DISK in ctx.created:
        head = ctx.workspace.head
    return replace(vm, pending_workspace=None, workspace_head=head)
