"""VM use cases: create, start, stop, restart, kill, delete, set, prune, observe, reconcile.

Reaches the host only through :mod:`banger.core.ports`. Each VM has a lock: one lifecycle
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
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from ipaddress import IPv4Address
from pathlib import Path
from typing import ParamSpec, TypeVar

from banger.core.errors import (
    BangerError,
    Cancelled,
    ConflictError,
    InvalidRequest,
    NotFoundError,
    OperationFailed,
)
from banger.core.guestports import GuestSocketView, reachability
from banger.core.operations import (
    BootSlots,
    OpControl,
    Operation,
    Operations,
    Progress,
    ProgressSink,
    default_max_boots,
    no_progress,
)
from banger.core.ports import (
    Endpoint,
    HostPorts,
    WorkspaceRequest,
    WorkspaceSelection,
)
from banger.core.runtime import Handles, HandleStore, release_runtime
from banger.core.startplan import (
    BOOTSTRAP_MARK,
    WORKSPACE_DIR,
    WORKSPACE_GUEST_PATH,
    StartContext,
    check_bootstrap,
    check_network,
    host_net,
    launch_bootstrap,
    read_config,
    start_steps,
)
from banger.model import netalloc
from banger.model.config import Config
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
from banger.pipeline import Event, StepFailed, run_steps
from banger.store.vms import Conflict, NotFound, VMRepository

log = logging.getLogger(__name__)

LIVE_STATES = frozenset({VMState.RUNNING, VMState.STARTING, VMState.STOPPING})


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


@dataclass(frozen=True)
class BatchResult:
    ref: str
    vm: VM | None
    error: BangerError | None


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
        self._pending_workspace: dict[str, WorkspaceSelection] = {}
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
                workspace_head=selection.head if selection else None)
        # Address choice and insert under one lock: two creates never share an address.
        with self._create_lock:
            if spec.network is NetworkMode.TAP:
                vm = replace(vm, guest_ip=str(self._allocate_ip(vm_id)))
            try:
                self.repo.insert(vm)
            except Conflict as exc:
                raise ConflictError(str(exc)) from exc
        self.layout.vm(vm_id).dir.mkdir(parents=True, exist_ok=True)
        if selection is not None:
            # Held until a start makes the work disk (a failed first start keeps it).
            self._pending_workspace[vm_id] = selection
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
            return self._start_locked(vm, sink, control)

    def _start_locked(self, vm: VM, sink: ProgressSink, control: OpControl | None) -> VM:
        paths = self.layout.vm(vm.id)
        with self.ops.track("start", vm.id, vm.name, sink, control) as op:
            vm = vm.with_state(VMState.STARTING, self.clock(), op_id=op.id)
            self.repo.update(vm)
            ctx = StartContext(
                vm=vm, paths=paths, host=self.host, handles=self.handles, clock=self.clock,
                ready_timeout=self.timeouts.ready, failpoint=self.failpoint,
                workspace=self._pending_workspace.get(vm.id), load_config=self.load_config,
                identities=self._identities,
                on_detail=lambda stage, msg: self.ops.emit(
                    op, Progress(op.id, vm.name, "detail", stage, message=msg)),
                check_cancel=op.control.check,
            )
            try:
                with self.boots.slot(op.control, lambda n: self.ops.emit(op, Progress(
                        op.id, vm.name, "queued", "queued",
                        f"waiting for a boot slot ({self.boots.describe()}): "
                        f"number {n} in line"))):
                    run_steps(start_steps(ctx), ctx, on_event=self._forward(op, vm.name),
                              check=op.control.check)
            except Cancelled as exc:  # still in line: nothing was set up
                err = StepFailed(str(exc), [exc], step="queued")
                raise self._start_failed(vm, op, err) from exc
            except StepFailed as err:
                raise self._start_failed(vm, op, err) from err
            self._pending_workspace.pop(vm.id, None)
            running = replace(vm.with_state(VMState.RUNNING, self.clock(), op_id=op.id),
                              boot_id=ctx.boot_id)
            self.repo.update(running)
            return running

    def _cancel_start(self, vm: VM, why: str) -> None:
        """Cancel a start of ``vm`` in flight (booting, or in line for a boot slot, its
        lock held all along): a stop, kill or delete would otherwise wait behind the whole
        boot (and the line before it), then undo it anyway. The start rolls back and lets
        go of the lock at once."""
        for op in self.ops.in_flight():
            # "stop": a restart's stop half shares its control with the start half.
            if op.vm_id == vm.id and op.kind in ("start", "stop"):
                op.control.cancel(f"cancelled: {why}")

    def _start_failed(self, vm: VM, op: Operation, err: StepFailed) -> BangerError:
        """Record a failed (error) or cancelled (stopped) start; the error to raise."""
        message = str(err.cause)
        if err.undo_errors:
            message += "; cleanup also failed: " + "; ".join(
                f"{type(e).__name__}: {e}" for e in err.undo_errors)
        if isinstance(err.cause, Cancelled):
            message = f"start cancelled before stage {err.step!r} ({message})"
            self.repo.update(vm.with_state(VMState.STOPPED, self.clock(), error=message,
                                           stage=err.step, op_id=op.id))
            return Cancelled(f"{vm.name!r}: {message}; what it had set up was rolled back",
                             stage=err.step, op_id=op.id)
        self.repo.update(vm.with_state(VMState.ERROR, self.clock(), error=message,
                                       stage=err.step, op_id=op.id))
        return OperationFailed(f"start of {vm.name!r} failed at stage {err.step!r}: "
                               f"{message}", stage=err.step, op_id=op.id)

    def _forward(self, op: Operation, vm_name: str) -> Callable[[Event], None]:
        def forward(e: Event) -> None:
            msg = f"{type(e.error).__name__}: {e.error}" if e.error is not None else None
            self.ops.emit(op, Progress(op.id, vm_name, e.kind, e.step, e.progress, e.elapsed,
                                       msg))
        return forward

    # ---- stop / kill / restart ----------------------------------------------------------

    @_notifies
    def stop(self, ref: str, *, sink: ProgressSink = no_progress) -> VM:
        vm = self.resolve(ref)
        self._cancel_start(vm, "the VM is being stopped")
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
            emit = self._forward(op, vm.name)
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
        self._cancel_start(vm, "the VM is being killed")
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
            return self._start_locked(vm, sink, control)

    # ---- delete / prune / set -----------------------------------------------------------

    @_notifies
    def delete(self, ref: str, *, sink: ProgressSink = no_progress,
               only_idle: bool = False) -> VM:
        """``only_idle`` (prune): keep the VM if, by the time its lock is ours, it runs or
        is starting; the list prune chose from may be older than a start or restart."""
        vm = self.resolve(ref)
        if not only_idle:  # prune leaves a VM that is starting alone
            self._cancel_start(vm, "the VM is being deleted")
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
                self._pending_workspace.pop(vm.id, None)
        with self._locks_guard:
            self._locks.pop(vm.id, None)
        return vm

    def prepare_workspace(self, ref: str, req: WorkspaceRequest,
                          sink: ProgressSink = no_progress) -> VM:
        """Re-sync a VM's /root/repo from the host repo: a running VM at once, as one
        stream over ssh; a stopped one at its next start, from a copy staged now."""
        vm = self.resolve(ref)
        selection = self.host.workspace.select(req)
        check_bootstrap(selection, vm.spec.nat, vm.name)
        with self._lock(vm.id):
            vm = self._observe_locked(self._reread(vm))
            paths = self.layout.vm(vm.id)
            addr = self._endpoint_of(vm, self.handles.get(vm.id))
            with self.ops.track("workspace_prepare", vm.id, vm.name, sink) as op:
                emit = self._forward(op, vm.name)

                def detail(stage: str, msg: str, op: Operation = op,
                           name: str = vm.name) -> None:
                    self.ops.emit(op, Progress(op.id, name, "detail", stage, message=msg))

                if addr is not None:
                    self._push_workspace(selection, paths, addr, emit, detail)
                elif paths.work_disk.exists():
                    self._stage_pending(selection, paths, emit)
                    detail("workspace_stage", f"{vm.name} is {vm.state.value}: the repo goes "
                           f"to {WORKSPACE_GUEST_PATH} when it next starts "
                           f"(`banger vm start {vm.name}`)")
                else:
                    # Never started: the work disk is made with the repo in it.
                    self._pending_workspace[vm.id] = selection
                    detail("workspace_stage", f"{vm.name} has no work disk yet: the repo "
                           "is copied in when it is made, at the next start")
                updated = replace(vm, workspace_path=str(selection.repo),
                                  workspace_guest_path=WORKSPACE_GUEST_PATH,
                                  workspace_head=selection.head,
                                  updated_at=self.clock(), last_op_id=op.id)
                self.repo.update(updated)
                return updated

    def _push_workspace(self, selection: WorkspaceSelection, paths: VMPaths, addr: Endpoint,
                        emit: Callable[[Event], None],
                        detail: Callable[[str, str], None]) -> None:
        emit(Event("run", "workspace_stage", "staging the repo"))
        started = self.clock()
        with self.host.workspace.staged(selection, paths.dir) as tree:
            emit(Event("ok", "workspace_stage", None, self.clock() - started))
            emit(Event("run", "workspace_copy", f"copying to {WORKSPACE_GUEST_PATH}"))
            started = self.clock()
            self.host.guest.push_tree(addr=addr, alias=paths.names.ssh_alias, tree=tree,
                                      guest_path=WORKSPACE_GUEST_PATH)
        emit(Event("ok", "workspace_copy", None, self.clock() - started))
        if selection.request.bootstrap and selection.tool_files:
            emit(Event("run", "tool_bootstrap", "starting the tool install in the background"))
            launch_bootstrap(self.host, addr, paths, self._config().installer_url, detail)
            emit(Event("ok", "tool_bootstrap", None))

    def _stage_pending(self, selection: WorkspaceSelection, paths: VMPaths,
                       emit: Callable[[Event], None]) -> None:
        """Stage the repo now (what the host has at this moment) for the next start."""
        emit(Event("run", "workspace_stage", "staging the repo for the next start"))
        started = self.clock()
        scratch = Path(tempfile.mkdtemp(prefix=".workspace-pending-", dir=paths.dir))
        try:
            with self.host.workspace.staged(selection, paths.dir) as tree:
                shutil.move(tree, scratch / WORKSPACE_DIR)
            if selection.request.bootstrap and selection.tool_files:
                (scratch / BOOTSTRAP_MARK).touch()
            shutil.rmtree(paths.pending_workspace, ignore_errors=True)
            scratch.rename(paths.pending_workspace)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        emit(Event("ok", "workspace_stage", None, self.clock() - started))

    def workspace_dry_run(self, req: WorkspaceRequest) -> list[str]:
        return self.host.workspace.dry_run(req)

    def prune(self, refs: Sequence[str] | None = None) -> list[BatchResult]:
        """Delete the VMs that are not running: of ``refs`` when given (the ones the user
        saw and confirmed; a VM that stopped since the question was asked is not among
        them), else of all."""
        doomed = list(refs) if refs is not None else [
            v.vm.id for v in self.list_vms() if v.vm.state is not VMState.RUNNING]
        # A VM listed as starting (or stopped, in the middle of a restart) is checked
        # again under its lock: it is deleted only if it is still not running then.
        return self.batch("delete", doomed, only_idle=True)

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
        """Resolve every ref once, de-duplicate, act concurrently, report each result."""
        fn: Callable[..., VM] = {
            "start": self.start, "stop": self.stop, "restart": self.restart,
            "kill": self.kill, "delete": self.delete,
        }[action]
        resolved: list[tuple[str, VM | None, BangerError | None]] = []
        for ref in refs:
            try:
                resolved.append((ref, self.resolve(ref), None))
            except BangerError as exc:
                resolved.append((ref, None, exc))
        unique: dict[str, VM] = {}
        for _, vm, _err in resolved:
            if vm is not None:
                unique.setdefault(vm.id, vm)
        outcomes: dict[str, tuple[VM | None, BangerError | None]] = {}

        def act(vm: VM) -> None:
            try:
                outcomes[vm.id] = (fn(vm.id, **kwargs), None)
            except BangerError as exc:
                outcomes[vm.id] = (None, exc)
            except Exception as exc:
                outcomes[vm.id] = (None, OperationFailed(f"{action} {vm.name}: {exc}"))

        if unique:
            with ThreadPoolExecutor(max_workers=min(8, len(unique))) as pool:
                list(pool.map(act, unique.values()))
        results: list[BatchResult] = []
        seen: set[str] = set()
        for ref, vm, err in resolved:
            if vm is None:
                results.append(BatchResult(ref, None, err))
            elif vm.id not in seen:
                seen.add(vm.id)
                done, failure = outcomes[vm.id]
                results.append(BatchResult(ref, done, failure))
        return results

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
        """Demote a VM whose VMM is gone; rediscover handles of one that still runs."""
        if vm.state not in LIVE_STATES:
            return vm
        paths = self.layout.vm(vm.id)
        h = self.handles.get(vm.id) or self.handles.load(paths)
        if h is not None and self.host.vmm.alive(h.pid, paths.qmp_socket):
            return vm
        found = self.host.vmm.rediscover(paths.qmp_socket)
        if found is not None:
            log.warning("VM %s: handles lost; rediscovered VMM pid %d", vm.name, found.pid)
            tap = vm.spec.network is NetworkMode.TAP and vm.guest_ip is not None
            self.handles.put(paths, Handles(
                pid=found.pid, ssh_port=22 if tap else found.ssh_port,
                qmp_socket=str(paths.qmp_socket),
                accel=self.host.vmm.accel().accel, boot_id=vm.boot_id or "",
                started_at=self.clock(), vmm=self.host.vmm.name,
                accel_reason=self.host.vmm.accel().reason,
                ssh_host=vm.guest_ip if tap and vm.guest_ip else "127.0.0.1",
                tap=paths.names.tap if tap else None))
            return vm
        self._release(vm, paths)
        demoted = vm.with_state(
            VMState.STOPPED, self.clock(),
            error=None if vm.state is VMState.STOPPING else "the VMM process exited",
            stage=None)
        self.repo.update(demoted)
        return demoted

    @_notifies
    def reconcile(self) -> list[VM]:
        """At daemon start: keep live VMs (same pid), tear down dead or half-started ones."""
        out = []
        for vm in self.repo.list():
            with self._lock(vm.id):
                if vm.state is VMState.STARTING:
                    # A start interrupted by a daemon crash: nothing finished it.
                    self._release(vm, self.layout.vm(vm.id))
                    vm = vm.with_state(VMState.ERROR, self.clock(),
                                       error="the daemon stopped during this start",
                                       stage=vm.last_error_stage)
                    self.repo.update(vm)
                else:
                    vm = self._observe_locked(vm)
            out.append(vm)
        self._sweep_network(out)
        return out

    def _sweep_network(self, vms: list[VM]) -> None:
        """Remove taps and NAT rules banger made for VMs that are not running (left by a
        crash, or by a VM deleted while the daemon was down), and put back the rules of
        running --nat VMs (a firewall reload or a Docker start since may have dropped
        them or added a drop chain they must be accepted in)."""
        if self.host.net.unavailable() is not None:
            return
        live = {v.id for v in vms if v.state in LIVE_STATES}
        bridge = self._config().network.bridge
        for vm in vms:
            if (vm.state in LIVE_STATES and vm.spec.network is NetworkMode.TAP
                    and vm.spec.nat and vm.guest_ip):
                self.host.net.add_nat(vm.id, IPv4Address(vm.guest_ip), bridge)
        for tap in self.host.net.taps():
            owner = tap[2:]
            if not any(vm_id.startswith(owner) for vm_id in live):
                log.info("removing leftover tap %s", tap)
                self.host.net.delete_tap(tap)
        for vm_id in self.host.net.nat_vm_ids() - live:
            log.info("removing leftover NAT rules of VM %s", vm_id)
            self.host.net.remove_nat(vm_id)
