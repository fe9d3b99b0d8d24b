"""The start pipeline of one VM, built by one function that production and tests share.

Each step that acquires something owns its undo, and the undo releases only what this run
acquired: a start that found the root overlay or work disk already there leaves them alone.
Stages that do not apply to a VM are left out of the list, not run as no-ops.
"""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path

from banger.core.runtime import Handles, HandleStore, release_runtime
from banger.model import netalloc
from banger.model.config import Config, ConfigError
from banger.model.errors import FailpointTriggered, InvalidRequest
from banger.model.layout import VMPaths
from banger.model.vm import VM, NetworkMode
from banger.pipeline import Step
from banger.ports import (
    Endpoint,
    HostPorts,
    ImageInfo,
    LaunchSpec,
    NetPort,
    WorkspaceSelection,
)

MIB = 1024 * 1024
WORKSPACE_DIR = "repo"
WORKSPACE_GUEST_PATH = f"/root/{WORKSPACE_DIR}"


@dataclass
class StartContext:
    vm: VM
    paths: VMPaths
    host: HostPorts
    handles: HandleStore
    clock: Callable[[], float]
    ready_timeout: float = 120.0
    failpoint: str | None = None
    workspace: WorkspaceSelection | None = None  # copied in when the work disk is made
    load_config: Callable[[], Config] = Config
    # The git identity each VM has (by id), so a start that changes nothing costs no ssh.
    identities: dict[str, dict[str, str]] = field(default_factory=dict)
    on_detail: Callable[[str, str], None] = lambda stage, msg: None
    # Raises Cancelled once the start was cancelled; long waits (readiness) poll it.
    check_cancel: Callable[[], None] = lambda: None
    # Filled in as the steps run.
    image: ImageInfo | None = None
    created: set[str] = field(default_factory=set)
    ssh_port: int | None = None
    ssh_host: str = "127.0.0.1"
    pid: int | None = None
    boot_id: str | None = None
    ready_after: float | None = None
    config: Config = field(default_factory=Config)


def start_steps(ctx: StartContext) -> list[Step[StartContext]]:
    """The ordered stages for starting ``ctx.vm``."""
    tap = ctx.vm.spec.network is NetworkMode.TAP
    steps: list[Step[StartContext]] = [
        Step("preflight", _preflight, progress="checking image and spec"),
        Step("cleanup_runtime", _cleanup_runtime, progress="clearing stale runtime state"),
    ]
    if tap:
        steps.append(Step("bridge", _bridge, progress="setting up the bridge"))
    steps += [
        Step("socket_dir", _socket_dir, _undo_socket_dir, progress="creating socket directory"),
        Step("system_overlay", _system_overlay, _undo_system_overlay,
             progress="creating root disk overlay"),
        Step("work_disk", _work_disk, _undo_work_disk, progress="creating work disk"),
    ]
    if not tap:
        steps.append(Step("port_forward", _port_forward, progress="reserving ssh port"))
    else:
        if ctx.vm.spec.nat:
            steps.append(Step("prepare_host_features", _nat, _undo_nat,
                              progress="adding NAT rules (--nat)"))
        steps.append(Step("tap", _tap, _undo_tap, progress="creating the tap device"))
    steps += [
        Step("qemu_launch", _qemu_launch, _undo_launch, progress="launching QEMU"),
        Step("wait_ssh", _wait_ssh, progress="waiting for ssh"),
    ]
    if (ctx.paths.pending_workspace / WORKSPACE_DIR).exists():
        steps.append(Step("workspace_sync", _workspace_sync,
                          progress=f"copying the prepared workspace to {WORKSPACE_GUEST_PATH}"))
    steps.append(Step("post_start_features", _post_start,
                      progress="syncing files and git identity"))
    if wants_bootstrap(ctx):
        steps.append(Step("tool_bootstrap", _tool_bootstrap,
                          progress="starting the tool install in the background"))
    if ctx.failpoint:
        steps = [_with_failpoint(s, ctx.failpoint) for s in steps]
    return steps


def _with_failpoint(step: Step[StartContext], stage: str) -> Step[StartContext]:
    if step.name != stage:
        return step
    inner = step.run

    def run(ctx: StartContext) -> None:
        # Fail after the step acquired its resource, so its own undo must release it.
        inner(ctx)
        raise FailpointTriggered(f"failpoint: injected failure after stage {stage!r}")

    return Step(step.name, run, step.undo, step.progress, step.attrs)


def read_config(load: Callable[[], Config]) -> Config:
    """The config, or InvalidRequest naming the file, key and fix."""
    try:
        return load()
    except ConfigError as exc:
        raise InvalidRequest(str(exc)) from exc


def check_network(host: HostPorts, network: NetworkMode) -> None:
    """Refuse tap networking up front where it cannot work (e.g. a non-root daemon)."""
    if network is NetworkMode.TAP:
        why_not = host.net.unavailable()
        if why_not is not None:
            raise InvalidRequest(why_not)


def _preflight(ctx: StartContext) -> None:
    spec = ctx.vm.spec
    ctx.config = read_config(ctx.load_config)
    check_network(ctx.host, spec.network)
    if spec.network is NetworkMode.TAP:
        subnet = ctx.config.network.subnet
        if ctx.vm.guest_ip is None or _guest_ip(ctx) not in subnet:
            raise InvalidRequest(
                f"VM {ctx.vm.name!r} has address {ctx.vm.guest_ip}, outside the configured "
                f"[network] subnet {subnet}: recreate the VM or restore the subnet")
    images = ctx.host.images
    if spec.image not in images.known():
        raise InvalidRequest(f"unknown image {spec.image!r}; known: {', '.join(images.known())}")
    image = images.get(spec.image)
    if image is None:
        image = images.build(spec.image, lambda msg: ctx.on_detail("preflight", msg))
    ctx.image = image
    # The first start after a host boot probes KVM for real (a few seconds): do it here,
    # said out loud, rather than hidden inside qemu_launch.
    accel = ctx.host.vmm.accel()
    ctx.on_detail("preflight", f"acceleration: {accel.accel} ({accel.reason})")
    ctx.paths.dir.mkdir(parents=True, exist_ok=True)


def host_net(host: HostPorts, vm: VM) -> NetPort | None:
    """The network port when ``vm`` has host networking (tap) to release, else None."""
    return host.net if vm.spec.network is NetworkMode.TAP else None


def _cleanup_runtime(ctx: StartContext) -> None:
    release_runtime(ctx.paths, ctx.host.vmm, ctx.handles, net=host_net(ctx.host, ctx.vm))


def _guest_ip(ctx: StartContext) -> IPv4Address:
    assert ctx.vm.guest_ip is not None
    return IPv4Address(ctx.vm.guest_ip)


def _bridge(ctx: StartContext) -> None:
    cfg = ctx.config.network
    gateway = IPv4Interface(f"{netalloc.gateway(cfg.subnet)}/{cfg.subnet.prefixlen}")
    if ctx.host.net.ensure_bridge(cfg.bridge, gateway):
        ctx.on_detail("bridge", f"created bridge {cfg.bridge} ({gateway})")
    # Never undone: the bridge is shared by every tap VM and costs nothing idle.


def _nat(ctx: StartContext) -> None:
    ctx.created.add("nat")
    for line in ctx.host.net.add_nat(ctx.vm.id, _guest_ip(ctx), ctx.config.network.bridge):
        ctx.on_detail("prepare_host_features", line)


def _undo_nat(ctx: StartContext) -> None:
    if "nat" in ctx.created:
        ctx.host.net.remove_nat(ctx.vm.id)


def _tap(ctx: StartContext) -> None:
    ctx.created.add("tap")
    ctx.host.net.create_tap(ctx.paths.names.tap, ctx.config.network.bridge)
    ctx.ssh_host, ctx.ssh_port = str(_guest_ip(ctx)), 22


def _undo_tap(ctx: StartContext) -> None:
    if "tap" in ctx.created:
        ctx.host.net.delete_tap(ctx.paths.names.tap)


def _socket_dir(ctx: StartContext) -> None:
    if not ctx.paths.sock_dir.exists():
        ctx.paths.sock_dir.mkdir(parents=True, mode=0o700)
        ctx.created.add("socket_dir")


def _undo_socket_dir(ctx: StartContext) -> None:
    if "socket_dir" in ctx.created:
        shutil.rmtree(ctx.paths.sock_dir, ignore_errors=True)


def _system_overlay(ctx: StartContext) -> None:
    assert ctx.image is not None
    if ctx.paths.root_disk.exists():
        return
    ctx.created.add("system_overlay")
    ctx.host.disks.create_overlay(ctx.image.rootfs, ctx.paths.root_disk)


def _undo_system_overlay(ctx: StartContext) -> None:
    if "system_overlay" in ctx.created:
        ctx.paths.root_disk.unlink(missing_ok=True)


def _work_disk(ctx: StartContext) -> None:
    if ctx.paths.work_disk.exists():
        return
    guest = ctx.host.guest
    pubkey = guest.ensure_key()
    host_private, host_public = guest.new_host_key()
    files = {
        ".ssh/authorized_keys": (pubkey.strip().encode() + b"\n", 0o600),
        ".banger/hostname": (ctx.vm.name.encode() + b"\n", 0o644),
        ".banger/ssh_host_ed25519_key": (host_private, 0o600),
        ".banger/ssh_host_ed25519_key.pub": (host_public.encode() + b"\n", 0o644),
    }
    identity = guest.git_identity()
    if identity:
        files[".gitconfig"] = (gitconfig(identity).encode(), 0o644)
    ctx.created.add("work_disk")
    # Trusted before the disk exists: a daemon killed between the two must not leave a
    # work disk whose host key the next start's ssh refuses.
    guest.trust_host(ctx.paths.names.ssh_alias, host_public)
    size = ctx.vm.spec.work_disk_mib * MIB
    if ctx.workspace is None:
        ctx.host.disks.build_work_disk(ctx.paths.work_disk, size, files)
    else:
        ctx.on_detail("work_disk", f"copying {ctx.workspace.files} files "
                                   f"({ctx.workspace.total_bytes} bytes) of "
                                   f"{ctx.workspace.repo} to {WORKSPACE_GUEST_PATH}")
        with ctx.host.workspace.staged(ctx.workspace, ctx.paths.dir) as tree:
            ctx.host.disks.build_work_disk(ctx.paths.work_disk, size, files,
                                           trees={WORKSPACE_DIR: tree})
    ctx.identities[ctx.vm.id] = identity


def gitconfig(identity: dict[str, str]) -> str:
    def quoted(v: str) -> str:
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    lines = [f"\t{k.split('.', 1)[1]} = {quoted(v)}" for k, v in sorted(identity.items())]
    return "[user]\n" + "\n".join(lines) + "\n"


def _undo_work_disk(ctx: StartContext) -> None:
    if "work_disk" in ctx.created:
        ctx.paths.work_disk.unlink(missing_ok=True)
        ctx.host.guest.forget_host(ctx.paths.names.ssh_alias)


def _port_forward(ctx: StartContext) -> None:
    ctx.ssh_port = ctx.host.vmm.free_port()


def _qemu_launch(ctx: StartContext) -> None:
    assert ctx.image is not None
    vmm = ctx.host.vmm
    ctx.boot_id = secrets.token_hex(8)
    spec = LaunchSpec(
        vm_id=ctx.vm.id, kernel=ctx.image.kernel, initrd=ctx.image.initrd,
        cmdline=ctx.image.cmdline, root_disk=ctx.paths.root_disk,
        work_disk=ctx.paths.work_disk, vcpus=ctx.vm.spec.vcpus,
        memory_mib=ctx.vm.spec.memory_mib, ssh_port=ctx.ssh_port or 0,
        serial_log=ctx.paths.serial_log, vmm_log=ctx.paths.vmm_log,
        qmp_socket=ctx.paths.qmp_socket, hostname=ctx.vm.name,
        restrict_net=not ctx.vm.spec.nat, accel=vmm.accel().accel,
        base_image=ctx.image.rootfs, **_tap_launch(ctx),
    )
    ctx.pid = vmm.launch(spec)
    ctx.handles.put(ctx.paths, Handles(
        pid=ctx.pid, ssh_port=ctx.ssh_port, qmp_socket=str(ctx.paths.qmp_socket),
        accel=spec.accel, boot_id=ctx.boot_id, started_at=ctx.clock(), vmm=vmm.name,
        accel_reason=vmm.accel().reason, ssh_host=ctx.ssh_host, tap=spec.tap))


def _tap_launch(ctx: StartContext) -> dict[str, str]:
    """LaunchSpec fields for a tap VM: its tap, MAC, and the address its init sets."""
    if ctx.vm.spec.network is not NetworkMode.TAP:
        return {}
    subnet = ctx.config.network.subnet
    gateway = netalloc.gateway(subnet)
    # The gateway is also the guest's resolver: the daemon's DNS answers there (never the
    # host's 127.0.0.53 stub, which means nothing inside the guest).
    net_args = (f"banger.net=tap banger.ip={_guest_ip(ctx)}/{subnet.prefixlen} "
                f"banger.gw={gateway} banger.dns={gateway}")
    return {"tap": ctx.paths.names.tap, "mac": netalloc.mac_for(ctx.vm.id),
            "net_args": net_args}


def _undo_launch(ctx: StartContext) -> None:
    # The tap and NAT rules are their own stages' to undo.
    release_runtime(ctx.paths, ctx.host.vmm, ctx.handles)


def _addr(ctx: StartContext) -> Endpoint:
    assert ctx.ssh_port is not None
    return Endpoint(ctx.ssh_host, ctx.ssh_port)


def _wait_ssh(ctx: StartContext) -> None:
    assert ctx.pid is not None
    pid, sock = ctx.pid, ctx.paths.qmp_socket
    vmm = ctx.host.vmm
    vmm_log = ctx.paths.vmm_log

    def alive() -> bool:
        ctx.check_cancel()  # polled through the whole wait: a cancel ends it at once
        if not vmm.alive(pid, sock):
            return False
        problem = vmm.stuck(sock)
        if problem is not None:
            # A wedged VMM (e.g. a KVM internal error) would otherwise burn the whole
            # readiness timeout in silence.
            raise VmmStuck(f"the VMM reports {problem!r}: the guest cannot run; "
                           f"{vmm_log}:\n{_tail(vmm_log)}")
        return True

    ctx.ready_after = ctx.host.guest.wait_ready(
        addr=_addr(ctx), alias=ctx.paths.names.ssh_alias, timeout=ctx.ready_timeout,
        serial_log=ctx.paths.serial_log, alive=alive)


def _post_start(ctx: StartContext) -> None:
    guest = ctx.host.guest
    identity = guest.git_identity()
    changed = identity if identity and ctx.identities.get(ctx.vm.id) != identity else None
    if not ctx.config.file_sync and changed is None:
        return  # nothing to send: no ssh session on this start
    for warning in guest.sync_files(addr=_addr(ctx), alias=ctx.paths.names.ssh_alias,
                                    entries=ctx.config.file_sync, identity=changed):
        ctx.on_detail("post_start_features", warning)
    ctx.identities[ctx.vm.id] = identity


BOOTSTRAP_MARK = "bootstrap"  # in paths.pending_workspace, next to the staged repo


def wants_bootstrap(ctx: StartContext) -> bool:
    """A workspace with pinned tools lands in this start and its owner did not opt out."""
    if (ctx.paths.pending_workspace / BOOTSTRAP_MARK).exists():
        return True
    ws = ctx.workspace  # set only while a repo waits for this start (pendingws.for_start)
    return ws is not None and ws.request.bootstrap and bool(ws.tool_files)


def check_bootstrap(ws: WorkspaceSelection, nat: bool, vm_name: str | None) -> None:
    """Refuse up front a tool bootstrap that could not reach its installer."""
    if not ws.request.bootstrap or not ws.tool_files or nat:
        return
    which = " and ".join(ws.tool_files)
    vm = f"VM {vm_name!r}" if vm_name else "the VM"
    raise InvalidRequest(
        f"{ws.repo} has {which}: installing its tools needs outbound network, and {vm} "
        f"has none. Add --nat to give it network access, or --no-bootstrap to skip the "
        f"tool install.")


def _workspace_sync(ctx: StartContext) -> None:
    pending = ctx.paths.pending_workspace
    ctx.host.guest.push_tree(addr=_addr(ctx), alias=ctx.paths.names.ssh_alias,
                             tree=pending / WORKSPACE_DIR, guest_path=WORKSPACE_GUEST_PATH)
    # Gone once it is in the guest; a bootstrap mark stays until the install started.
    shutil.rmtree(pending / WORKSPACE_DIR)
    if not (pending / BOOTSTRAP_MARK).exists():
        shutil.rmtree(pending, ignore_errors=True)


def launch_bootstrap(host: HostPorts, addr: Endpoint, paths: VMPaths, installer_url: str,
                     on_detail: Callable[[str, str], None]) -> None:
    """Start the repo's tool install in the guest's background and say where its log is."""
    log = host.guest.start_bootstrap(addr=addr, alias=paths.names.ssh_alias,
                                     workdir=WORKSPACE_GUEST_PATH, installer_url=installer_url)
    on_detail("tool_bootstrap", f"installing the repo's tools in the background; "
                                f"log in the guest: {log}")


def _tool_bootstrap(ctx: StartContext) -> None:
    launch_bootstrap(ctx.host, _addr(ctx), ctx.paths, ctx.config.installer_url, ctx.on_detail)
    shutil.rmtree(ctx.paths.pending_workspace, ignore_errors=True)


class VmmStuck(RuntimeError):
    pass


def _tail(path: Path, lines: int = 10) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "  (no log)"
    return "\n".join("  " + line for line in text.splitlines()[-lines:]) or "  (empty)"


def vm_files_exist(paths: VMPaths) -> list[Path]:
    return [p for p in (paths.root_disk, paths.work_disk) if p.exists()]
