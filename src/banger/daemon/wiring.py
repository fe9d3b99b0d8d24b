"""Adapters from the host layer to the core ports: the daemon's composition root."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path
from typing import TypeVar

from banger.host import (
    disks,
    filesync,
    guestports,
    imagebuild,
    kvm,
    nat,
    net,
    qemu,
    repostage,
    seriallog,
    ssh,
    vmmproc,
    vmmuser,
    workspace,
)
from banger.host.runner import CommandError, run
from banger.host.scratch import Scratch
from banger.model.config import FileSync
from banger.model.errors import InvalidRequest, OperationFailed
from banger.model.layout import Layout
from banger.model.vm import ResourceNames
from banger.ports import (
    Accel,
    Endpoint,
    HostPorts,
    ImageInfo,
    LaunchSpec,
    ListeningSocket,
    Rediscovered,
    WorkspaceRequest,
    WorkspaceSelection,
)

T = TypeVar("T")


class LocalImages:
    """Images built locally on first use, content-addressed and verified when read back."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.Lock()  # concurrent first uses coalesce into one build

    def known(self) -> list[str]:
        return list(imagebuild.IMAGE_VARIANTS)

    def _info(self, a: imagebuild.ImageArtifacts, name: str) -> ImageInfo:
        return ImageInfo(name=name, rootfs=a.rootfs, kernel=a.kernel, initrd=a.initrd,
                         cmdline=a.cmdline, kernel_version=a.kernel_version)

    def get(self, name: str) -> ImageInfo | None:
        d = self.root / name
        if not (d / "manifest.json").exists() or not imagebuild.is_current(d):
            return None  # not built, or built from an older recipe: build() replaces it
        # Hashing the 2 GiB rootfs costs ~2 s: verify once per host boot and file identity,
        # recorded next to the image, instead of at every daemon start.
        stamp = d / ".verified.json"
        key = _identity(d, ["manifest.json", imagebuild.ROOTFS, imagebuild.KERNEL,
                            imagebuild.INITRD])
        try:
            trusted = json.loads(stamp.read_text()) == key
        except (OSError, ValueError):
            trusted = False
        artifacts = imagebuild.load_image(d, verify=not trusted)
        if not trusted:
            with contextlib.suppress(OSError):  # a read-only shared image dir is fine
                stamp.write_text(json.dumps(key))
        return self._info(artifacts, name)

    def build(self, name: str, on_progress: Callable[[str], None]) -> ImageInfo:
        with self._lock:
            found = self.get(name)
            if found is not None:
                return found
            stale = (self.root / name / "manifest.json").exists()
            on_progress(f"image {name!r} " + ("was built from an older recipe: rebuilding it"
                                             if stale else "is not built yet: building it once")
                        + " (about a minute)")
            self.root.mkdir(parents=True, exist_ok=True)
            return self._info(imagebuild.build_default_image(
                self.root / name, on_progress=on_progress,
                variant=imagebuild.IMAGE_VARIANTS[name]), name)


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _identity(d: Path, names: list[str]) -> dict[str, object]:
    files = {}
    for n in names:
        st = (d / n).stat()
        files[n] = [st.st_size, st.st_mtime_ns, st.st_ino]
    return {"boot_id": _boot_id(), "files": files}


class LocalDisks:
    def create_overlay(self, base: Path, overlay: Path) -> None:
        disks.create_overlay(base, overlay)

    def build_work_disk(self, path: Path, size_bytes: int,
                        files: Mapping[str, tuple[bytes, int]],
                        trees: Mapping[str, Path] | None = None) -> None:
        try:
            disks.build_work_disk(path, size_bytes, files, trees)
        except disks.DiskError as exc:
            raise InvalidRequest(str(exc)) from exc


class LocalWorkspace:
    """Host repos read with git (banger.host.workspace) and staged as a real checkout
    (banger.host.repostage)."""

    def __init__(self, scratch: Scratch | None = None) -> None:
        self._scratch = scratch  # None: no RAM staging (the VM's directory only)
        self._ram_lock = threading.Lock()

    def select(self, req: WorkspaceRequest) -> WorkspaceSelection:
        try:
            sel = workspace.select(req.path, include_untracked=req.include_untracked)
        except workspace.WorkspaceError as exc:
            raise InvalidRequest(str(exc)) from exc
        if req.from_ref is not None and req.branch is None:
            raise InvalidRequest("--from needs --branch: name the guest-only branch to create")
        return WorkspaceSelection(request=req, repo=sel.repo, files=len(sel.files),
                                  total_bytes=sel.total_bytes, handle=sel,
                                  tool_files=workspace.tool_files(sel), head=sel.head)

    def dry_run(self, req: WorkspaceRequest) -> list[str]:
        sel = self.select(req).handle
        assert isinstance(sel, workspace.Selection)
        return workspace.dry_run_lines(sel)

    @contextlib.contextmanager
    def staged(self, sel: WorkspaceSelection, scratch: Path) -> Iterator[Path]:
        handle = sel.handle
        assert isinstance(handle, workspace.Selection)
        with self._ram_lock:
            ram = self._scratch.ram() if self._scratch is not None else None
            parent = repostage.staging_parent(handle, scratch, ram, sel.request.from_ref)
            tmp = Path(tempfile.mkdtemp(prefix=".workspace-", dir=parent))
        try:
            tree = tmp / "repo"
            try:
                repostage.stage(handle, tree, branch=sel.request.branch,
                                from_ref=sel.request.from_ref)
            except workspace.WorkspaceError as exc:
                raise InvalidRequest(str(exc)) from exc
            yield tree
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            # No idle directory left in /dev/shm (only removed when no other staging is in).
            if self._scratch is not None:
                with self._ram_lock, contextlib.suppress(OSError):
                    self._scratch.ram_dir.rmdir()


class VmmUsers:
    """Who each QEMU runs as (banger.host.vmmuser): None under a non-root daemon; else a
    user that no running QEMU has, created on first need (useradd)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users: dict[int, vmmuser.RunAs | None] = {}
        self._reserved: set[int] = set()  # uids handed to launches not yet running

    def get(self, slot: int = 0) -> vmmuser.RunAs | None:
        """The identity of ``slot`` (slot 0: the one the KVM probe checks /dev/kvm for)."""
        with self._lock:
            return self._get(slot)

    def _get(self, slot: int) -> vmmuser.RunAs | None:
        if slot not in self._users:
            try:
                self._users[slot] = vmmuser.resolve(slot)
            except vmmuser.VmmUserError as exc:
                raise OperationFailed(str(exc)) from exc
        return self._users[slot]

    @contextlib.contextmanager
    def free(self) -> Iterator[vmmuser.RunAs | None]:
        """A user no running (or starting) QEMU has, reserved while the caller launches."""
        with self._lock:
            busy = vmmproc.running_qemu_uids() | self._reserved
            slot = 0
            while (runas := self._get(slot)) is not None and runas.uid in busy:
                slot += 1
            if runas is not None:
                self._reserved.add(runas.uid)
        try:
            yield runas
        finally:
            if runas is not None:
                with self._lock:
                    self._reserved.discard(runas.uid)


class QemuVmm:
    name = "qemu"

    def __init__(self, cache: Path | None = None, users: VmmUsers | None = None) -> None:
        self._users = users or VmmUsers()
        self._accel: Accel | None = None
        self._cache = cache
        self._lock = threading.Lock()
        self._handed: dict[int, float] = {}

    def accel(self) -> Accel:
        """KVM if a real probe guest ran under it, else TCG; probed once per host boot."""
        with self._lock:
            if self._accel is None:
                self._accel = self._cached_probe()
            return self._accel

    def _cached_probe(self) -> Accel:
        if os.environ.get("BANGER_ACCEL") or self._cache is None:
            choice = kvm.probe_accel(self._users.get())
            return Accel(choice.accel, choice.reason)
        key = {"boot_id": _boot_id(), "qemu": _stat_key(shutil.which(qemu.QEMU)),
               "kvm": _stat_key("/dev/kvm"), "user": _user_key(self._users.get())}
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            data = json.loads(self._cache.read_text())
            if data["key"] == key:
                return Accel(str(data["accel"]), str(data["reason"]))
        choice = kvm.probe_accel(self._users.get())
        with contextlib.suppress(OSError):
            self._cache.write_text(json.dumps({"key": key, "accel": choice.accel,
                                               "reason": choice.reason}))
        return Accel(choice.accel, choice.reason)

    def free_port(self) -> int:
        # A port is free when asked but bound by QEMU only later: never hand the same one
        # to two starts running side by side.
        with self._lock:
            now = time.monotonic()
            self._handed = {p: t for p, t in self._handed.items() if now - t < 120}
            for _ in range(100):
                port = vmmproc.free_port()
                if port not in self._handed:
                    self._handed[port] = now
                    return port
        raise OperationFailed("no free loopback port for ssh forwarding")

    def launch(self, spec: LaunchSpec) -> int:
        cfg = qemu.QemuConfig(
            kernel=spec.kernel, initrd=spec.initrd, root_disk=spec.root_disk,
            work_disk=spec.work_disk, vcpus=spec.vcpus, memory_mib=spec.memory_mib,
            ssh_port=spec.ssh_port, serial_log=spec.serial_log, qmp_socket=spec.qmp_socket,
            accel=spec.accel, hostname=spec.hostname, cmdline=spec.cmdline,
            restrict_net=spec.restrict_net, tap=spec.tap, mac=spec.mac,
            net_args=spec.net_args, base_image=spec.base_image)
        seriallog.new_boot(spec.serial_log, spec.serial_log.with_name(
            ResourceNames(spec.vm_id).serial_log_rotated))
        with self._users.free() as runas:
            # Once launched, the process itself marks its uid as taken.
            return qemu.launch(cfg, spec.vmm_log, runas)

    def alive(self, pid: int, qmp_socket: Path) -> bool:
        return vmmproc.pid_alive(pid) and vmmproc.pid_is_qemu_for(pid, qmp_socket)

    def answering(self, qmp_socket: Path) -> bool:
        return vmmproc.qmp_status(qmp_socket) is not None

    def stuck(self, qmp_socket: Path) -> str | None:
        status = vmmproc.qmp_status(qmp_socket)
        return status if status in ("internal-error", "guest-panicked", "io-error",
                                    "shutdown") else None

    def quit(self, qmp_socket: Path) -> bool:
        return vmmproc.qmp_quit(qmp_socket)

    def kill(self, pid: int, sig: int) -> None:
        vmmproc.kill_and_wait(pid, sig, 0.0)

    def wait_exit(self, pid: int, timeout: float) -> bool:
        return vmmproc.kill_and_wait(pid, 0, timeout)

    def rediscover(self, qmp_socket: Path) -> Rediscovered | None:
        pid = vmmproc.find_qemu_pid(qmp_socket)
        if pid is None:
            return None
        return Rediscovered(pid, vmmproc.ssh_port_of(pid))


def _user_key(runas: vmmuser.RunAs | None) -> list[int] | None:
    return None if runas is None else [runas.uid, runas.gid, *runas.groups]


def _stat_key(path: str | None) -> list[int] | None:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_ino, st.st_mtime_ns, st.st_rdev]


class SshGuest:
    def __init__(self, layout: Layout) -> None:
        self._scratch = Scratch(layout.state_dir)
        self.key = layout.ssh_key
        self.known_hosts = layout.known_hosts
        self._known_hosts_lock = threading.Lock()

    def _argv(self, addr: Endpoint, alias: str) -> list[str]:
        return ssh.ssh_base_argv(port=addr.port, host=addr.host, key=self.key,
                                 known_hosts=self.known_hosts, alias=alias)

    def ensure_key(self) -> str:
        self.key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        return ssh.ensure_key(self.key)

    def wait_ready(self, *, addr: Endpoint, alias: str, timeout: float, serial_log: Path,
                   alive: Callable[[], bool]) -> float:
        return ssh.wait_ready(port=addr.port, host=addr.host, key=self.key,
                              known_hosts=self.known_hosts, alias=alias, timeout=timeout,
                              serial_log=serial_log, alive=alive)

    def poweroff(self, *, addr: Endpoint, alias: str, timeout: float) -> None:
        # The connection dies with the guest: a non-zero exit here is expected.
        run([*self._argv(addr, alias), "/usr/local/sbin/banger-poweroff"], check=False,
            timeout=timeout, max_output=ssh.CHATTER_CAP)

    def git_identity(self) -> dict[str, str]:
        return filesync.host_git_identity()

    def sync_files(self, *, addr: Endpoint, alias: str, entries: Sequence[FileSync],
                   identity: Mapping[str, str] | None) -> list[str]:
        try:
            return filesync.sync(port=addr.port, host=addr.host, key=self.key,
                                 known_hosts=self.known_hosts, alias=alias, entries=entries,
                                 identity=dict(identity or {}),
                                 tmp_dir=self._scratch.disk())
        except filesync.FileSyncError as exc:
            raise OperationFailed(str(exc)) from exc

    def push_tree(self, *, addr: Endpoint, alias: str, tree: Path, guest_path: str) -> None:
        try:
            ssh.push_tree(port=addr.port, host=addr.host, key=self.key,
                          known_hosts=self.known_hosts, alias=alias, tree=tree,
                          guest_path=guest_path)
        except ssh.SshError as exc:
            raise OperationFailed(str(exc)) from exc

    def start_bootstrap(self, *, addr: Endpoint, alias: str, workdir: str,
                        installer_url: str) -> str:
        try:
            return ssh.start_bootstrap(self._argv(addr, alias), workdir=workdir,
                                       installer_url=installer_url)
        except ssh.SshError as exc:
            raise OperationFailed(str(exc)) from exc

    def listening(self, *, addr: Endpoint, alias: str) -> list[ListeningSocket]:
        try:
            out = run([*self._argv(addr, alias), guestports.SS_COMMAND], timeout=30,
                      max_output=guestports.SS_OUTPUT_CAP)
        except CommandError as exc:
            raise OperationFailed(f"could not list the guest's sockets: {exc}") from exc
        try:
            found = guestports.parse_ss(out.stdout)
        except guestports.SsParseError as exc:
            raise OperationFailed(f"could not read the guest's `ss` output: {exc}") from exc
        return [ListeningSocket(s.proto, s.address, s.port, s.process) for s in found]

    def new_host_key(self) -> tuple[bytes, str]:
        return ssh.host_keypair(self._scratch.disk())

    def trust_host(self, alias: str, public_key: str) -> None:
        with self._known_hosts_lock:
            ssh.trust_host_key(self.known_hosts, alias, public_key)

    def forget_host(self, alias: str) -> None:
        # ssh-keygen -R rewrites the file: serialise against concurrent starts and deletes.
        with self._known_hosts_lock:
            ssh.remove_known_host(self.known_hosts, alias)


class LocalNet:
    """Bridge, taps and nftables NAT on this host (banger.host.net, banger.host.nat); needs root."""

    def __init__(self, ip_forward_record: Path | None = None) -> None:
        self._bridge_lock = threading.Lock()
        # ip_forward's value before banger turned it on, kept in the state dir so that a
        # restarted daemon still restores it when the last NAT VM goes.
        self._forward_record = ip_forward_record
        # Adding and removing NAT (and so turning forwarding on and off) never interleave:
        # a last VM going must not turn forwarding off under a VM being added.
        self._nat_lock = threading.Lock()

    def unavailable(self) -> str | None:
        if os.geteuid() != 0:
            return (f"tap networking needs root (bangerd runs as uid {os.geteuid()}) to "
                    "create the bridge, taps and NAT rules: run bangerd as root, or use "
                    "--network user (the default)")
        for tool in ("ip", "nft"):
            if shutil.which(tool) is None:
                return (f"tap networking needs `{tool}`, which is not installed "
                        f"(Debian: apt install {'iproute2' if tool == 'ip' else 'nftables'})")
        return None

    def ensure_bridge(self, name: str, gateway: IPv4Interface) -> bool:
        with self._bridge_lock:
            created = self._net(net.ensure_bridge, name, gateway)
            self._net(nat.ensure_guard, name)
            return created

    def create_tap(self, name: str, bridge: str) -> bool:
        # No owner: only root attaches to it; the daemon does, for QEMU (host.qemu).
        return self._net(net.create_tap, name, bridge)

    def delete_tap(self, name: str) -> bool:
        return self._net(net.delete_tap, name)

    def taps(self) -> list[str]:
        return self._net(net.list_banger_taps)

    def add_nat(self, vm_id: str, guest_ip: IPv4Address, bridge: str) -> list[str]:
        lines = []
        with self._nat_lock:
            if self._net(nat.ensure_ip_forward, self._forward_record):
                lines.append("enabled IPv4 forwarding (net.ipv4.ip_forward was 0; restored "
                             "when the last --nat VM goes)")
            setup = self._net(nat.add_nat, vm_id, guest_ip, bridge)
        return lines + setup.describe()

    def remove_nat(self, vm_id: str) -> int:
        with self._nat_lock:
            removed = self._net(nat.remove_nat, vm_id)
            if self._forward_record is not None and not self._net(nat.nat_vm_ids):
                self._net(nat.restore_ip_forward, self._forward_record)
            return removed

    def nat_vm_ids(self) -> set[str]:
        return self._net(nat.nat_vm_ids)

    @staticmethod
    def _net(fn: Callable[..., T], *args: object) -> T:
        try:
            return fn(*args)
        except (net.NetworkError, CommandError) as exc:
            raise OperationFailed(str(exc)) from exc


def host_ports(layout: Layout) -> HostPorts:
    return HostPorts(images=LocalImages(layout.images_dir), disks=LocalDisks(),
                     vmm=QemuVmm(layout.state_dir / "accel.json"),
                     workspace=LocalWorkspace(Scratch(layout.state_dir)),
                     guest=SshGuest(layout), net=LocalNet(layout.state_dir / "ip_forward.orig"))


