"""Workspace use cases: re-sync a VM's /root/repo from the host repo, and the dry run.

A running VM gets the repo at once, as one stream over ssh; a stopped one at its next start,
from a copy staged now (or, never started, when its work disk is made). Runs under the VM's
lock of :class:`banger.core.service.VMService`, which keeps one-line methods over these.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from banger.core import pendingws, reconcile, starting
from banger.core.operations import Operation, Progress, ProgressSink, no_progress
from banger.core.startplan import (
    BOOTSTRAP_MARK,
    WORKSPACE_DIR,
    WORKSPACE_GUEST_PATH,
    check_bootstrap,
    launch_bootstrap,
)
from banger.model.layout import VMPaths
from banger.model.vm import VM
from banger.pipeline import Event
from banger.ports import Endpoint, WorkspaceRequest, WorkspaceSelection

if TYPE_CHECKING:
    from banger.core.service import VMService


def prepare_workspace(svc: VMService, ref: str, req: WorkspaceRequest,
                      sink: ProgressSink = no_progress) -> VM:
    """Re-sync a VM's /root/repo from the host repo: a running VM at once, as one
    stream over ssh; a stopped one at its next start, from a copy staged now."""
    vm = svc.resolve(ref)
    selection = svc.host.workspace.select(req)
    check_bootstrap(selection, vm.spec.nat, vm.name)
    with svc._lock(vm.id):
        vm = reconcile.observe_locked(svc, svc._reread(vm))
        paths = svc.layout.vm(vm.id)
        addr = svc._endpoint_of(vm, svc.handles.get(vm.id))
        with svc.ops.track("workspace_prepare", vm.id, vm.name, sink) as op:
            emit = starting.forward(svc.ops, op, vm.name)
            pending = None  # once a work disk exists, nothing waits for one

            def detail(stage: str, msg: str, op: Operation = op,
                       name: str = vm.name) -> None:
                svc.ops.emit(op, Progress(op.id, name, "detail", stage, message=msg))

            if addr is not None:
                _push_workspace(svc, selection, paths, addr, emit, detail)
            elif paths.work_disk.exists():
                _stage_pending(svc, selection, paths, emit)
                detail("workspace_stage", f"{vm.name} is {vm.state.value}: the repo goes "
                       f"to {WORKSPACE_GUEST_PATH} when it next starts "
                       f"(`banger vm start {vm.name}`)")
            else:
                # Never started: the work disk is made with the repo in it.
                pending = pendingws.record(req)
                detail("workspace_stage", f"{vm.name} has no work disk yet: the repo "
                       "is copied in when it is made, at the next start")
            updated = replace(vm, workspace_path=str(selection.repo),
                              workspace_guest_path=WORKSPACE_GUEST_PATH,
                              workspace_head=selection.head, pending_workspace=pending,
                              updated_at=svc.clock(), last_op_id=op.id)
            svc.repo.update(updated)
            return updated


def _push_workspace(svc: VMService, selection: WorkspaceSelection, paths: VMPaths,
                    addr: Endpoint, emit: Callable[[Event], None],
                    detail: Callable[[str, str], None]) -> None:
    emit(Event("run", "workspace_stage", "staging the repo"))
    started = svc.clock()
    with svc.host.workspace.staged(selection, paths.dir) as tree:
        emit(Event("ok", "workspace_stage", None, svc.clock() - started))
        emit(Event("run", "workspace_copy", f"copying to {WORKSPACE_GUEST_PATH}"))
        started = svc.clock()
        svc.host.guest.push_tree(addr=addr, alias=paths.names.ssh_alias, tree=tree,
                                 guest_path=WORKSPACE_GUEST_PATH)
    emit(Event("ok", "workspace_copy", None, svc.clock() - started))
    if selection.request.bootstrap and selection.tool_files:
        emit(Event("run", "tool_bootstrap", "starting the tool install in the background"))
        launch_bootstrap(svc.host, addr, paths, svc._config().installer_url, detail)
        emit(Event("ok", "tool_bootstrap", None))


def _stage_pending(svc: VMService, selection: WorkspaceSelection, paths: VMPaths,
                   emit: Callable[[Event], None]) -> None:
    """Stage the repo now (what the host has at this moment) for the next start."""
    emit(Event("run", "workspace_stage", "staging the repo for the next start"))
    started = svc.clock()
    scratch = Path(tempfile.mkdtemp(prefix=".workspace-pending-", dir=paths.dir))
    try:
        with svc.host.workspace.staged(selection, paths.dir) as tree:
            shutil.move(tree, scratch / WORKSPACE_DIR)
        if selection.request.bootstrap and selection.tool_files:
            (scratch / BOOTSTRAP_MARK).touch()
        shutil.rmtree(paths.pending_workspace, ignore_errors=True)
        scratch.rename(paths.pending_workspace)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    emit(Event("ok", "workspace_stage", None, svc.clock() - started))
