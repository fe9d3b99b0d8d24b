"""The stop and kill step lists, and running them as an operation of one VM.

Stop escalates: the guest is asked to power off (through its agent), then the VMM to
quit, each given a short deadline; whatever still runs is killed when the runtime is
released. The first two are best-effort steps (a guest that does not power off in time
is reported, and the next step takes over) that note in the context once the VMM is gone,
so that the later ones are passed over. Kill signals the VMM and releases the runtime.
"""

from __future__ import annotations

import logging
import signal as signals
import time
from dataclasses import dataclass
from pathlib import Path

from banger.core.context import VMContext
from banger.core.operations import OpControl, ProgressSink
from banger.core.runtime import Handles
from banger.core.stages import Stage, step
from banger.core.starting import details, run_as
from banger.model.layout import VMPaths
from banger.model.vm import VM, VMState
from banger.pipeline import Step

log = logging.getLogger(__name__)


class StillRunning(RuntimeError):
    """The VMM outlived the deadline of a stop step."""


@dataclass
class StopContext:
    core: VMContext
    vm: VM
    paths: VMPaths
    handles: Handles | None
    signal: int = signals.SIGKILL
    # True once the VMM process is gone (or was not running to begin with).
    gone: bool = False


def stop_steps() -> list[Step[StopContext]]:
    return [
        step(Stage.GUEST_POWEROFF, _guest_poweroff, best_effort=True,
             when=lambda c: not c.gone and c.handles is not None
             and c.handles.agent is not None),
        step(Stage.VMM_QUIT, _vmm_quit, best_effort=True, when=lambda c: not c.gone),
        step(Stage.RELEASE_RUNTIME, _release),
    ]


def kill_steps() -> list[Step[StopContext]]:
    return [
        step(Stage.VMM_SIGNAL, _signal, when=lambda c: not c.gone),
        step(Stage.RELEASE_RUNTIME, _release),
    ]


def stop_locked(ctx: VMContext, vm: VM, sink: ProgressSink, control: OpControl | None,
                *, kind: str = "stop", signal: int = signals.SIGKILL) -> VM:
    """Stop (or with ``kind="kill"``, kill with ``signal``) ``vm``, its lock held by the
    caller, as an operation of that kind; the stopped record."""
    paths = ctx.layout.vm(vm.id)
    h = ctx.handles.get(vm.id) or ctx.handles.load(paths)
    running = h is not None and ctx.host.vmm.alive(h.pid, paths.control_socket)
    stop = StopContext(ctx, vm, paths, h, signal, gone=not running)
    with ctx.ops.track(kind, vm.id, vm.name, sink, control) as op:
        # No cancel check: a stop half done would leave a VM neither running nor stopped.
        run_as(ctx.ops, op, kind, stop_steps() if kind == "stop" else kill_steps(), stop,
               details(ctx.ops, op, vm.name))
        stopped = vm.with_state(VMState.STOPPED, ctx.clock(), op_id=op.id)
        ctx.repo.update(stopped)
        return stopped


def _guest_poweroff(c: StopContext) -> None:
    assert c.handles is not None and c.handles.agent is not None
    timeout = c.core.timeouts.guest_poweroff
    # One deadline for the ask and the wait: a guest that never answers POWEROFF must not
    # cost it twice before the VMM is asked to quit.
    deadline = time.monotonic() + timeout
    why = ""
    try:
        c.core.host.agent.poweroff(channel=Path(c.handles.agent), timeout=timeout)
    except Exception as exc:  # the next deadline takes over; say why
        log.info("guest poweroff of %s failed: %s", c.vm.name, exc)
        why = f" ({exc})"
    c.gone = c.core.host.vmm.wait_exit(c.handles.pid,
                                       max(0.0, deadline - time.monotonic()))
    if not c.gone:
        raise StillRunning(f"the guest did not power off within {timeout:g} s{why}")


def _vmm_quit(c: StopContext) -> None:
    assert c.handles is not None
    vmm, timeout = c.core.host.vmm, c.core.timeouts.vmm_quit
    vmm.quit(c.paths.control_socket)
    c.gone = vmm.wait_exit(c.handles.pid, timeout)
    if not c.gone:
        raise StillRunning(f"the VMM did not quit within {timeout:g} s: it is killed")


def _signal(c: StopContext) -> None:
    assert c.handles is not None
    vmm = c.core.host.vmm
    vmm.kill(c.handles.pid, c.signal)
    c.gone = vmm.wait_exit(c.handles.pid, c.core.timeouts.kill)


def _release(c: StopContext) -> None:
    c.core.release(c.vm, c.paths)
