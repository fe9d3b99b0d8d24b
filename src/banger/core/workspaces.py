"""Workspace use cases: re-sync a VM's /root/repo from the host repo, and the dry run.

A running VM gets the repo at once, as one tar stream through its agent; a stopped one at
its next start, from a copy staged now (or, never started, when its work disk is made).
Each case is a step list run by the pipeline, as the operation "workspace_prepare" under
the VM's lock.
"""

from __future__ import annotations

import shutil
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path

from banger.core import pendingws
from banger.core.context import VMContext
from banger.core.operations import ProgressSink
from banger.core.stages import WORKSPACE_DIR, WORKSPACE_GUEST_PATH, Stage, step
from banger.core.starting import details, run_as
from banger.core.startplan import BOOTSTRAP_MARK, check_bootstrap, launch_bootstrap
from banger.model.layout import VMPaths
from banger.model.vm import VM, PendingWorkspace
from banger.pipeline import Detail, Step
from banger.ports import WorkspaceRequest, WorkspaceSelection


@dataclass
class PrepareContext:
    core: VMContext
    vm: VM
    paths: VMPaths
    selection: WorkspaceSelection
    detail: Detail
    channel: Path | None = None  # the running guest's agent channel
    # The staged copy of the repo (running VM), removed when the prepare ends.
    staging: ExitStack = field(default_factory=ExitStack)
    tree: Path | None = None
    # Never started: the repo the work disk gets, kept with the record.
    pending: PendingWorkspace | None = None


def prepare_steps(c: PrepareContext) -> list[Step[PrepareContext]]:
    """The steps for where the VM is: running, stopped, or never started."""
    if c.channel is not None:
        steps = [step(Stage.WORKSPACE_STAGE, _stage_for_copy),
                 step(Stage.WORKSPACE_COPY, _copy)]
        if c.selection.request.bootstrap and c.selection.tool_files:
            steps.append(step(Stage.TOOL_BOOTSTRAP, _bootstrap))
        return steps
    if c.paths.work_disk.exists():
        return [step(Stage.WORKSPACE_STAGE, _stage_for_next_start)]
    return [step(Stage.WORKSPACE_STAGE, _keep_for_work_disk)]


def prepare_workspace(ctx: VMContext, ref: str, req: WorkspaceRequest,
                      sink: ProgressSink) -> VM:
    """Re-sync a VM's /root/repo from the host repo: a running VM at once, as one
    stream through its agent; a stopped one at its next start, from a copy staged now."""
    vm = ctx.resolve(ref)
    selection = ctx.host.workspace.select(req)
    check_bootstrap(selection, vm.spec.nat, vm.name)
    with ctx.locked(vm) as vm:
        channel = ctx.channel_of(vm, ctx.handles.get(vm.id))
        with ctx.ops.track("workspace_prepare", vm.id, vm.name, sink) as op:
            c = PrepareContext(ctx, vm, ctx.layout.vm(vm.id), selection,
                               details(ctx.ops, op, vm.name), channel)
            with c.staging:
                run_as(ctx.ops, op, "workspace prepare", prepare_steps(c), c, c.detail)
            updated = replace(vm, workspace_path=str(selection.repo),
                              workspace_guest_path=WORKSPACE_GUEST_PATH,
                              workspace_head=selection.head, pending_workspace=c.pending,
                              updated_at=ctx.clock(), last_op_id=op.id)
            ctx.repo.update(updated)
            return updated


def _stage_for_copy(c: PrepareContext) -> None:
    c.tree = c.staging.enter_context(c.core.host.workspace.staged(c.selection, c.paths.dir))


def _copy(c: PrepareContext) -> None:
    assert c.channel is not None and c.tree is not None
    c.core.host.agent.push_tree(channel=c.channel, tree=c.tree,
                                guest_path=WORKSPACE_GUEST_PATH)
    c.staging.close()  # in the guest now: the staged copy goes


def _bootstrap(c: PrepareContext) -> None:
    assert c.channel is not None
    launch_bootstrap(c.core.host, c.channel, c.core.config().installer_url, c.detail)


def _stage_for_next_start(c: PrepareContext) -> None:
    """Stage the repo now (what the host has at this moment) for the next start."""
    paths = c.paths
    scratch = Path(tempfile.mkdtemp(prefix=".workspace-pending-", dir=paths.dir))
    try:
        with c.core.host.workspace.staged(c.selection, paths.dir) as tree:
            shutil.move(tree, scratch / WORKSPACE_DIR)
        if c.selection.request.bootstrap and c.selection.tool_files:
            (scratch / BOOTSTRAP_MARK).touch()
        shutil.rmtree(paths.pending_workspace, ignore_errors=True)
        scratch.rename(paths.pending_workspace)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    c.detail(f"{c.vm.name} is {c.vm.state.value}: the repo goes to {WORKSPACE_GUEST_PATH} "
             f"when it next starts (`banger vm start {c.vm.name}`)")


def _keep_for_work_disk(c: PrepareContext) -> None:
    # Never started: the work disk is made with the repo in it.
    c.pending = pendingws.record(c.selection.request)
    c.detail(f"{c.vm.name} has no work disk yet: the repo is copied in when it is made, "
             "at the next start")
