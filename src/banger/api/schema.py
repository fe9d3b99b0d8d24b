"""Wire schema shared by daemon and client: request/response models, progress, errors.

The daemon's OpenAPI document is generated from these models, so the schema cannot drift
from the code. Bump API_VERSION on incompatible changes; the path prefix carries it.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool

from banger.api.wire import API_VERSION
from banger.model.events import EventKind
from banger.model.images import IMAGE_NAME_PATTERN
from banger.model.vm import (
    MAX_MEMORY_MIB,
    MAX_VCPUS,
    MAX_WORK_DISK_MIB,
    MIN_MEMORY_MIB,
    MIN_VCPUS,
    MIN_WORK_DISK_MIB,
    NAME_PATTERN,
    KernelKind,
    NetworkMode,
    VMSpec,
    VMState,
)


class ErrorBody(BaseModel):
    code: str
    message: str
    stage: str | None = None
    op_id: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class Health(BaseModel):
    version: str
    api: str = API_VERSION
    pid: int


# Names, patterns, bounds, defaults and choices come from banger.model.vm: the OpenAPI
# document cannot drift from the rules the daemon applies (tests/unit/test_wire_schema.py).
_DEFAULT = VMSpec()


def _not_bool(value: object) -> object:
    if isinstance(value, bool):
        raise ValueError("must be a number, not true or false")
    return value


# JSON true is not the number 1 (the published schema says integer; 2.0 is one).
NotBool = BeforeValidator(_not_bool)
Vcpus = Annotated[int, Field(ge=MIN_VCPUS, le=MAX_VCPUS), NotBool]
MemoryMib = Annotated[int, Field(ge=MIN_MEMORY_MIB, le=MAX_MEMORY_MIB), NotBool]
DiskMib = Annotated[int, Field(ge=MIN_WORK_DISK_MIB, le=MAX_WORK_DISK_MIB), NotBool]


class WorkspaceIn(BaseModel):
    """A host git repo copied to /root/repo (the daemon reads it as the calling user)."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, description="absolute path inside a git work tree")
    include_untracked: StrictBool = False
    branch: str | None = Field(default=None, min_length=1)
    from_ref: str | None = Field(default=None, min_length=1)
    bootstrap: StrictBool = Field(default=True, description=(
        "install the tools .mise.toml/.tool-versions pin, in the guest's background "
        "(needs nat)"))


class DryRun(BaseModel):
    lines: list[str]


class VMCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(pattern=NAME_PATTERN)] | None = None
    image: str = _DEFAULT.image
    vcpus: Vcpus = _DEFAULT.vcpus
    memory_mib: MemoryMib = _DEFAULT.memory_mib
    disk_mib: DiskMib = _DEFAULT.work_disk_mib
    network: NetworkMode | None = Field(default=None, description=(
        "user: rootless, ssh via a forwarded loopback port; tap: bridge, own address, "
        "<name>.vm (root daemon). None: the daemon's [network] mode"))
    nat: StrictBool = _DEFAULT.nat
    kernel: KernelKind = Field(default=_DEFAULT.kernel, description=(
        "microvm: banger's kernel, drivers built in, no initramfs (fast); cloud: Debian's "
        "cloud kernel with a busybox initramfs (the fallback)"))
    start: StrictBool = True
    workspace: WorkspaceIn | None = None
    delete_on_disconnect: StrictBool = Field(default=False, description=(
        "ephemeral (`vm run --rm`): when the client of the streamed create goes away, the "
        "daemon cancels the create and deletes the VM once the operation has stopped. "
        "Without it, a streamed create or start whose client goes away is cancelled and "
        "rolled back, and the VM is kept, stopped"))


class VMSet(BaseModel):
    model_config = ConfigDict(extra="forbid")

    vcpus: Vcpus | None = None
    memory_mib: MemoryMib | None = None
    disk_mib: DiskMib | None = None


class Runtime(BaseModel):
    pid: int
    ssh_port: int | None
    ssh_host: str = "127.0.0.1"
    tap: str | None = None
    accel: str
    accel_reason: str
    vmm: str
    boot_id: str
    started_at: float


class VMOut(BaseModel):
    id: str
    name: str
    state: VMState
    image: str
    vcpus: int
    memory_mib: int
    disk_mib: int
    network: NetworkMode
    nat: bool
    kernel: KernelKind
    created_at: float
    updated_at: float
    last_error: str | None = None
    last_error_stage: str | None = None
    last_op_id: str | None = None
    boot_id: str | None = None
    guest_ip: str | None = None
    dir: str
    serial_log: str
    workspace_path: str | None = None
    workspace_guest_path: str | None = None
    workspace_head: str | None = None
    runtime: Runtime | None = None


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    refs: list[str] = Field(min_length=1)
    signal: Annotated[int, Field(ge=1, le=64), NotBool] | None = None


class BatchItem(BaseModel):
    ref: str
    vm: VMOut | None = None
    error: ErrorBody | None = None


class BatchResponse(BaseModel):
    results: list[BatchItem]


class ProgressEvent(BaseModel):
    """One line of an NDJSON progress stream.

    ``type`` is "progress" for stage events (``kind``: a step's run, ok, failed, undo,
    undone or undo_failed; detail, a line of news from inside a stage; or queued, waiting
    for a boot slot, ``label`` saying its place in line: banger.model.events), "heartbeat"
    (no content: sent every HEARTBEAT_SECONDS while nothing else is, so a client may give
    up after STREAM_SILENCE_LIMIT seconds of silence), then
    exactly one final "result" (with ``vm``) or "error" (with ``error``; code
    "cancelled" after a cancel, the rollback reported by the progress lines before it).
    """

    type: Literal["progress", "heartbeat", "result", "error"]
    op_id: str | None = None
    vm: str | None = None
    kind: EventKind | None = None
    stage: str | None = None
    label: str | None = None
    elapsed: float | None = None
    message: str | None = None
    result: VMOut | None = None
    error: ErrorBody | None = None


class Logs(BaseModel):
    serial_log: str
    serial: str  # the end of the serial log (reaching back into the rotated file)
    vmm_log: str
    vmm: str
    # The serial log's older output, when it was rotated past its cap.
    serial_rotated: str | None = None


class LogEvent(BaseModel):
    """One line of a log stream (`GET /vms/{ref}/logs/stream`, NDJSON).

    ``type`` is "data" (``data``: the log's next bytes, base64: a guest writes any bytes,
    and a chunk may end inside a UTF-8 sequence), "skipped" (``count`` bytes, or an
    unknown number when null, were rotated away before the stream read them: the guest
    wrote faster than the client read), "heartbeat" (every HEARTBEAT_SECONDS while
    nothing else is sent), then one final "end" (``reason``: "stopped", the VM is not
    running and what it wrote has been sent; "daemon_stopping"; or "done", a stream that
    did not follow).
    """

    type: Literal["data", "skipped", "heartbeat", "end"]
    data: str | None = None
    count: int | None = None
    reason: Literal["stopped", "daemon_stopping", "done"] | None = None


class SshTarget(BaseModel):
    host: str
    port: int
    user: str
    key: str
    known_hosts: str
    alias: str
    vm: str
    workdir: str | None = None
    argv: list[str] = Field(description="ssh argv up to and including the destination")


class GuestPortOut(BaseModel):
    """A socket listening in the guest and where the host reaches it."""

    proto: Literal["tcp", "udp"]
    address: str = Field(description='bound address ("0.0.0.0", "::", "127.0.0.1"; "*" is '
                                     "the dual-stack wildcard)")
    port: int = Field(ge=0, le=65535)
    process: str | None = Field(default=None, description="owning process names")
    endpoint: str | None = Field(default=None, description=(
        "host:port the host reaches it at (<name>.vm:<port> in tap networking, the "
        "forwarded 127.0.0.1 port for ssh in user networking); null when it is not "
        "reachable from the host"))
    note: str | None = Field(default=None, description="why not reachable, or how it is")


class VMPorts(BaseModel):
    vm: str
    network: str
    ports: list[GuestPortOut]

class FilesystemOut(BaseModel):
    """A mounted disk filesystem of the guest (ext4, xfs, btrfs, vfat, ...)."""

    mountpoint: str = Field(description="the guest's text: escape it before a terminal")
    size_bytes: int = Field(ge=0)
    used_bytes: int = Field(ge=0)
    avail_bytes: int = Field(ge=0, description="available to unprivileged users")


class GuestStatsOut(BaseModel):
    """The guest's own numbers, from its agent (the second of two samples)."""

    uptime_ms: int
    load1: float
    load5: float
    load15: float
    mem_total_kib: int
    mem_available_kib: int
    ncpu: int
    cpu_user_ticks: int = Field(description="cumulative since boot, all CPUs (USER_HZ)")
    cpu_system_ticks: int
    cpu_idle_ticks: int
    cpu_percent: float | None = Field(description=(
        "busy share (user + system) of all the guest's CPUs between the two samples, "
        "0..100; null when no tick passed"))
    filesystems: list[FilesystemOut]


class VmmUsageOut(BaseModel):
    """What the VM's VMM process costs the host."""

    pid: int
    rss_bytes: int = Field(ge=0, description="resident memory (VmRSS)")
    cpu_seconds: float = Field(ge=0, description="user + system CPU time since it started")
    cpu_percent: float | None = Field(description=(
        "its CPU time between the two samples over the wall time, as top shows it "
        "(100 = one host core)"))


class VMStatsOut(BaseModel):
    vm: str
    interval: float = Field(description="seconds between the two samples")
    guest: GuestStatsOut
    vmm: VmmUsageOut | None = Field(description="null when the process could not be read")


class SshConfig(BaseModel):
    """banger's own ssh_config: where the daemon keeps it and what it holds now."""

    path: str = Field(description="absolute path; ~/.ssh/config Includes it")
    text: str


class OperationOut(BaseModel):
    id: str
    kind: str
    vm_id: str | None
    vm_name: str | None
    started_at: float
    stage: str | None
    cancelled: bool = False


class Check(BaseModel):
    name: str
    status: Literal["pass", "warn", "fail"]
    detail: str


class Doctor(BaseModel):
    checks: list[Check]


class ImageOut(BaseModel):
    """An image: ``kind`` "built-in" (built on first use) or "oci" (pulled or imported),
    with its OCI config's Env, WorkingDir, Entrypoint, Cmd and User."""

    name: str
    kind: Literal["built-in", "oci"]
    built: bool
    source: str = ""
    digest: str = ""
    size_bytes: int = 0
    env: list[str] = []
    workdir: str = ""
    entrypoint: list[str] = []
    cmd: list[str] = []
    user: str = ""


class ImagePull(BaseModel):
    """``ref``: a registry reference (``docker.io/library/busybox:1.36``; TLS verified
    except on loopback). ``name``: the image's name (default: from the reference)."""

    model_config = ConfigDict(extra="forbid")
    ref: str = Field(min_length=1, max_length=4096)
    name: str | None = Field(default=None, pattern=IMAGE_NAME_PATTERN)


class ImageImport(BaseModel):
    """``path``: an absolute path on the daemon's host: a ``docker save`` tar, an OCI
    archive or an OCI layout directory."""

    model_config = ConfigDict(extra="forbid")
    path: str = Field(min_length=1, max_length=4096, pattern=r"^/")
    name: str | None = Field(default=None, pattern=IMAGE_NAME_PATTERN)


class ImageProgress(BaseModel):
    """One line of an image pull's NDJSON stream: "progress" (``message``), "heartbeat",
    then exactly one "result" (``image``) or "error" (``error``)."""

    type: Literal["progress", "heartbeat", "result", "error"]
    message: str | None = None
    image: ImageOut | None = None
    error: ErrorBody | None = None
