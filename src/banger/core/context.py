"""What every VM use case shares: :class:`VMContext`, and observing a VM under its lock.

The use-case modules (:mod:`~banger.core.lifecycle`, :mod:`~banger.core.workspaces`,
:mod:`~banger.core.reconcile`, :mod:`~banger.core.batch`) take the context and use only
its public fields and methods. Each VM has a lock: one lifecycle operation at a time per
VM; different VMs proceed concurrently, and reads never wait for a VM's lock
(:meth:`VMContext.locked` is the one way in for an operation).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from banger.core.operations import BootSlots, Operations
from banger.core.runtime import Handles, HandleStore, release_runtime
from banger.model.config import Config, ConfigError
from banger.model.errors import ConflictError, InvalidRequest, NotFoundError
from banger.model.layout import Layout, VMPaths
from banger.model.vm import VM, NetworkMode, VMState
from banger.ports import HostPorts, NetPort
from banger.store.vms import NotFound, VMRepository

log = logging.getLogger(__name__)

LIVE_STATES = frozenset({VMState.RUNNING, VMState.STARTING, VMState.STOPPING})


@dataclass(frozen=True)
class Timeouts:
    ready: float = 180.0
    guest_poweroff: float = 10.0
    vmm_quit: float = 5.0
    kill: float = 5.0
    # sshd, for a person's `vm ssh`, when it was not seen ready yet on this boot: it
    # starts right after the agent, so a running guest's sshd is at most a few s away.
    sshd: float = 30.0


@dataclass
class VMContext:
    """The repo, the operations, the host ports and the rest every use case works with."""

    repo: VMRepository
    ops: Operations
    host: HostPorts
    layout: Layout
    boots: BootSlots
    clock: Callable[[], float] = time.time
    timeouts: Timeouts = Timeouts()
    failpoint: str | None = None  # a start stage that fails on purpose (tests)
    load_config: Callable[[], Config] = Config
    handles: HandleStore = field(default_factory=HandleStore)
    # The git identity each VM has (by id), so a start that changes nothing costs no ssh.
    identities: dict[str, dict[str, str]] = field(default_factory=dict)
    # (VM id, boot id) -> whether that boot's sshd took banger's key (core.views).
    sshd_ready: dict[tuple[str, str], bool] = field(default_factory=dict)
    # Address choice and insert of a new VM happen under it: no two share an address.
    create_lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _locks_guard: threading.Lock = field(default_factory=threading.Lock, init=False,
                                         repr=False)
    _locks: dict[str, threading.Lock] = field(default_factory=dict, init=False, repr=False)

    # ---- lookup and locks -----------------------------------------------------------

    def resolve(self, ref: str) -> VM:
        """The VM named ``ref``, or with that id, or (4 characters or more) id prefix."""
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

    def lock(self, vm_id: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(vm_id, threading.Lock())

    def forget_lock(self, vm_id: str) -> None:
        with self._locks_guard:
            self._locks.pop(vm_id, None)

    def reread(self, vm: VM) -> VM:
        """The record as it is now, under its lock: an operation that waited for the lock
        behind a delete finds the VM gone (not found, never an internal error)."""
        try:
            return self.repo.get(vm.id)
        except NotFound as exc:
            raise NotFoundError(f"VM {vm.name!r} no longer exists (deleted meanwhile)") from exc

    @contextmanager
    def locked(self, ref: str | VM, *, observe: bool = True) -> Iterator[VM]:
        """Hold the lock of VM ``ref`` (a ref, or a VM resolved before); yield its record
        as it is now, observed against the host (a VM whose VMM died is stopped) unless
        ``observe`` is false."""
        vm = self.resolve(ref) if isinstance(ref, str) else ref
        with self.lock(vm.id):
            vm = self.reread(vm)
            yield self.observe(vm) if observe else vm

    # ---- observation ----------------------------------------------------------------

    def observe(self, vm: VM) -> VM:
        """Under ``vm``'s lock: demote a VM whose VMM is gone; rediscover the handles of
        one that still runs."""
        if vm.state not in LIVE_STATES:
            return vm
        paths = self.layout.vm(vm.id)
        vmm = self.host.vmm
        h = self.handles.get(vm.id) or self.handles.load(paths)
        if h is not None and vmm.alive(h.pid, paths.control_socket):
            return vm
        found = vmm.rediscover(paths.control_socket)
        if found is not None:
            log.warning("VM %s: handles lost; rediscovered VMM pid %d", vm.name, found.pid)
            tap = vm.spec.network is NetworkMode.TAP and vm.guest_ip is not None
            self.handles.put(paths, Handles(
                pid=found.pid, ssh_port=22 if tap else found.ssh_port,
                control_socket=str(paths.control_socket),
                accel=vmm.accel().accel, boot_id=vm.boot_id or "",
                started_at=self.clock(), vmm=vmm.name,
                accel_reason=vmm.accel().reason,
                ssh_host=vm.guest_ip if tap and vm.guest_ip else "127.0.0.1",
                tap=paths.names.tap if tap else None,
                agent=None if found.agent is None else str(found.agent)))
            return vm
        self.release(vm, paths)
        demoted = vm.with_state(
            VMState.STOPPED, self.clock(),
            error=None if vm.state is VMState.STOPPING else "the VMM process exited",
            stage=None)
        self.repo.update(demoted)
        return demoted

    @staticmethod
    def channel_of(vm: VM, h: Handles | None) -> Path | None:
        """A running VM's guest agent channel; None when it is not running."""
        if vm.state is not VMState.RUNNING:
            return None
        if h is None or h.agent is None:
            raise ConflictError(f"VM {vm.name!r} runs without a guest agent channel (it "
                                f"was started by an older banger): restart it with "
                                f"`banger vm restart {vm.name}`")
        return Path(h.agent)

    # ---- shared helpers -------------------------------------------------------------

    def config(self) -> Config:
        return read_config(self.load_config)

    def release(self, vm: VM, paths: VMPaths) -> None:
        """Release everything ``vm`` holds at run time (see :func:`release_runtime`), and
        forget what was seen of its boots (their sshd): a released VM's boot is over."""
        for seen in [k for k in list(self.sshd_ready) if k[0] == vm.id]:
            self.sshd_ready.pop(seen, None)
        release_runtime(paths, self.host.vmm, self.handles, kill_timeout=self.timeouts.kill,
                        net=host_net(self.host, vm), agent=self.host.agent)


def read_config(load: Callable[[], Config]) -> Config:
    """The config, or InvalidRequest naming the file, key and fix."""
    try:
        return load()
    except ConfigError as exc:
        raise InvalidRequest(str(exc)) from exc


def host_net(host: HostPorts, vm: VM) -> NetPort | None:
    """The network port when ``vm`` has host networking (tap) to release, else None."""
    return host.net if vm.spec.network is NetworkMode.TAP else None
