"""Pure VM records and rules: names, specs, states and the names derived from a VM id.

Stdlib only (and banger.local, itself stdlib only); nothing here touches the host.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, replace
from enum import StrEnum

# A DNS label (RFC 1123): the VM name becomes <name>.vm and a guest hostname. Defined in
# banger.local.names (banger's ssh_config, below the model, checks names too); the API
# schema (and so its OpenAPI document) and the CLI take it from here.
from banger.local.names import NAME_PATTERN as NAME_PATTERN
from banger.local.names import NAME_RULE as NAME_RULE

_LABEL = re.compile(NAME_PATTERN)

MIN_MEMORY_MIB = 128
MAX_MEMORY_MIB = 64 * 1024
MIN_VCPUS = 1
MAX_VCPUS = 64
MIN_WORK_DISK_MIB = 64
MAX_WORK_DISK_MIB = 1024 * 1024


class InvalidSpec(ValueError):
    """A VM spec or name the user gave cannot be used; the message says why and how."""


class VMState(StrEnum):
    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    ERROR = "error"


class NetworkMode(StrEnum):
    USER = "user"
    TAP = "tap"


class KernelKind(StrEnum):
    """The kernel a VM boots from its image: banger's microVM kernel (drivers built in,
    no initramfs, the fast default) or Debian's cloud kernel with a busybox initramfs
    (the fallback)."""

    MICROVM = "microvm"
    CLOUD = "cloud"


def validate_name(name: str) -> str:
    # fullmatch: with match, the pattern's $ would let a trailing newline through.
    if not _LABEL.fullmatch(name):
        raise InvalidSpec(
            f"invalid VM name {name!r}: use a DNS label, {NAME_RULE} (e.g. 'box' or 'web-1')"
        )
    return name


def new_vm_id() -> str:
    return secrets.token_hex(6)


def default_name(vm_id: str) -> str:
    return f"vm-{vm_id[:6]}"


@dataclass(frozen=True)
class VMSpec:
    """What the user asked for; changed only by `vm set` on a stopped VM."""

    vcpus: int = 1
    memory_mib: int = 512
    work_disk_mib: int = 4096
    image: str = "debian-bookworm"
    network: NetworkMode = NetworkMode.USER
    nat: bool = False
    kernel: KernelKind = KernelKind.MICROVM

    def validated(self) -> VMSpec:
        if not MIN_VCPUS <= self.vcpus <= MAX_VCPUS:
            raise InvalidSpec(f"--vcpu {self.vcpus} is out of range: use {MIN_VCPUS} to "
                              f"{MAX_VCPUS}")
        if not MIN_MEMORY_MIB <= self.memory_mib <= MAX_MEMORY_MIB:
            raise InvalidSpec(
                f"--memory {self.memory_mib} MiB is out of range: use {MIN_MEMORY_MIB} to "
                f"{MAX_MEMORY_MIB} MiB"
            )
        if not MIN_WORK_DISK_MIB <= self.work_disk_mib <= MAX_WORK_DISK_MIB:
            raise InvalidSpec(
                f"--disk-size {self.work_disk_mib} MiB is out of range: use "
                f"{MIN_WORK_DISK_MIB} to {MAX_WORK_DISK_MIB} MiB"
            )
        return self

    def with_changes(self, *, vcpus: int | None = None, memory_mib: int | None = None,
                     work_disk_mib: int | None = None) -> VMSpec:
        return replace(
            self,
            vcpus=self.vcpus if vcpus is None else vcpus,
            memory_mib=self.memory_mib if memory_mib is None else memory_mib,
            work_disk_mib=self.work_disk_mib if work_disk_mib is None else work_disk_mib,
        ).validated()


@dataclass(frozen=True)
class PendingWorkspace:
    """A repo chosen for a VM whose work disk is not made yet: the start that makes the
    work disk reads it again and copies it in. Kept with the VM's record (not in daemon
    memory) so that a daemon restart between create and first start does not lose it."""

    path: str
    include_untracked: bool = False
    branch: str | None = None
    from_ref: str | None = None
    bootstrap: bool = True


@dataclass(frozen=True)
class VM:
    """The durable record of a VM (what lives in SQLite)."""

    id: str
    name: str
    spec: VMSpec
    state: VMState
    created_at: float
    updated_at: float
    last_error: str | None = None
    last_error_stage: str | None = None
    last_op_id: str | None = None
    boot_id: str | None = None
    guest_ip: str | None = None
    workspace_path: str | None = None        # host repo copied in at creation
    workspace_guest_path: str | None = None  # where it is in the guest (/root/<name>)
    workspace_head: str | None = None        # the host repo's HEAD when it was copied
    # Set until a work disk holding the repo exists (cleared by the start that made it).
    pending_workspace: PendingWorkspace | None = None

    def with_state(self, state: VMState, now: float, *, error: str | None = None,
                   stage: str | None = None, op_id: str | None = None) -> VM:
        """The record in ``state``; raises :class:`InvalidTransition` when the state machine
        (:data:`TRANSITIONS`) has no such edge. Staying in a state (a stopped VM killed
        again, an error recorded anew) is always allowed."""
        if state is not self.state and not can_transition(self.state, state):
            raise InvalidTransition(f"VM {self.name!r}: no transition from "
                                    f"{self.state.value} to {state.value}")
        return replace(self, state=state, updated_at=now, last_error=error,
                       last_error_stage=stage, last_op_id=op_id or self.last_op_id)


class InvalidTransition(ValueError):
    """A use case tried to move a VM along an edge the state machine does not have (a bug
    in banger, not a user error)."""


# Allowed transitions of the durable state, enforced by VM.with_state. Observation
# (reconcile) may demote a running VM whose VMM died to stopped; a kill of a VM that never
# started records it stopped.
TRANSITIONS: dict[VMState, frozenset[VMState]] = {
    VMState.CREATED: frozenset({VMState.STARTING, VMState.STOPPED, VMState.ERROR}),
    VMState.STARTING: frozenset({VMState.RUNNING, VMState.ERROR, VMState.STOPPED}),
    VMState.RUNNING: frozenset({VMState.STOPPING, VMState.STOPPED, VMState.ERROR}),
    VMState.STOPPING: frozenset({VMState.STOPPED, VMState.ERROR}),
    VMState.STOPPED: frozenset({VMState.STARTING, VMState.ERROR}),
    VMState.ERROR: frozenset({VMState.STARTING, VMState.STOPPED}),
}


def can_transition(src: VMState, dst: VMState) -> bool:
    return dst in TRANSITIONS[src]


@dataclass(frozen=True)
class ResourceNames:
    """Names of a VM's resources, derived from its id alone so cleanup can find them."""

    vm_id: str

    @property
    def root_disk(self) -> str:
        return "root.qcow2"

    @property
    def work_disk(self) -> str:
        return "work.ext4"

    @property
    def serial_log(self) -> str:
        return "serial.log"

    @property
    def serial_log_rotated(self) -> str:
        """The serial log's older output, once it passed its cap."""
        return "serial.log.1"

    @property
    def vmm_log(self) -> str:
        return "vmm.log"

    @property
    def control_socket(self) -> str:
        # The name QEMU-era daemons gave it: kept, so that VMs running across an upgrade
        # are still found from their id alone.
        return "qmp.sock"

    @property
    def agent_socket(self) -> str:
        """The host end of the guest agent's channel (the VMM's side of it)."""
        return "agent.sock"

    @property
    def handles(self) -> str:
        return "handles.json"

    @property
    def ssh_alias(self) -> str:
        return f"banger-{self.vm_id}"

    @property
    def tap(self) -> str:
        # IFNAMSIZ is 16 including the NUL: "bt" + 12 hex = 14.
        return f"bt{self.vm_id[:12]}"
