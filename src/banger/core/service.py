"""The entry point of the VM use cases for the daemon and the tests: :class:`VMService`.

A thin facade: each method hands its :class:`~banger.core.context.VMContext` to the use case
in its own module — lifecycle (:mod:`banger.core.lifecycle`), workspaces
(:mod:`banger.core.workspaces`), reading VMs (:mod:`banger.core.views`), reconcile
(:mod:`banger.core.reconcile`), several VMs at once and prune (:mod:`banger.core.batch`) —
and, after a lifecycle change, tells its listeners the new VM list.
"""

from __future__ import annotations

import functools
import logging
import signal as signals
import threading
import time
from collections.abc import Callable, Generator, Iterable, Sequence
from typing import ParamSpec, TypeVar

from banger.core import batch, files, images, lifecycle, reconcile, views, workspaces
from banger.core.batch import BatchResult
from banger.core.context import Timeouts, VMContext
from banger.core.execs import RunningExec, exec_start
from banger.core.guestports import GuestSocketView
from banger.core.operations import (
    BootSlots,
    OpControl,
    Operations,
    ProgressSink,
    default_max_boots,
    no_progress,
)
from banger.core.stats import SAMPLE_INTERVAL, VMStats, vm_stats
from banger.core.views import VMView
from banger.model.config import Config
from banger.model.layout import Layout
from banger.model.vm import VM, NetworkMode, VMSpec
from banger.ports import ExecRequest, HostPorts, ImageRecord, WorkspaceRequest
from banger.store.vms import VMRepository

# The facade's own signatures name these: callers import them from here.
__all__ = ["BatchResult", "Timeouts", "VMService", "VMView"]

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")


def _notifies(method: Callable[P, R]) -> Callable[P, R]:
    """After the call (also a failed one), tell ``on_change`` listeners the new VM list."""
    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(*args, **kwargs)
        finally:
            service = args[0]
            assert isinstance(service, VMService)
            service.notify()
    return wrapper


class VMService:
    # What it was built with lives in ``ctx``: a test or caller setting ``svc.failpoint``
    # would otherwise change nothing, silently.
    __slots__ = ("_notify_lock", "ctx", "on_change")

    def __init__(self, *, repo: VMRepository, ops: Operations, host: HostPorts, layout: Layout,
                 clock: Callable[[], float] = time.time, timeouts: Timeouts | None = None,
                 failpoint: str | None = None,
                 load_config: Callable[[], Config] = Config,
                 max_boots: int | None = None) -> None:
        self.ctx = VMContext(repo=repo, ops=ops, host=host, layout=layout,
                             boots=BootSlots(max_boots or default_max_boots()), clock=clock,
                             timeouts=timeouts or Timeouts(), failpoint=failpoint,
                             load_config=load_config)
        # Told the VM list after every lifecycle change (DNS records, ssh_config).
        self.on_change: list[Callable[[list[VMView]], None]] = []
        self._notify_lock = threading.Lock()

    # What the daemon reads of what the service was built with.
    @property
    def layout(self) -> Layout:
        return self.ctx.layout

    @property
    def ops(self) -> Operations:
        return self.ctx.ops

    @property
    def host(self) -> HostPorts:
        return self.ctx.host

    @property
    def load_config(self) -> Callable[[], Config]:
        return self.ctx.load_config

    def notify(self) -> None:
        """Hand listeners the current VM list. Serialised, and listed inside the lock:
        of two operations ending at once, the later list is always delivered last."""
        if not self.on_change:
            return
        with self._notify_lock:
            current = self.list_vms()
            for listener in self.on_change:
                try:
                    listener(current)
                except Exception:
                    log.exception("a VM-change listener failed")

    def resolve(self, ref: str) -> VM:
        return self.ctx.resolve(ref)

    def default_network(self) -> NetworkMode:
        """The network mode for a VM whose creator did not say: `[network] mode`."""
        return NetworkMode(self.ctx.config().network.mode)

    # ---- lifecycle ----------------------------------------------------------------------

    @_notifies
    def create(self, *, name: str | None, spec: VMSpec, start: bool = True,
               sink: ProgressSink = no_progress,
               workspace: WorkspaceRequest | None = None, control: OpControl | None = None,
               on_record: Callable[[VM], None] | None = None) -> VM:
        """``on_record`` is told the new record as soon as it exists (the daemon deletes
        an ephemeral VM whose client went away by its id)."""
        return lifecycle.create(self.ctx, name=name, spec=spec, start=start, sink=sink,
                                workspace=workspace, control=control, on_record=on_record)

    @_notifies
    def start(self, ref: str, *, sink: ProgressSink = no_progress,
              control: OpControl | None = None) -> VM:
        return lifecycle.start_vm(self.ctx, ref, sink=sink, control=control)

    @_notifies
    def stop(self, ref: str, *, sink: ProgressSink = no_progress) -> VM:
        return lifecycle.stop(self.ctx, ref, sink=sink)

    @_notifies
    def kill(self, ref: str, *, signal: int = signals.SIGKILL,
             sink: ProgressSink = no_progress) -> VM:
        return lifecycle.kill(self.ctx, ref, signal=signal, sink=sink)

    @_notifies
    def restart(self, ref: str, *, sink: ProgressSink = no_progress,
                control: OpControl | None = None) -> VM:
        return lifecycle.restart(self.ctx, ref, sink=sink, control=control)

    @_notifies
    def delete(self, ref: str, *, sink: ProgressSink = no_progress,
               only_idle: bool = False) -> VM:
        return lifecycle.delete(self.ctx, ref, sink=sink, only_idle=only_idle)

    def set(self, ref: str, *, vcpus: int | None = None, memory_mib: int | None = None,
            work_disk_mib: int | None = None) -> VM:
        return lifecycle.set_spec(self.ctx, ref, vcpus=vcpus, memory_mib=memory_mib,
                                  work_disk_mib=work_disk_mib)

    # ---- workspaces ---------------------------------------------------------------------

    def prepare_workspace(self, ref: str, req: WorkspaceRequest,
                          sink: ProgressSink = no_progress) -> VM:
        return workspaces.prepare_workspace(self.ctx, ref, req, sink)

    def workspace_dry_run(self, req: WorkspaceRequest) -> list[str]:
        return self.ctx.host.workspace.dry_run(req)

    # ---- several VMs at once ------------------------------------------------------------

    def batch(self, action: str, refs: Sequence[str], **kwargs: object) -> list[BatchResult]:
        act: Callable[..., VM] = {"start": self.start, "stop": self.stop,
                                  "restart": self.restart, "kill": self.kill,
                                  "delete": self.delete}[action]
        return batch.batch(self.ctx, action, act, refs, **kwargs)

    def prune(self, refs: Sequence[str] | None = None) -> list[BatchResult]:
        return batch.prune(self.ctx, self.delete, refs)

    # ---- observation --------------------------------------------------------------------

    def list_vms(self) -> list[VMView]:
        return views.list_views(self.ctx)

    def show(self, ref: str) -> VMView:
        return views.view(self.ctx, self.ctx.resolve(ref))

    def view(self, vm: VM) -> VMView:
        return views.view(self.ctx, vm)

    def ssh_view(self, ref: str) -> VMView:
        return views.ssh_view(self.ctx, ref)

    def await_sshd(self) -> None:
        views.await_sshd(self.ctx)

    def ports(self, ref: str) -> tuple[VM, list[GuestSocketView]]:
        return views.ports(self.ctx, ref)

    def stats(self, ref: str, interval: float = SAMPLE_INTERVAL) -> VMStats:
        return vm_stats(self.ctx, ref, interval)

    def images(self) -> list[ImageRecord]:
        return images.list_images(self.ctx)

    def image(self, name: str) -> ImageRecord:
        return images.show_image(self.ctx, name)

    def pull_image(self, ref: str, name: str | None, *, archive: bool,
                   on_progress: Callable[[str], None]) -> ImageRecord:
        return images.pull_image(self.ctx, ref, name, archive=archive,
                                 on_progress=on_progress)

    def exec(self, ref: str, request: ExecRequest, *, workspace: bool = False) -> RunningExec:
        return exec_start(self.ctx, ref, request, workspace=workspace)

    def put_files(self, ref: str, dest: str, source: Iterable[bytes]) -> int:
        return files.put_files(self.ctx, ref, dest, source)

    def get_files(self, ref: str, path: str) -> Generator[bytes, None, None]:
        return files.get_files(self.ctx, ref, path)

    @_notifies
    def reconcile(self) -> list[VM]:
        return reconcile.reconcile(self.ctx)
