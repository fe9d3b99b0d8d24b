"""VM use cases: create, start, stop, restart, kill, delete, set, prune, observe, reconcile.

:class:`VMService` is the one entry point (the daemon's and the tests'); some use cases
live in modules of their own and it delegates to them: driving the start pipeline
(:mod:`banger.core.starting`), workspaces (:mod:`banger.core.workspaces`), observation and
reconcile (:mod:`banger.core.reconcile`), several VMs at once and prune
(:mod:`banger.core.batch`).

Reaches the host only through :mod:`banger.ports`. Each VM has a lock: one lifecycle
operation at a time per VM; different VMs proceed concurrently, and reads never wait for a
VM's lock. At most ``max_boots`` start pipelines run at once (:class:`BootSlots`, first come
first served). A start can be cancelled (its :class:`OpControl`): the pipeline stops
between steps or in the readiness wait and rolls back like any failure.
"""

from __future__ import annotations

import functools
import logging
import shutil
import signal as signals
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from ipaddress import IPv4Address
from typing import ParamSpec, TypeVar

from banger.core import batch as batches
from banger.core import pendingws, starting, workspaces
from banger.core import reconcile as reconciling
from banger.core.batch import BatchResult
from banger.core.guestports import GuestSocketView, reachability
from banger.core.operations import (
    BootSlots,
    OpControl,
    Operation,
    Operations,
    ProgressSink,
    default_max_boots,
    no_progress,
)
from banger.core.reconcile import LIVE_STATES
from banger.core.runtime import Handles, HandleStore, release_runtime
from banger.core.startplan import (
    WORKSPACE_GUEST_PATH,
    check_bootstrap,
    check_network,
    host_net,
    read_config,
)
from banger.model import netalloc
from banger.model.config import Config
from banger.model.errors import ConflictError, InvalidRequest, NotFoundError, OperationFailed
from banger.model.layout import Layout, VMPaths
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
from banger.pipeline import Event
from banger.ports import Endpoint, HostPorts, WorkspaceRequest
from banger.store.vms import Conflict, NotFound, VMRepository

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Timeouts:
    ready: float = 180.0
    guest_poweroff: float = 10.0
    qmp_quit: float = 5.0
    kill: float = 5.0


@dataclass(frozen=True)
class VMView:
    """A VM as shown to users: the record plus what was observed of it just now."""

    vm: VM
    handles: Handles | None
    paths: VMPaths


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
    def __init__(self, *, repo: VMRepository, ops: Operations, host: HostPorts, layout: Layout,
                 clock: Callable[[], float] = time.time, timeouts: Timeouts = Timeouts(),
                 failpoint: str | None = None,
                 load_config: Callable[[], Config] = Config,
                 max_boots: int | None = None) -> None:
        self.repo = repo
        self.ops = ops
        self.host = host
        self.layout = layout
        self.clock = clock
        self.timeouts = timeouts
        self.failpoint = failpoint
        self.load_config = load_config
        self.handles = HandleStore()
        self.boots = BootSlots(max_boots or default_max_boots())
        self._locks_guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self._create_lock = threading.Lock()
        self._identities: dict[str, dict[str, str]] = {}
        # Told the VM list after every lifecycle change (DNS records, ssh_config).
        self.on_change: list[Callable[[list[VMView]], None]] = []
        self._notify_lock = threading.Lock()

    def notify(self) -> None:
        """Hand listeners the current VM list. Serialised, and listed inside the lock:
        of two operations ending at once, the later list is always delivered last."""
        if not self.on_change:
            return
        with self._notify_lock:
            views = self.list_vms()
            for listener in self.on_change:
                try:
                    listener(views)
                except Exception:
                    log.exception("a VM-change listener failed")

    # ---- lookup -------------------------------------------------------------------------

    def resolve(self, ref: str) -> VM:
        vm = self.repo.by_name(ref)
        if vm is not None:
            return vm
        try:
            return self.repo.get(ref)
        except NotFound:
            pass
        matches = [v for v in self.repo.list() if len(ref) >= 4 and v.id.startswith(ref)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise ConflictError(f"VM ref {ref!r} is ambiguous: matches "
                                f"{', '.join(v.name for v in matches)}")
        raise NotFoundError(f"no VM named {ref!r} (see `banger vm list`)")

    def _lock(self, vm_id: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(vm_id, threading.Lock())

    def _reread(self, vm: VM) -> VM:
        """The record as it is now, under its lock: an operation that waited for the lock
        behind a delete finds the VM gone (not found, never an internal error)."""
        try:
            return self.repo.get(vm.id)
        except NotFound as exc:
            raise NotFoundError(f"VM {vm.name!r} no longer exists (deleted meanwhile)") from exc

    # ---- create / start -----------------------------------------------------------------

    @_notifies
    def create(self, *, name: str | None, spec: VMSpec, start: bool = True,
               sink: ProgressSink = no_progress,
               workspace: WorkspaceRequest | None = None, control: OpControl | None = None,
               on_record: Callable[[VM], None] | None = None) -> VM:
        """``on_record`` is told the new record as soon as it exists (the daemon deletes
        an ephemeral VM whose client went away by its id)."""
        try:
            spec = spec.validated()
            if name is not None:
                validate_name(name)
        except InvalidSpec as exc:
            raise InvalidRequest(str(exc)) from exc
        check_network(self.host, spec.network)
        if spec.image not in self.host.images.known():
            raise NotFoundError(f"unknown image {spec.image!r}; known images: "
                                 f"{', '.join(self.host.images.known())}")
        # Read the repo before anything exists: a repo that cannot be copied exactly is
        # refused with nothing created.
        selection = self.host.workspace.select(workspace) if workspace else None
        if selection is not None:
            check_bootstrap(selection, spec.nat, name)
        vm_id = new_vm_id()
        now = self.clock()
        vm = VM(id=vm_id, name=name or default_name(vm_id), spec=spec, state=VMState.CREATED,
                created_at=now, updated_at=now,
                workspace_path=str(selection.repo) if selection else None,
                workspace_guest_path=WORKSPACE_GUEST_PATH if selection else None,
                workspace_head=selection.head if selection else None,
                # In the record's own insert: kept until a work disk holds the repo.
                pending_workspace=pendingws.record(selection.request) if selection else None)
        # Address choice and insert under one lock: two creates never share an address.
        with self._create_lock:
            if spec.network is NetworkMode.TAP:
                vm = replace(vm, guest_ip=str(self._allocate_ip(vm_id)))
            try:
                self.repo.insert(vm)
            except Conflict as exc:
                raise ConflictError(str(exc)) from exc
        self.layout.vm(vm_id).dir.mkdir(parents=True, exist_ok=True)
        if on_record is not None:
            on_record(vm)
        if start:
            return self.start(vm.id, sink=sink, control=control)
        return vm

    def default_network(self) -> NetworkMode:
        """The network mode for a VM whose creator did not say: `[network] mode`."""
        return NetworkMode(self._config().network.mode)

    def _config(self) -> Config:
        return read_config(self.load_config)

    def _allocate_ip(self, vm_id: str) -> IPv4Address:
        subnet = self._config().network.subnet
        used = {IPv4Address(v.guest_ip) for v in self.repo.list() if v.guest_ip}
        try:
            return netalloc.allocate_ip(vm_id, subnet, used)
        except netalloc.SubnetFull as exc:
            raise ConflictError(str(exc)) from exc

    def _release(self, vm: VM, paths: VMPaths) -> None:
        release_runtime(paths, self.host.vmm, self.handles, kill_timeout=self.timeouts.kill,
                        net=host_net(self.host, vm))

    @staticmethod
    def _endpoint_of(vm: VM, h: Handles | None) -> Endpoint | None:
        """A running VM's ssh endpoint; None when it is not running."""
        if vm.state is not VMState.RUNNING:
            return None
        if h is None or h.endpoint is None:
            raise ConflictError(f"VM {vm.name!r} is running but banger has no ssh "
                                f"endpoint for it: `banger vm restart {vm.name}`")
        return h.endpoint

    @_notifies
    def start(self, ref: str, *, sink: ProgressSink = no_progress,
              control: OpControl | None = None) -> VM:
        vm = self.resolve(ref)
        with self._lock(vm.id):
            vm = self._observe_locked(self._reread(vm))
            if vm.state is VMState.RUNNING:
                raise ConflictError(f"VM {vm.name!r} is already running")
            return starting.start_locked(self, vm, sink, control)

    # ---- stop / kill / restart ----------------------------------------------------------

    @_notifies
    def stop(self, ref: str, *, sink: ProgressSink = no_progress) -> VM:
        vm = self.resolve(ref)
        starting.cancel_start(self, vm, "the VM is being stopped")
        with self._lock(vm.id):
            vm = self._observe_locked(self._reread(vm))
            if vm.state not in LIVE_STATES:
                return vm
            with self.ops.track("stop", vm.id, vm.name, sink) as op:
                self._graceful_stop_locked(vm, op)
                stopped = vm.with_state(VMState.STOPPED, self.clock(), op_id=op.id)
                self.repo.update(stopped)
                return stopped

    def _graceful_stop_locked(self, vm: VM, op: Operation) -> None:
        """Guest poweroff, then QMP quit, then SIGKILL, each after a short deadline."""
        paths = self.layout.vm(vm.id)
        h = self.handles.get(vm.id) or self.handles.load(paths)
        vmm, t = self.host.vmm, self.timeouts
        if h is not None and vmm.alive(h.pid, paths.qmp_socket):
            emit = starting.forward(self.ops, op, vm.name)
            gone = False
            if h.endpoint is not None:
                emit(Event("run", "guest_poweroff", "powering off the guest"))
                try:
                    self.host.guest.poweroff(addr=h.endpoint, alias=paths.names.ssh_alias,
                                             timeout=t.guest_poweroff)
                except Exception as exc:  # the next deadline takes over; say why
                    log.info("guest poweroff of %s failed: %s", vm.name, exc)
                gone = vmm.wait_exit(h.pid, t.guest_poweroff)
                emit(Event("ok" if gone else "failed", "guest_poweroff", None))
            if not gone:
                emit(Event("run", "qmp_quit", "asking QEMU to quit"))
                vmm.quit(paths.qmp_socket)
                gone = vmm.wait_exit(h.pid, t.qmp_quit)
                emit(Event("ok" if gone else "failed", "qmp_quit", None))
        self._release(vm, paths)

    @_notifies
    def kill(self, ref: str, *, signal: int = signals.SIGKILL,
             sink: ProgressSink = no_progress) -> VM:
        vm = self.resolve(ref)
        starting.cancel_start(self, vm, "the VM is being killed")
        with self._lock(vm.id):
            vm = self._reread(vm)
            paths = self.layout.vm(vm.id)
            with self.ops.track("kill", vm.id, vm.name, sink) as op:
                h = self.handles.get(vm.id) or self.handles.load(paths)
                if h is not None and self.host.vmm.alive(h.pid, paths.qmp_socket):
                    self.host.vmm.kill(h.pid, signal)
                    self.host.vmm.wait_exit(h.pid, self.timeouts.kill)
                self._release(vm, paths)
                stopped = vm.with_state(VMState.STOPPED, self.clock(), op_id=op.id)
                self.repo.update(stopped)
                return stopped

    @_notifies
    def restart(self, ref: str, *, sink: ProgressSink = no_progress,
                control: OpControl | None = None) -> VM:
        vm = self.resolve(ref)
        # One control for both halves, so that a cancel during the stop half (also a
        # kill or delete of this VM) stops the start half.
        control = control or OpControl()
        with self._lock(vm.id):
            vm = self._observe_locked(self._reread(vm))
            if vm.state in LIVE_STATES:
                # The stop half runs to its end; a cancel during it stops the start half.
                with self.ops.track("stop", vm.id, vm.name, sink, control) as op:
                    self._graceful_stop_locked(vm, op)
                    vm = vm.with_state(VMState.STOPPED, self.clock(), op_id=op.id)
                    self.repo.update(vm)
            return starting.start_locked(self, vm, sink, control)

    # ---- delete / prune / set -----------------------------------------------------------

    @_notifies
    def delete(self, ref: str, *, sink: ProgressSink = no_progress,
               only_idle: bool = False) -> VM:
        """``only_idle`` (prune): keep the VM if, by the time its lock is ours, it runs or
        is starting; the list prune chose from may be older than a start or restart."""
        vm = self.resolve(ref)
        if not only_idle:  # prune leaves a VM that is starting alone
            starting.cancel_start(self, vm, "the VM is being deleted")
        with self._lock(vm.id):
            vm = self._reread(vm)
            if only_idle:
                vm = self._observe_locked(vm)
                if vm.state in LIVE_STATES:
                    raise ConflictError(f"VM {vm.name!r} is {vm.state.value} now: kept "
                                        f"(prune deletes only VMs that are not running)")
            paths = self.layout.vm(vm.id)
            with self.ops.track("delete", vm.id, vm.name, sink):
                self._release(vm, paths)
                self.host.guest.forget_host(paths.names.ssh_alias)
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
                self.repo.delete(vm.id)
        with self._locks_guard:
            self._locks.pop(vm.id, None)
        return vm

    def prepare_workspace(self, ref: str, req: WorkspaceRequest,
                          sink: ProgressSink = no_progress) -> VM:
        return workspaces.prepare_workspace(self, ref, req, sink)

    def workspace_dry_run(self, req: WorkspaceRequest) -> list[str]:
        return self.host.workspace.dry_run(req)

    def prune(self, refs: Sequence[str] | None = None) -> list[BatchResult]:
        return batches.prune(self, refs)

    def set(self, ref: str, *, vcpus: int | None = None, memory_mib: int | None = None,
            work_disk_mib: int | None = None) -> VM:
        vm = self.resolve(ref)
        with self._lock(vm.id):
            vm = self._observe_locked(self._reread(vm))
            if vm.state in LIVE_STATES:
                raise ConflictError(f"VM {vm.name!r} is {vm.state.value}: stop it first "
                                    f"(`banger vm stop {vm.name}`); changes apply at next start")
            try:
                spec = vm.spec.with_changes(vcpus=vcpus, memory_mib=memory_mib,
                                            work_disk_mib=work_disk_mib)
            except InvalidSpec as exc:
                raise InvalidRequest(str(exc)) from exc
            if (spec.work_disk_mib != vm.spec.work_disk_mib
                    and self.layout.vm(vm.id).work_disk.exists()):
                raise InvalidRequest("the work disk already exists; its size cannot be changed "
                                     "yet (create a new VM with --disk-size)")
            updated = replace(vm, spec=spec, updated_at=self.clock())
            self.repo.update(updated)
            return updated

    # ---- several VMs at once ------------------------------------------------------------

    def batch(self, action: str, refs: Sequence[str], **kwargs: object) -> list[BatchResult]:
        return batches.batch(self, action, refs, **kwargs)

    # ---- observation --------------------------------------------------------------------

    def list_vms(self) -> list[VMView]:
        return [self.view(v) for v in self.repo.list()]

    def show(self, ref: str) -> VMView:
        return self.view(self.resolve(ref))

    def view(self, vm: VM) -> VMView:
        lock = self._lock(vm.id)
        if lock.acquire(blocking=False):
            try:
                vm = self._observe_locked(self.repo.get(vm.id))
            except NotFound as exc:
                raise NotFoundError(f"VM {vm.name!r} no longer exists") from exc
            finally:
                lock.release()
        paths = self.layout.vm(vm.id)
        h = self.handles.get(vm.id) if vm.state in LIVE_STATES else None
        return VMView(vm=vm, handles=h, paths=paths)

    def ports(self, ref: str) -> tuple[VM, list[GuestSocketView]]:
        """The running guest's listening sockets and where the host reaches each one."""
        view = self.show(ref)
        vm = view.vm
        addr = self._endpoint_of(vm, view.handles)
        if addr is None:
            raise ConflictError(f"VM {vm.name!r} is {vm.state.value}, not running: its ports "
                                f"are read from the running guest; start it with "
                                f"`banger vm start {vm.name}`")
        sockets = self.host.guest.listening(addr=addr, alias=view.paths.names.ssh_alias)
        return vm, reachability(vm, addr, sockets)

    def _observe_locked(self, vm: VM) -> VM:
        return reconciling.observe_locked(self, vm)

    @_notifies
    def reconcile(self) -> list[VM]:
        return reconciling.reconcile(self)
