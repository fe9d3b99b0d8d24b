"""The small protocols through which use cases reach the host.

Production adapters live in ``banger.host`` and are composed in ``banger.daemon.wiring``;
unit tests use the stateful fakes in ``tests/fakes.py``. Every method is idempotent where
it releases something: "already gone" is success.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path
from typing import Literal, Protocol

from banger.model.config import FileSync
from banger.ports.images import ImageInfo as ImageInfo
from banger.ports.images import ImagePort as ImagePort
from banger.ports.images import ImageRecord as ImageRecord


class DiskPort(Protocol):
    def create_overlay(self, base: Path, overlay: Path) -> None: ...

    def backing_of(self, overlay: Path) -> Path | None:
        """The base file ``overlay`` was made over (None: no overlay, or none recorded)."""

    def build_work_disk(self, path: Path, size_bytes: int,
                        files: Mapping[str, tuple[bytes, int]],
                        trees: Mapping[str, Path] | None = None) -> None:
        """ext4 at ``path`` holding ``files`` and the staged ``trees`` (moved in)."""


@dataclass(frozen=True)
class WorkspaceRequest:
    """A host repo to put at /root/<name> in the guest (``banger vm run ./repo``)."""

    path: Path
    include_untracked: bool = False
    branch: str | None = None
    from_ref: str | None = None
    bootstrap: bool = True  # install the tools the repo pins (.mise.toml, .tool-versions)


@dataclass(frozen=True)
class WorkspaceSelection:
    request: WorkspaceRequest
    repo: Path          # the work tree's top level
    files: int
    total_bytes: int
    handle: object      # the adapter's own selection record
    tool_files: tuple[str, ...] = ()  # .mise.toml / .tool-versions at the top, if selected
    head: str | None = None           # the repo's HEAD commit (None before the first commit)


class WorkspacePort(Protocol):
    def select(self, req: WorkspaceRequest) -> WorkspaceSelection:
        """Read the repo; raise InvalidRequest naming the path and the fix if it cannot be
        copied exactly (not a git work tree, submodules, unsafe names)."""

    def dry_run(self, req: WorkspaceRequest) -> list[str]: ...

    def staged(self, sel: WorkspaceSelection,
               scratch: Path) -> AbstractContextManager[Path]:
        """A staged git checkout of ``sel``, removed on exit if still there."""


# --- the VMM driver ----------------------------------------------------------------------
# Core hands a driver a VM's resources and gets handles back; the driver builds its own
# command line, kernel arguments and control-socket calls (QMP for QEMU; a Firecracker
# driver would make its API calls from the same records).


@dataclass(frozen=True)
class Accel:
    accel: str  # "kvm" | "tcg"
    reason: str


@dataclass(frozen=True)
class BootSource:
    """What the guest boots. ``cmdline``: the image's own kernel arguments (they name its
    init); the driver puts its own, the network's and the guest settings' before them.
    ``initrd``: None for a kernel with its drivers built in (it mounts /dev/vda itself)."""

    kernel: Path
    initrd: Path | None
    cmdline: str = ""


@dataclass(frozen=True)
class Drive:
    """A disk file the guest writes. ``backing``: the read-only base image under a
    copy-on-write overlay, named by core (never read from the overlay's header, which the
    VMM can write); None: the file stands alone."""

    path: Path
    backing: Path | None = None


@dataclass(frozen=True)
class UserNet:
    """Rootless user-mode networking: no host device; sshd is reached through a forwarded
    loopback port. Without ``outbound`` the guest reaches nothing outside."""

    ssh_port: int
    outbound: bool = False


@dataclass(frozen=True)
class TapNet:
    """A host tap (it exists, on the bridge) and the guest's static addressing, which the
    guest's init sets. ``outbound``: the host NATs the guest (firewall rules, not VMM)."""

    tap: str
    mac: str
    address: IPv4Interface  # the guest's address and prefix
    gateway: IPv4Address
    resolver: IPv4Address
    outbound: bool = False


NetAttachment = UserNet | TapNet


@dataclass(frozen=True)
class GuestSettings:
    """What the guest is told about itself at boot."""

    hostname: str


@dataclass(frozen=True)
class Snapshot:
    """A saved VM to resume instead of booting: its device state and memory (the disks are
    the launch's own)."""

    state: Path
    memory: Path


@dataclass(frozen=True)
class LaunchSpec:
    """Everything a driver needs to run one VM."""

    vm_id: str
    boot: BootSource
    root: Drive  # the guest's root disk (first disk)
    work: Drive  # the work disk, mounted at /root (second disk)
    vcpus: int
    memory_mib: int
    net: NetAttachment
    guest: GuestSettings
    serial_log: Path      # the guest's console
    vmm_log: Path         # the VMM's own output
    runtime_dir: Path     # the VM's private runtime directory (sockets)
    control_socket: Path  # where the VMM's control socket goes (in runtime_dir)
    restore: Snapshot | None = None  # resume this instead of booting


@dataclass(frozen=True)
class Launched:
    """What a launch gives back (the core keeps it in the VM's handles)."""

    pid: int
    control_socket: Path
    accel: Accel           # what the VMM runs under
    agent: Path | None = None  # the host end of the guest agent's channel, if any


@dataclass(frozen=True)
class Rediscovered:
    pid: int
    ssh_port: int | None
    agent: Path | None = None  # the guest agent's channel, if the VMM serves one


class VmmPort(Protocol):
    name: str

    def accel(self) -> Accel: ...

    def free_port(self) -> int:
        """A loopback port for a user-networking VM's ssh forward, handed out once."""

    def launch(self, spec: LaunchSpec) -> Launched:
        """Start the VMM detached from the daemon; return once its control socket
        answers."""

    def alive(self, pid: int, control_socket: Path) -> bool:
        """True when ``pid`` is running and is the VMM of that socket (never a recycled pid)."""

    def stuck(self, control_socket: Path) -> str | None:
        """Why a running VMM can never make progress (e.g. "internal-error"), else None."""

    def quit(self, control_socket: Path) -> bool:
        """Ask the VMM to exit now (no guest shutdown); True if it accepted."""

    def kill(self, pid: int, sig: int) -> None: ...

    def wait_exit(self, pid: int, timeout: float) -> bool: ...

    def rediscover(self, control_socket: Path) -> Rediscovered | None:
        """Find a live VMM from its socket path alone (handles file lost or corrupt)."""

    def usage(self, pid: int) -> VmmUsage | None:
        """The VMM process's resident memory and CPU time so far; None once it is gone."""


@dataclass(frozen=True)
class VmmUsage:
    """What a VMM process costs the host (``/proc/<pid>``)."""

    rss_bytes: int
    cpu_seconds: float  # user + system time since it started


@dataclass(frozen=True)
class Endpoint:
    """Where a guest's sshd is reached from the host: a forwarded loopback port (user
    networking) or the guest's own address (tap)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ListeningSocket:
    """A socket listening in a guest (TCP) or bound and unconnected (UDP), as ``ss`` shows
    it: ``address`` is the bound address without scope or brackets ("0.0.0.0", "::",
    "127.0.0.1"), or "*" for a dual-stack wildcard (IPv6 any with IPV6_V6ONLY off)."""

    proto: Literal["tcp", "udp"]
    address: str
    port: int
    process: str | None = None  # the owning process names, comma-separated


class GuestPort(Protocol):
    """What is about sshd, for people (``vm ssh``, ``ssh <name>.vm``): banger's key, the
    guests' host keys, sshd's readiness; and the host user's git identity."""

    def ensure_key(self) -> str:
        """The managed public key (created on first use)."""

    def wait_ready(self, *, addr: Endpoint, alias: str, timeout: float, serial_log: Path,
                   alive: Callable[[], bool]) -> float:
        """Wait until sshd at ``addr`` takes banger's key; the seconds waited. A timeout
        or ``alive()`` False raise an error carrying the serial log's last lines."""

    def new_host_key(self) -> tuple[bytes, str]:
        """A fresh guest host key: (private key file bytes, public key line)."""

    def trust_host(self, alias: str, public_key: str) -> None:
        """Pin ``public_key`` for ``alias``: the first connection is verified, not TOFU."""

    def forget_host(self, alias: str) -> None: ...

    def git_identity(self) -> dict[str, str]:
        """The host user's git identity ({"user.name": ..., "user.email": ...}, as set)."""


@dataclass(frozen=True)
class AgentHello:
    """The guest agent's greeting: the guest booted, its agent runs, the channel works."""

    boot_id: str  # the guest kernel's boot id (/proc/sys/kernel/random/boot_id)
    version: str  # the agent's version


@dataclass(frozen=True)
class GuestFilesystem:
    mountpoint: str  # guest text: escape it before a terminal
    size_bytes: int
    used_bytes: int
    avail_bytes: int


@dataclass(frozen=True)
class GuestStats:
    """One sample of a guest's own numbers, from its agent. CPU ticks are cumulative
    (all CPUs, USER_HZ): a CPU share needs two samples."""

    uptime_ms: int
    load1: float
    load5: float
    load15: float
    mem_total_kib: int
    mem_available_kib: int
    cpu_user_ticks: int
    cpu_system_ticks: int
    cpu_idle_ticks: int
    ncpu: int
    filesystems: tuple[GuestFilesystem, ...] = ()


@dataclass(frozen=True)
class ExecRequest:
    """A command to run in the guest through its agent: ``argv`` is executed as is (no
    shell), ``env`` is its whole environment, ``pty`` its window size or None (pipes)."""

    argv: tuple[str, ...]
    env: Mapping[str, str]
    cwd: str = "/"
    pty: tuple[int, int] | None = None  # (rows, cols)


@dataclass(frozen=True)
class ExecOutput:
    """A piece of a command's output, as the guest sent it (raw bytes: the user's own)."""

    stream: Literal["stdout", "stderr"]
    data: bytes


@dataclass(frozen=True)
class ExecExit:
    """How a command ended: exactly one of ``code`` and ``signal``."""

    code: int | None = None
    signal: int | None = None

    @property
    def returncode(self) -> int:
        """The exit code, or 128 + n for signal n (the shell's convention)."""
        return self.code if self.code is not None else 128 + (self.signal or 0)


class GuestExec(Protocol):
    """One command running in a guest (``AgentPort.exec``). Thread-safe: one thread reads
    its output while others write its stdin or signal it. Every method raises
    OperationFailed with the reason once the command can no longer be reached (the
    agent's connection dropped, the VM was stopped)."""

    def next(self, timeout: float) -> ExecOutput | ExecExit | None:
        """The next piece of output, or the exit once all output was read; None when
        nothing came within ``timeout`` seconds. Until it is called the guest waits
        (backpressure: nothing is buffered past a few MiB)."""

    def write_stdin(self, data: bytes) -> None: ...

    def close_stdin(self) -> None:
        """End of the command's stdin (with a pty: the terminal's EOF character)."""

    def signal(self, signo: int) -> None:
        """Send ``signo`` to the command (its process group with a pty); a no-op once it
        ended."""

    def resize(self, rows: int, cols: int) -> None: ...

    def abandon(self) -> None:
        """Nobody listens any more (the client went away): SIGHUP now and SIGKILL a moment
        later unless it ended; returns at once."""


class AgentPort(Protocol):
    """The guest agent (``banger-agent``) over the channel a VMM driver serves
    (``Launched.agent``). The adapter keeps one connection per running VM: the one that
    got the HELLO at start serves later calls; a dropped one is replaced on next use."""

    def stats(self, *, channel: Path, timeout: float) -> GuestStats:
        """One STATS sample; a guest that does not answer within ``timeout`` (or breaks
        the protocol) raises OperationFailed naming the channel."""

    def wait_hello(self, *, channel: Path, timeout: float, serial_log: Path,
                   alive: Callable[[], bool]) -> AgentHello:
        """Connect to the agent's channel and wait for its HELLO, polling ``alive()``
        throughout (False: the VMM is gone; it may raise to end the wait, e.g. a cancel).
        A dead VMM or the timeout raise an error carrying the serial log's last lines.
        The connection stays open for the calls that follow."""

    def exec(self, *, channel: Path, request: ExecRequest, timeout: float) -> GuestExec:
        """Start ``request`` in the guest; returns once it runs. A command the guest cannot
        start (no such file), or an agent that does not answer within ``timeout``, raises
        OperationFailed naming it."""

    def push_tree(self, *, channel: Path, tree: Path, guest_path: str) -> None:
        """Replace ``guest_path`` in the guest with the contents of ``tree`` (owned by
        root); a push that fails leaves the old tree in place."""

    def sync_files(self, *, channel: Path, entries: Sequence[FileSync],
                   identity: Mapping[str, str] | None) -> list[str]:
        """Copy ``[[file_sync]]`` entries (with their modes) and, if given, set the git
        identity in the guest; return warnings (a missing host file, no git in the
        guest); raise OperationFailed on anything else."""

    def start_bootstrap(self, *, channel: Path, workdir: str, installer_url: str) -> str:
        """Start the tool installer for ``workdir`` detached in the guest (it outlives the
        agent's session); return the guest path of its log."""

    def listening(self, *, channel: Path) -> list[ListeningSocket]:
        """The guest's listening TCP and UDP sockets, each (proto, address, port) once."""

    def poweroff(self, *, channel: Path, timeout: float) -> None:
        """Ask the guest to sync and power off; returns once the agent accepted (the VMM
        then exits)."""

    # --- files (`vm cp`): tar streams through the kept session ---------------------------

    def put_files(self, *, channel: Path, dest: str, source: Iterable[bytes],
                  timeout: float) -> int:
        """Extract the tar stream ``source`` into the guest directory ``dest`` (made
        with its parents if missing); the bytes sent. ``timeout`` bounds each wait (for
        the guest's credit, its answer), not the transfer. An agent without the "files"
        feature raises ConflictError; the guest's refusal (an entry it will not write)
        InvalidRequest; a lost agent OperationFailed. An error raised by ``source`` ends
        the put (the guest refuses the truncated tar) and propagates."""

    def get_files(self, *, channel: Path, path: str,
                  timeout: float) -> Generator[bytes, None, None]:
        """A tar of the guest's ``path`` (a file, or a directory recursively; a symlink
        at the top is followed, none below), in chunks of at most 64 KiB as the guest
        sends them; ``timeout`` bounds each wait. The first chunk is fetched before this
        returns, so a missing path raises here (InvalidRequest). Closing the generator
        cancels the transfer; a failure part way raises from the iteration."""

    def release(self, *, channel: Path) -> None:
        """Close the connection to ``channel``'s agent (the VM's runtime is released): its
        execs end with an error saying so. Idempotent."""

    def close(self) -> None:
        """Close every agent connection (the daemon stops; the guests' agents hang up the
        execs of their sessions)."""


class NetPort(Protocol):
    """Host networking for tap mode: bridge, taps, NAT (all idempotent; "already gone" is
    success)."""

    def unavailable(self) -> str | None:
        """Why tap networking cannot work on this host (e.g. not root), or None."""

    def ensure_bridge(self, name: str, gateway: IPv4Interface) -> bool:
        """Create the bridge (ours) if missing; True when created. Refuses a bridge of that
        name banger does not own."""

    def create_tap(self, name: str, bridge: str) -> bool:
        """True when this call created it."""

    def delete_tap(self, name: str) -> bool: ...

    def taps(self) -> list[str]:
        """The taps banger owns (to find leftovers)."""

    def add_nat(self, vm_id: str, guest_ip: IPv4Address, bridge: str) -> list[str]:
        """Masquerade and forward rules tagged with ``vm_id`` (ip_forward turned on if
        off); returns lines saying what was done (for progress and doctor)."""

    def remove_nat(self, vm_id: str) -> int: ...

    def nat_vm_ids(self) -> set[str]: ...


@dataclass
class HostPorts:
    images: ImagePort
    disks: DiskPort
    vmm: VmmPort
    guest: GuestPort
    workspace: WorkspacePort
    net: NetPort
    agent: AgentPort
