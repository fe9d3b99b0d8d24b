"""Running a VM's start pipeline under its lock and recording how it ended.

The pipeline waits for a boot slot (:class:`BootSlots`), runs the steps of
:func:`banger.core.startplan.start_steps` and rolls back on failure or cancel; the record
ends running, error (a failure) or stopped (a cancel). Also: cancelling a start in flight,
and turning pipeline events and details into progress of an operation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TypeVar

from banger.core import pendingws
from banger.core.context import VMContext
from banger.core.operations import OpControl, Operation, Operations, Progress, ProgressSink
from banger.core.stages import LABELS, Stage
from banger.core.startplan import StartContext, start_steps
from banger.model.errors import BangerError, Cancelled, OperationFailed
from banger.model.vm import VM, VMState
from banger.pipeline import Detail, Event, Step, StepFailed, run_steps
from banger.ports import WorkspaceSelection

C = TypeVar("C")


def start_locked(ctx: VMContext, vm: VM, sink: ProgressSink, control: OpControl | None,
                 just_read: WorkspaceSelection | None = None) -> VM:
    """Start ``vm`` (its lock held by the caller) as the operation "start";
    ``just_read``: see :func:`banger.core.pendingws.for_start`."""
    paths = ctx.layout.vm(vm.id)
    with ctx.ops.track("start", vm.id, vm.name, sink, control) as op:
        vm = vm.with_state(VMState.STARTING, ctx.clock(), op_id=op.id)
        ctx.repo.update(vm)
        try:  # the repo of a never-started VM, read again for the work disk
            workspace = pendingws.for_start(ctx.host, vm, paths, just_read)
        except pendingws.WorkspaceLost as exc:
            err = StepFailed(str(exc), [exc], step=Stage.WORK_DISK.value)
            raise start_failed(ctx, vm, op, err) from exc
        start = StartContext(
            vm=vm, paths=paths, host=ctx.host, handles=ctx.handles, clock=ctx.clock,
            ready_timeout=ctx.timeouts.ready, failpoint=ctx.failpoint,
            workspace=workspace, load_config=ctx.load_config,
            identities=ctx.identities, detail=details(ctx.ops, op, vm.name),
            check_cancel=op.control.check,
        )
        try:
            with ctx.boots.slot(op.control, lambda n: ctx.ops.emit(op, Progress(
                    op.id, vm.name, "queued", Stage.QUEUED.value,
                    f"{LABELS[Stage.QUEUED]} ({ctx.boots.describe()}): number {n} in line"))):
                run_steps(start_steps(start), start, on_event=forward(ctx.ops, op, vm.name),
                          check=op.control.check, detail=start.detail)
        except Cancelled as exc:  # still in line: nothing was set up
            err = StepFailed(str(exc), [exc], step=Stage.QUEUED.value)
            raise start_failed(ctx, vm, op, err) from exc
        except StepFailed as err:
            raise start_failed(ctx, vm, op, err) from err
        running = replace(vm.with_state(VMState.RUNNING, ctx.clock(), op_id=op.id),
                          boot_id=start.boot_id)
        running = pendingws.settled(running, start)  # one write: running, nothing pending
        ctx.repo.update(running)
        return running


def cancel_start(ctx: VMContext, vm: VM, why: str) -> None:
    """Cancel a start of ``vm`` in flight (booting, or in line for a boot slot, its
    lock held all along): a stop, kill or delete would otherwise wait behind the whole
    boot (and the line before it), then undo it anyway. The start rolls back and lets
    go of the lock at once."""
    for op in ctx.ops.in_flight():
        # "stop": a restart's stop half shares its control with the start half.
        if op.vm_id == vm.id and op.kind in ("start", "stop"):
            op.control.cancel(f"cancelled: {why}")


def start_failed(ctx: VMContext, vm: VM, op: Operation, err: StepFailed) -> BangerError:
    """Record a failed (error) or cancelled (stopped) start; the error to raise."""
    message = str(err.cause)
    if err.undo_errors:
        message += "; cleanup also failed: " + "; ".join(
            f"{type(e).__name__}: {e}" for e in err.undo_errors)
    if isinstance(err.cause, Cancelled):
        message = f"start cancelled before stage {err.step!r} ({message})"
        ctx.repo.update(vm.with_state(VMState.STOPPED, ctx.clock(), error=message,
                                      stage=err.step, op_id=op.id))
        return Cancelled(f"{vm.name!r}: {message}; what it had set up was rolled back",
                         stage=err.step, op_id=op.id)
    ctx.repo.update(vm.with_state(VMState.ERROR, ctx.clock(), error=message,
                                  stage=err.step, op_id=op.id))
    return OperationFailed(f"start of {vm.name!r} failed at stage {err.step!r}: "
                           f"{message}", stage=err.step, op_id=op.id)


def forward(ops: Operations, op: Operation, vm_name: str) -> Callable[[Event], None]:
    """Pipeline events as progress of ``op``."""
    def emit(e: Event) -> None:
        msg = f"{type(e.error).__name__}: {e.error}" if e.error is not None else None
        ops.emit(op, Progress(op.id, vm_name, e.kind, e.step, e.progress, e.elapsed, msg))
    return emit


def run_as(ops: Operations, op: Operation, what: str, steps: Sequence[Step[C]], ctx: C,
           detail: Detail) -> None:
    """Run ``steps`` as (part of) ``op``, their events and details its progress; a failure
    is an :class:`OperationFailed` naming the stage and the root cause."""
    try:
        run_steps(steps, ctx, on_event=forward(ops, op, op.vm_name or ""), detail=detail)
    except StepFailed as err:
        raise OperationFailed(f"{what} of {op.vm_name!r} failed at stage {err.step!r}: "
                              f"{err.cause}", stage=err.step, op_id=op.id) from err


def details(ops: Operations, op: Operation, vm_name: str) -> Detail:
    """Details of the step running as progress of ``op``."""
    return Detail(lambda stage, msg: ops.emit(
        op, Progress(op.id, vm_name, "detail", stage, message=msg)))
