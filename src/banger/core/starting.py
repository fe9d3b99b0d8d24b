"""Running a VM's start pipeline under its lock and recording how it ended.

The pipeline waits for a boot slot (:class:`BootSlots`), runs the steps of
:func:`banger.core.startplan.start_steps` and rolls back on failure or cancel; the record
ends running, error (a failure) or stopped (a cancel). Also: cancelling a start in flight,
and turning pipeline events into progress of an operation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from banger.core import pendingws
from banger.core.operations import OpControl, Operation, Operations, Progress, ProgressSink
from banger.core.startplan import StartContext, start_steps
from banger.model.errors import BangerError, Cancelled, OperationFailed
from banger.model.vm import VM, VMState
from banger.pipeline import Event, StepFailed, run_steps

if TYPE_CHECKING:
    from banger.core.service import VMService


def start_locked(svc: VMService, vm: VM, sink: ProgressSink, control: OpControl | None) -> VM:
    paths = svc.layout.vm(vm.id)
    with svc.ops.track("start", vm.id, vm.name, sink, control) as op:
        vm = vm.with_state(VMState.STARTING, svc.clock(), op_id=op.id)
        svc.repo.update(vm)
        try:  # the repo of a never-started VM, read again for the work disk
            workspace = pendingws.for_start(svc.host, vm, paths)
        except pendingws.WorkspaceLost as exc:
            err = StepFailed(str(exc), [exc], step="work_disk")
            raise start_failed(svc, vm, op, err) from exc
        ctx = StartContext(
            vm=vm, paths=paths, host=svc.host, handles=svc.handles, clock=svc.clock,
            ready_timeout=svc.timeouts.ready, failpoint=svc.failpoint,
            workspace=workspace, load_config=svc.load_config,
            identities=svc._identities,
            on_detail=lambda stage, msg: svc.ops.emit(
                op, Progress(op.id, vm.name, "detail", stage, message=msg)),
            check_cancel=op.control.check,
        )
        try:
            with svc.boots.slot(op.control, lambda n: svc.ops.emit(op, Progress(
                    op.id, vm.name, "queued", "queued",
                    f"waiting for a boot slot ({svc.boots.describe()}): "
                    f"number {n} in line"))):
                run_steps(start_steps(ctx), ctx, on_event=forward(svc.ops, op, vm.name),
                          check=op.control.check)
        except Cancelled as exc:  # still in line: nothing was set up
            err = StepFailed(str(exc), [exc], step="queued")
            raise start_failed(svc, vm, op, err) from exc
        except StepFailed as err:
            raise start_failed(svc, vm, op, err) from err
        running = replace(vm.with_state(VMState.RUNNING, svc.clock(), op_id=op.id),
                          boot_id=ctx.boot_id)
        running = pendingws.settled(running, ctx)  # one write: running, nothing pending
        svc.repo.update(running)
        return running


def cancel_start(svc: VMService, vm: VM, why: str) -> None:
    """Cancel a start of ``vm`` in flight (booting, or in line for a boot slot, its
    lock held all along): a stop, kill or delete would otherwise wait behind the whole
    boot (and the line before it), then undo it anyway. The start rolls back and lets
    go of the lock at once."""
    for op in svc.ops.in_flight():
        # "stop": a restart's stop half shares its control with the start half.
        if op.vm_id == vm.id and op.kind in ("start", "stop"):
            op.control.cancel(f"cancelled: {why}")


def start_failed(svc: VMService, vm: VM, op: Operation, err: StepFailed) -> BangerError:
    """Record a failed (error) or cancelled (stopped) start; the error to raise."""
    message = str(err.cause)
    if err.undo_errors:
        message += "; cleanup also failed: " + "; ".join(
            f"{type(e).__name__}: {e}" for e in err.undo_errors)
    if isinstance(err.cause, Cancelled):
        message = f"start cancelled before stage {err.step!r} ({message})"
        svc.repo.update(vm.with_state(VMState.STOPPED, svc.clock(), error=message,
                                      stage=err.step, op_id=op.id))
        return Cancelled(f"{vm.name!r}: {message}; what it had set up was rolled back",
                         stage=err.step, op_id=op.id)
    svc.repo.update(vm.with_state(VMState.ERROR, svc.clock(), error=message,
                                  stage=err.step, op_id=op.id))
    return OperationFailed(f"start of {vm.name!r} failed at stage {err.step!r}: "
                           f"{message}", stage=err.step, op_id=op.id)


def forward(ops: Operations, op: Operation, vm_name: str) -> Callable[[Event], None]:
    def emit(e: Event) -> None:
        msg = f"{type(e.error).__name__}: {e.error}" if e.error is not None else None
        ops.emit(op, Progress(op.id, vm_name, e.kind, e.step, e.progress, e.elapsed, msg))
    return emit
