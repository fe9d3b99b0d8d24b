"""Stateful fakes behind the core ports, for unit tests only.

Each has a real counterpart in banger.host that the e2e tier exercises. The fakes keep
their own "OS" (processes, files) so leak checks look at that state, not at the database.
"""

from __future__ import annotations

import contextlib
import itertools
import shutil
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path

from banger.core.operations import Operations
from banger.core.service import VMService
from banger.model.config import Config, FileSync
from banger.model.errors import InvalidRequest, OperationFailed
from banger.model.layout import Layout
from banger.ports import (
    Accel,
    AgentHello,
    Endpoint,
    ExecRequest,
    GuestFilesystem,
    GuestStats,
    HostPorts,
    ImageInfo,
    ImageRecord,
    Launched,
    LaunchSpec,
    ListeningSocket,
    Rediscovered,
    UserNet,
    VmmUsage,
    WorkspaceRequest,
    WorkspaceSelection,
)
from banger.store.db import Database
from banger.store.vms import OperationLog, VMRepository
from tests.fake_exec import KNOWN, FakeExec, command
from tests.fake_files import FakeGuestFiles


class FakeImages:
    def __init__(self, root: Path, *, built: bool = True) -> None:
        self.root = root
        self.built = built
        self.builds = 0
        self.pulled: dict[str, ImageRecord] = {}

    def known(self) -> list[str]:
        return ["debian-bookworm", *self.pulled]

    def _info(self) -> ImageInfo:
        d = self.root / "images" / "debian-bookworm"
        return ImageInfo("debian-bookworm", d / "rootfs.ext4", d / "vmlinux", d / "initrd.img",
                         "init=/sbin/banger-init", microvm_kernel=d / "vmlinux-microvm")

    def get(self, name: str) -> ImageInfo | None:
        return self._info() if self.built else None

    def describe(self, name: str) -> ImageRecord | None:
        if name in self.pulled:
            return self.pulled[name]
        return ImageRecord(name, "built-in", self.built) if name in self.known() else None

    def records(self) -> list[ImageRecord]:
        return [r for n in self.known() if (r := self.describe(n)) is not None]

    def pull(self, ref: str, name: str, *, archive: bool,
             on_progress: Callable[[str], None]) -> ImageRecord:
        on_progress(f"pulling {ref}")
        self.pulled[name] = ImageRecord(name, "oci", True, source=ref)
        return self.pulled[name]

    def build(self, name: str, on_progress: Callable[[str], None]) -> ImageInfo:
        on_progress("building fake image")
        info = self._info()
        info.rootfs.parent.mkdir(parents=True, exist_ok=True)
        assert info.microvm_kernel is not None
        for p in (info.rootfs, info.kernel, info.initrd, info.microvm_kernel):
            p.write_bytes(b"x")
        self.built = True
        self.builds += 1
        return info


class FakeDisks:
    def __init__(self) -> None:
        self.fail_overlay = False
        self.work_files: dict[Path, Mapping[str, tuple[bytes, int]]] = {}
        self.work_trees: dict[Path, tuple[str, list[str]]] = {}

    def create_overlay(self, base: Path, overlay: Path) -> None:
        overlay.write_bytes(b"qcow2 over " + str(base).encode())
        if self.fail_overlay:
            raise OSError("overlay: disk full")

    def backing_of(self, overlay: Path) -> Path | None:
        try:
            data = overlay.read_bytes()
        except OSError:
            return None
        prefix = b"qcow2 over "
        return Path(data[len(prefix):].decode()) if data.startswith(prefix) else None

    def build_work_disk(self, path: Path, size_bytes: int,
                        files: Mapping[str, tuple[bytes, int]],
                        trees: Mapping[str, Path] | None = None) -> None:
        path.write_bytes(b"ext4")
        self.work_files[path] = dict(files)
        for name, tree in (trees or {}).items():
            self.work_trees[path] = (name, sorted(p.name for p in tree.iterdir()))


class FakeWorkspace:
    """Repos are plain directories; anything without a .git is refused."""

    def __init__(self) -> None:
        self.staged_dirs: list[Path] = []
        self.selected: list[WorkspaceRequest] = []  # every read of a repo, in order

    def select(self, req: WorkspaceRequest) -> WorkspaceSelection:
        self.selected.append(req)
        if not (req.path / ".git").exists():
            raise InvalidRequest(f"{req.path} is not inside a git work tree")
        files = [p for p in req.path.iterdir() if p.name != ".git"]
        tools = tuple(n for n in (".mise.toml", "mise.toml", ".tool-versions")
                      if (req.path / n).is_file())
        return WorkspaceSelection(req, req.path, len(files),
                                  sum(p.stat().st_size for p in files), handle=files,
                                  tool_files=tools)

    def dry_run(self, req: WorkspaceRequest) -> list[str]:
        sel = self.select(req)
        return [*(p.name for p in sel.handle), f"{sel.files} files"]  # type: ignore[attr-defined]

    @contextlib.contextmanager
    def staged(self, sel: WorkspaceSelection, scratch: Path) -> Iterator[Path]:
        tree = scratch / ".staged-repo"
        shutil.copytree(sel.repo, tree)
        self.staged_dirs.append(tree)
        try:
            yield tree
        finally:
            shutil.rmtree(tree, ignore_errors=True)


@dataclass
class FakeProc:
    pid: int
    spec: LaunchSpec
    signals: list[int] = field(default_factory=list)
    cpu_looks: int = 0  # FakeVmm.usage calls
    stats_samples: int = 0  # FakeAgent.stats calls

    @property
    def ssh(self) -> Endpoint:
        """Where its guest's sshd answers: the forwarded port, or the tap address."""
        net = self.spec.net
        if isinstance(net, UserNet):
            return Endpoint("127.0.0.1", net.ssh_port)
        return Endpoint(str(net.address.ip), 22)


class FakeVmm:
    name = "qemu"

    def __init__(self) -> None:
        self.procs: dict[int, FakeProc] = {}
        self._pids = itertools.count(1000)
        self._ports = itertools.count(40000)
        self.launch_error: Exception | None = None
        self.die_on_launch = False
        self.ignore_quit = False
        self.launched: list[LaunchSpec] = []
        self.quits = 0
        self.stuck_status: str | None = None
        # A VMM that outlives every signal (stuck in the kernel): kill() changes nothing.
        self.unkillable = False

    def accel(self) -> Accel:
        return Accel("tcg", "fake")

    def free_port(self) -> int:
        return next(self._ports)

    def launch(self, spec: LaunchSpec) -> Launched:
        if self.launch_error is not None:
            raise self.launch_error
        pid = next(self._pids)
        spec.control_socket.parent.mkdir(parents=True, exist_ok=True)
        spec.control_socket.write_text("sock")
        agent = spec.runtime_dir / "agent.sock"
        agent.write_text("sock")
        self.launched.append(spec)
        if not self.die_on_launch:
            self.procs[pid] = FakeProc(pid, spec)
        return Launched(pid, spec.control_socket, self.accel(), agent=agent)

    def alive(self, pid: int, control_socket: Path) -> bool:
        p = self.procs.get(pid)
        return p is not None and p.spec.control_socket == control_socket

    def stuck(self, control_socket: Path) -> str | None:
        return self.stuck_status

    def quit(self, control_socket: Path) -> bool:
        self.quits += 1
        if self.ignore_quit:
            return False
        for pid, p in list(self.procs.items()):
            if p.spec.control_socket == control_socket:
                del self.procs[pid]
                return True
        return False

    def kill(self, pid: int, sig: int) -> None:
        if self.unkillable:
            return
        p = self.procs.pop(pid, None)
        if p is not None:
            p.signals.append(sig)

    def wait_exit(self, pid: int, timeout: float) -> bool:
        return pid not in self.procs

    def usage(self, pid: int) -> VmmUsage | None:
        """64 MiB resident; 0.1 s of CPU more at each look."""
        p = self.procs.get(pid)
        if p is None:
            return None
        p.cpu_looks += 1
        return VmmUsage(rss_bytes=64 << 20, cpu_seconds=p.cpu_looks / 10)

    def rediscover(self, control_socket: Path) -> Rediscovered | None:
        for p in self.procs.values():
            if p.spec.control_socket == control_socket:
                port = p.spec.net.ssh_port if isinstance(p.spec.net, UserNet) else None
                return Rediscovered(p.pid, port, agent=p.spec.runtime_dir / "agent.sock")
        return None


class FakeAgent:
    """The guest agents of the FakeVmm's VMs: each says HELLO (after ``hello_delay``,
    polling alive() as the real wait does) with a boot id of its own per launch."""

    def __init__(self, vmm: FakeVmm) -> None:
        self.vmm = vmm
        self.hello_delay = 0.0
        self.hello_error: Exception | None = None
        self.waits: list[Path] = []
        self.stats_error: Exception | None = None
        self.mounts: tuple[GuestFilesystem, ...] = ()  # more than "/" in stats
        # Called on each poll of the wait (a test kills the VMM mid-wait with it).
        self.on_poll: Callable[[], None] = lambda: None
        # Every exec started, by channel (the real adapter keeps one connection each).
        self.execs: dict[Path, list[FakeExec]] = {}
        self.released: list[Path] = []
        self.files = FakeGuestFiles()  # each VM's guest filesystem (tests/fake_files.py)
        # banger's own calls, by channel: workspace pushes (with the tree's top names),
        # file syncs, git identities sent, bootstraps, socket listings.
        self.pushed: list[tuple[Path, str, list[str]]] = []
        self.push_error: Exception | None = None
        self.synced: list[tuple[Path, list[FileSync]]] = []
        self.identity_sent: list[dict[str, str] | None] = []
        self.bootstraps: list[tuple[Path, str, str]] = []
        self.listening_asked: list[Path] = []
        self.poweroff_works = True
        # What every running guest reports as listening (settable per test).
        self.sockets: list[ListeningSocket] = [
            ListeningSocket("tcp", "0.0.0.0", 22, "sshd"),
            ListeningSocket("tcp", "::", 22, "sshd"),
        ]

    def wait_hello(self, *, channel: Path, timeout: float, serial_log: Path,
                   alive: Callable[[], bool]) -> AgentHello:
        self.waits.append(channel)
        until = time.monotonic() + self.hello_delay
        while True:
            self.on_poll()
            if not alive():
                raise RuntimeError("the VM process exited while waiting for the guest "
                                   "agent's HELLO")
            if time.monotonic() >= until:
                break
            time.sleep(0.02)
        if self.hello_error is not None:
            raise self.hello_error
        proc = self._proc(channel)
        return AgentHello(boot_id=f"guest-boot-{proc.pid}", version="0.1.0-fake")

    def _proc(self, channel: Path) -> FakeProc:
        (proc,) = [p for p in self.vmm.procs.values()
                   if p.spec.runtime_dir / "agent.sock" == channel]
        return proc

    def exec(self, *, channel: Path, request: ExecRequest, timeout: float) -> FakeExec:
        """A scripted command (tests/fake_exec.py); a name it does not know fails to
        start, as execvp would."""
        self._proc(channel)  # a running VM's channel
        if command(request.argv)[0] not in KNOWN:
            raise OperationFailed(f"the guest agent could not start {request.argv[0]}: "
                                  "execvp: No such file or directory")
        ex = FakeExec(request)
        self.execs.setdefault(channel, []).append(ex)
        return ex

    def push_tree(self, *, channel: Path, tree: Path, guest_path: str) -> None:
        self._proc(channel)
        if self.push_error is not None:
            raise self.push_error
        self.pushed.append((channel, guest_path, sorted(p.name for p in tree.iterdir())))

    def sync_files(self, *, channel: Path, entries: Sequence[FileSync],
                   identity: Mapping[str, str] | None) -> list[str]:
        self._proc(channel)
        self.synced.append((channel, list(entries)))
        self.identity_sent.append(dict(identity) if identity else None)
        return [f"file_sync: {e.host} does not exist on the host: skipped"
                for e in entries if not e.host.exists()]

    def start_bootstrap(self, *, channel: Path, workdir: str, installer_url: str) -> str:
        self._proc(channel)
        self.bootstraps.append((channel, workdir, installer_url))
        return "/root/.banger/bootstrap.log"

    def listening(self, *, channel: Path) -> list[ListeningSocket]:
        self._proc(channel)
        self.listening_asked.append(channel)
        return list(self.sockets)

    def poweroff(self, *, channel: Path, timeout: float) -> None:
        proc = self._proc(channel)
        if not self.poweroff_works:
            raise OperationFailed("the guest agent did not power off: the channel closed")
        del self.vmm.procs[proc.pid]

    def release(self, *, channel: Path) -> None:
        self.released.append(channel)
        for ex in self.execs.pop(channel, []):
            ex.release()

    def close(self) -> None:
        for channel in list(self.execs):
            self.release(channel=channel)

    def stats(self, *, channel: Path, timeout: float) -> GuestStats:
        """Two CPUs, 1 GiB with 768 MiB available, "/" and ``mounts``; each sample 100
        ticks later than the one before, 25 of them busy (a CPU share of 25 %)."""
        if self.stats_error is not None:
            raise self.stats_error
        proc = self._proc(channel)
        proc.stats_samples += 1
        n = proc.stats_samples * 100
        return GuestStats(
            uptime_ms=5000 + n, load1=0.25, load5=0.5, load15=1.0, mem_total_kib=1 << 20,
            mem_available_kib=768 << 10, cpu_user_ticks=n // 5, cpu_system_ticks=n // 20,
            cpu_idle_ticks=n * 3 // 4, ncpu=2, filesystems=(
                GuestFilesystem("/", 4 << 30, 1 << 30, 3 << 30), *self.mounts))


    def put_files(self, *, channel: Path, dest: str, source: Iterable[bytes],
                  timeout: float) -> int:
        self._proc(channel)
        return self.files.put(channel, dest, source)

    def get_files(self, *, channel: Path, path: str,
                  timeout: float) -> Generator[bytes, None, None]:
        self._proc(channel)
        return self.files.get(channel, path)


class FakeGuest:
    """sshd, for people: readiness (``ready_delay``, ``ready_error``), keys, the host
    user's git identity."""

    def __init__(self, vmm: FakeVmm) -> None:
        self.vmm = vmm
        self.ready_error: Exception | None = None
        self.forgotten: list[str] = []
        self.trusted: dict[str, str] = {}
        self.identity: dict[str, str] = {}
        # Every sshd wait, by endpoint; a slow sshd takes ready_delay, polling alive().
        self.ready_waits: list[Endpoint] = []
        self.ready_delay = 0.0
        self.identity_delay = 0.0  # reading the host's git identity (work_disk, post_start)
        self.identity_asked = 0

    def ensure_key(self) -> str:
        return "ssh-ed25519 AAAAfake banger"

    def wait_ready(self, *, addr: Endpoint, alias: str, timeout: float, serial_log: Path,
                   alive: Callable[[], bool]) -> float:
        self.ready_waits.append(addr)
        until = time.monotonic() + self.ready_delay
        while time.monotonic() < until:
            if not alive():
                raise RuntimeError("the VMM exited before ssh was ready")
            time.sleep(0.02)
        if not alive():
            raise RuntimeError("the VMM exited before ssh was ready")
        if self.ready_error is not None:
            raise self.ready_error
        return 0.1

    def git_identity(self) -> dict[str, str]:
        self.identity_asked += 1
        time.sleep(self.identity_delay)
        return dict(self.identity)

    def new_host_key(self) -> tuple[bytes, str]:
        return b"PRIVATE", "ssh-ed25519 AAAAhost banger-guest"

    def trust_host(self, alias: str, public_key: str) -> None:
        self.trusted[alias] = public_key

    def forget_host(self, alias: str) -> None:
        self.forgotten.append(alias)
        self.trusted.pop(alias, None)


class FakeNet:
    """Bridges, taps and NAT rules as sets; ``fail`` makes the named call raise."""

    def __init__(self) -> None:
        self.why_not: str | None = None
        self.bridges: dict[str, IPv4Interface] = {}
        self.foreign_bridges: set[str] = set()
        self.taps_up: dict[str, str] = {}  # tap -> bridge
        self.rules: dict[str, tuple[IPv4Address, str]] = {}  # vm id -> (ip, bridge)
        self.fail: set[str] = set()

    def _maybe_fail(self, what: str) -> None:
        if what in self.fail:
            raise OperationFailed(f"injected failure in {what}")

    def unavailable(self) -> str | None:
        return self.why_not

    def ensure_bridge(self, name: str, gateway: IPv4Interface) -> bool:
        self._maybe_fail("ensure_bridge")
        if name in self.foreign_bridges:
            raise OperationFailed(f"{name} exists and is not banger's: set [network] bridge")
        created = name not in self.bridges
        self.bridges[name] = gateway
        return created

    def create_tap(self, name: str, bridge: str) -> bool:
        self._maybe_fail("create_tap")
        assert bridge in self.bridges, "tap before bridge"
        created = name not in self.taps_up
        self.taps_up[name] = bridge
        return created

    def delete_tap(self, name: str) -> bool:
        self._maybe_fail("delete_tap")
        return self.taps_up.pop(name, None) is not None

    def taps(self) -> list[str]:
        return sorted(self.taps_up)

    def add_nat(self, vm_id: str, guest_ip: IPv4Address, bridge: str) -> list[str]:
        self._maybe_fail("add_nat")
        self.rules[vm_id] = (guest_ip, bridge)
        return [f"masquerade {guest_ip}"]

    def remove_nat(self, vm_id: str) -> int:
        self._maybe_fail("remove_nat")
        return 1 if self.rules.pop(vm_id, None) else 0

    def nat_vm_ids(self) -> set[str]:
        return set(self.rules)


def fake_host(root: Path) -> tuple[HostPorts, FakeImages, FakeDisks, FakeVmm, FakeGuest]:
    images, disks, vmm = FakeImages(root), FakeDisks(), FakeVmm()
    guest = FakeGuest(vmm)
    return (HostPorts(images, disks, vmm, guest, FakeWorkspace(), FakeNet(), FakeAgent(vmm)),
            images, disks, vmm, guest)


def fake_service(root: Path, layout: Layout, *, load_config: Callable[[], Config] = Config
                 ) -> tuple[VMService, FakeImages, FakeDisks, FakeVmm, FakeGuest, Database]:
    """The real VMService over real SQLite at ``layout`` and fake host ports under ``root``."""
    db = Database(layout.db)
    host, images, disks, vmm, guest = fake_host(root)
    svc = VMService(repo=VMRepository(db), ops=Operations(OperationLog(db)), host=host,
                    layout=layout, load_config=load_config)
    return svc, images, disks, vmm, guest, db


def agent_of(svc: VMService) -> FakeAgent:
    """The FakeAgent behind a :func:`fake_service` (its host ports are typed as ports)."""
    agent = svc.host.agent
    assert isinstance(agent, FakeAgent)
    return agent
