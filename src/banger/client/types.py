"""What the daemon answers, as the CLI reads it: dataclasses built from the JSON (not
frozen: they are never changed, and frozen ones cost the CLI 3 ms more to define).

The daemon validates with the pydantic models of :mod:`banger.api.schema`; the CLI only
reads what they produced, so it needs no pydantic (70 ms of every command, here). The
field names here are the schema's (a unit test compares the two); fields the CLI does not
know are ignored, as pydantic ignored them. Request bodies are TypedDicts: the daemon is
their one validator.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, TypedDict, TypeVar

from banger.api.wire import API_VERSION
from banger.model.events import EVENT_KINDS, EventKind

R = TypeVar("R", bound="_Record")


def _known(cls: type[Any], data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


def _opt(cls: type[R], data: Any) -> R | None:
    return None if data is None else cls.from_json(data)


class _Record:
    """A dataclass read from the daemon's JSON: its known keys, nested ones by
    overriding :meth:`from_json`."""

    @classmethod
    def from_json(cls: type[R], data: dict[str, Any]) -> R:
        return cls(**_known(cls, data))


def as_json(obj: Any) -> Any:
    """The JSON form of a dataclass (or a list of them), for --json output."""
    if isinstance(obj, list):
        return [as_json(o) for o in obj]
    return asdict(obj)


@dataclass
class ErrorBody(_Record):
    code: str
    message: str
    stage: str | None = None
    op_id: str | None = None


@dataclass
class Health(_Record):
    version: str
    pid: int
    api: str = API_VERSION


@dataclass
class Runtime(_Record):
    pid: int
    ssh_port: int | None
    accel: str
    accel_reason: str
    vmm: str
    boot_id: str
    started_at: float
    ssh_host: str = "127.0.0.1"
    tap: str | None = None


@dataclass
class VMOut(_Record):
    id: str
    name: str
    state: str
    image: str
    vcpus: int
    memory_mib: int
    disk_mib: int
    network: str
    nat: bool
    created_at: float
    updated_at: float
    dir: str
    serial_log: str
    kernel: str = "microvm"
    last_error: str | None = None
    last_error_stage: str | None = None
    last_op_id: str | None = None
    boot_id: str | None = None
    guest_ip: str | None = None
    workspace_path: str | None = None
    workspace_guest_path: str | None = None
    workspace_head: str | None = None
    runtime: Runtime | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VMOut:
        known = _known(cls, data)
        known["runtime"] = _opt(Runtime, known.get("runtime"))
        return cls(**known)


@dataclass
class BatchItem(_Record):
    ref: str
    vm: VMOut | None = None
    error: ErrorBody | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BatchItem:
        return cls(ref=data["ref"], vm=_opt(VMOut, data.get("vm")),
                   error=_opt(ErrorBody, data.get("error")))


@dataclass
class BatchResponse(_Record):
    results: list[BatchItem]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BatchResponse:
        return cls([BatchItem.from_json(r) for r in data["results"]])


@dataclass
class ProgressEvent(_Record):
    type: str
    op_id: str | None = None
    vm: str | None = None
    kind: EventKind | None = None
    stage: str | None = None
    label: str | None = None
    elapsed: float | None = None
    message: str | None = None
    result: VMOut | None = None
    error: ErrorBody | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProgressEvent:
        known = _known(cls, data)
        if known.get("kind") not in EVENT_KINDS:
            # A kind this CLI does not know (a newer daemon's) is news it cannot show,
            # never a crash: the renderer's match is exhaustive over EVENT_KINDS only,
            # and a CLI that dies mid-stream cancels the operation it was following.
            known["kind"] = None
        known["result"] = _opt(VMOut, known.get("result"))
        known["error"] = _opt(ErrorBody, known.get("error"))
        return cls(**known)


@dataclass
class Logs(_Record):
    serial_log: str
    serial: str
    vmm_log: str
    vmm: str
    serial_rotated: str | None = None


@dataclass
class LogEvent(_Record):
    type: str
    data: str | None = None
    count: int | None = None
    reason: str | None = None


@dataclass
class SshTarget(_Record):
    host: str
    port: int
    user: str
    key: str
    known_hosts: str
    alias: str
    vm: str
    argv: list[str]
    workdir: str | None = None


@dataclass
class GuestPortOut(_Record):
    proto: str
    address: str
    port: int
    process: str | None = None
    endpoint: str | None = None
    note: str | None = None


@dataclass
class VMPorts(_Record):
    vm: str
    network: str
    ports: list[GuestPortOut]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VMPorts:
        return cls(vm=data["vm"], network=data["network"],
                   ports=[GuestPortOut.from_json(p) for p in data["ports"]])


@dataclass
class FilesystemOut(_Record):
    mountpoint: str  # the guest's text: printable() before a terminal
    size_bytes: int
    used_bytes: int
    avail_bytes: int


@dataclass
class GuestStatsOut(_Record):
    uptime_ms: int
    load1: float
    load5: float
    load15: float
    mem_total_kib: int
    mem_available_kib: int
    ncpu: int
    cpu_user_ticks: int
    cpu_system_ticks: int
    cpu_idle_ticks: int
    cpu_percent: float | None
    filesystems: list[FilesystemOut]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GuestStatsOut:
        known = _known(cls, data)
        known["filesystems"] = [FilesystemOut.from_json(f) for f in data["filesystems"]]
        return cls(**known)


@dataclass
class VmmUsageOut(_Record):
    pid: int
    rss_bytes: int
    cpu_seconds: float
    cpu_percent: float | None


@dataclass
class VMStatsOut(_Record):
    vm: str
    interval: float
    guest: GuestStatsOut
    vmm: VmmUsageOut | None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VMStatsOut:
        return cls(vm=data["vm"], interval=data["interval"],
                   guest=GuestStatsOut.from_json(data["guest"]),
                   vmm=_opt(VmmUsageOut, data.get("vmm")))


@dataclass
class SshConfig(_Record):
    path: str
    text: str


@dataclass
class FilesPut(_Record):
    """An upload's answer: the guest directory the tar went into, and its size."""

    path: str
    bytes: int


@dataclass
class OperationOut(_Record):
    id: str
    kind: str
    vm_id: str | None
    vm_name: str | None
    started_at: float
    stage: str | None
    cancelled: bool = False


@dataclass
class Check(_Record):
    name: str
    status: str
    detail: str


@dataclass
class Doctor(_Record):
    checks: list[Check]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Doctor:
        return cls([Check.from_json(c) for c in data["checks"]])


class WorkspaceBody(TypedDict, total=False):
    path: str
    include_untracked: bool
    branch: str | None
    from_ref: str | None
    bootstrap: bool


class CreateBody(TypedDict, total=False):
    name: str | None
    image: str
    vcpus: int
    memory_mib: int
    disk_mib: int
    network: str | None
    nat: bool
    kernel: str
    start: bool
    workspace: WorkspaceBody | None
    delete_on_disconnect: bool


class SetBody(TypedDict, total=False):
    vcpus: int
    memory_mib: int
    disk_mib: int


@dataclass
class ImageOut(_Record):
    name: str
    kind: str
    built: bool
    source: str = ""
    digest: str = ""
    size_bytes: int = 0
    env: list[str] = field(default_factory=list)
    workdir: str = ""
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    user: str = ""


@dataclass
class ImageProgress(_Record):
    type: str
    message: str | None = None
    image: ImageOut | None = None
    error: ErrorBody | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ImageProgress:
        known = _known(cls, data)
        known["image"] = _opt(ImageOut, known.get("image"))
        known["error"] = _opt(ErrorBody, known.get("error"))
        return cls(**known)
