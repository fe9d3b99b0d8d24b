"""The start pipeline of one VM, built by one function that production and tests share.

Each step that acquires something owns its undo, and the undo releases only what this run
acquired: a start that found the root overlay or work disk already there leaves them alone.
Stages that do not apply to a VM are left out of the list, not run as no-ops.
"""

from __future__ import annotations

import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path

from banger.core.context import host_net, read_config
from banger.core.runtime import Handles, HandleStore, release_runtime
from banger.core.stages import WORKSPACE_DIR, WORKSPACE_GUEST_PATH, Stage, launch_stage, step
from banger.core.workinputs import WorkInputsFetch
from banger.local.logtail import tail_lines
from banger.model import netalloc
from banger.model.config import Config
from banger.model.errors import FailpointTriggered, InvalidRequest, OperationFailed
from banger.model.layout import VMPaths
from banger.model.vm import VM, KernelKind, NetworkMode
from banger.pipeline import Detail, Step
from banger.ports import (
    BootSource,
    Drive,
    GuestSettings,
    HostPorts,
    ImageInfo,
    LaunchSpec,
    NetAttachment,
    TapNet,
    UserNet,
    WorkspaceSelection,
)

MIB = 1024 * 1024


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
    # The git identity each VM has (by id), so a start that changes nothing sends nothing.
    identities: dict[str, dict[str, str]] = field(default_factory=dict)
    # Details of the step running now (the pipeline points it at each step in turn).
    detail: Detail = field(default_factory=lambda: Detail(lambda stage, msg: None))
    # Raises Cancelled once the start was cancelled; long waits (readiness) poll it.
    check_cancel: Callable[[], None] = lambda: None
    # Filled in as the steps run.
    image: ImageInfo | None = None
    created: set[Stage] = field(default_factory=set)  # what this run acquired (undos)
    ssh_port: int | None = None
    ssh_host: str = "127.0.0.1"
    pid: int | None = None
    agent: Path | None = None  # the guest agent's channel (Launched.agent)
    boot_id: str | None = None
    config: Config = field(default_factory=Config)
    work_inputs: WorkInputsFetch | None = None  # asked for at preflight (workinputs.py)


def start_steps(ctx: StartContext) -> list[Step[StartContext]]:
    """The ordered stages for starting ``ctx.vm``."""
    tap = ctx.vm.spec.network is NetworkMode.TAP
    steps: list[Step[StartContext]] = [
        step(Stage.PREFLIGHT, _preflight),
        step(Stage.CLEANUP_RUNTIME, _cleanup_runtime),
    ]
    if tap:
        steps.append(step(Stage.BRIDGE, _bridge))
    steps += [
        step(Stage.SOCKET_DIR, _socket_dir, _undo_socket_dir),
        step(Stage.SYSTEM_OVERLAY, _system_overlay, _undo_system_overlay),
        step(Stage.WORK_DISK, _work_disk, _undo_work_disk),
    ]
    if not tap:
        steps.append(step(Stage.PORT_FORWARD, _port_forward))
    else:
        if ctx.vm.spec.nat:
            steps.append(step(Stage.PREPARE_HOST_FEATURES, _nat, _undo_nat))
        steps.append(step(Stage.TAP, _tap, _undo_tap))
    steps += [
        step(launch_stage(ctx.host.vmm.name), _launch, _undo_launch),
        step(Stage.WAIT_AGENT, _wait_agent),
    ]
    if (ctx.paths.pending_workspace / WORKSPACE_DIR).exists():
        steps.append(step(Stage.WORKSPACE_SYNC, _workspace_sync))
    steps.append(step(Stage.POST_START_FEATURES, _post_start))
    if wants_bootstrap(ctx):
        steps.append(step(Stage.TOOL_BOOTSTRAP, _tool_bootstrap))
    if ctx.failpoint:
        steps = [_with_failpoint(s, ctx.failpoint) for s in steps]
    return steps


def _with_failpoint(s: Step[StartContext], stage: str) -> Step[StartContext]:
    if s.name != stage:
        return s
    inner = s.run

    def run(ctx: StartContext) -> None:
        # Fail after the step acquired its resource, so its own undo must release it.
        inner(ctx)
        raise FailpointTriggered(f"failpoint: injected failure after stage {stage!r}")

    return replace(s, run=run)


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
        image = images.build(spec.image, ctx.detail)
    ctx.image = image
    # The first start after a host boot probes KVM for real (a few seconds): do it here,
    # said out loud, rather than hidden inside the launch.
    accel = ctx.host.vmm.accel()
    ctx.detail(f"acceleration: {accel.accel} ({accel.reason})")
    ctx.paths.dir.mkdir(parents=True, exist_ok=True)
    if not ctx.paths.work_disk.exists():
        ctx.work_inputs = WorkInputsFetch(ctx.host.guest)


def _cleanup_runtime(ctx: StartContext) -> None:
    release_runtime(ctx.paths, ctx.host.vmm, ctx.handles, net=host_net(ctx.host, ctx.vm),
                    agent=ctx.host.agent)


def _guest_ip(ctx: StartContext) -> IPv4Address:
    assert ctx.vm.guest_ip is not None
    return IPv4Address(ctx.vm.guest_ip)


def _bridge(ctx: StartContext) -> None:
    cfg = ctx.config.network
    gateway = IPv4Interface(f"{netalloc.gateway(cfg.subnet)}/{cfg.subnet.prefixlen}")
    if ctx.host.net.ensure_bridge(cfg.bridge, gateway):
        ctx.detail(f"created bridge {cfg.bridge} ({gateway})")
    # Never undone: the bridge is shared by every tap VM and costs nothing idle.


def _nat(ctx: StartContext) -> None:
    ctx.created.add(Stage.PREPARE_HOST_FEATURES)
    for line in ctx.host.net.add_nat(ctx.vm.id, _guest_ip(ctx), ctx.config.network.bridge):
        ctx.detail(line)


def _undo_nat(ctx: StartContext) -> None:
    if Stage.PREPARE_HOST_FEATURES in ctx.created:
        ctx.host.net.remove_nat(ctx.vm.id)


def _tap(ctx: StartContext) -> None:
    ctx.created.add(Stage.TAP)
    ctx.host.net.create_tap(ctx.paths.names.tap, ctx.config.network.bridge)
    ctx.ssh_host, ctx.ssh_port = str(_guest_ip(ctx)), 22


def _undo_tap(ctx: StartContext) -> None:
    if Stage.TAP in ctx.created:
        ctx.host.net.delete_tap(ctx.paths.names.tap)


def _socket_dir(ctx: StartContext) -> None:
    if not ctx.paths.sock_dir.exists():
        ctx.paths.sock_dir.mkdir(parents=True, mode=0o700)
        ctx.created.add(Stage.SOCKET_DIR)


def _undo_socket_dir(ctx: StartContext) -> None:
    if Stage.SOCKET_DIR in ctx.created:
        shutil.rmtree(ctx.paths.sock_dir, ignore_errors=True)


def _system_overlay(ctx: StartContext) -> None:
    assert ctx.image is not None
    if ctx.paths.root_disk.exists():
        return
    ctx.created.add(Stage.SYSTEM_OVERLAY)
    ctx.host.disks.create_overlay(ctx.image.rootfs, ctx.paths.root_disk)


def _undo_system_overlay(ctx: StartContext) -> None:
    if Stage.SYSTEM_OVERLAY in ctx.created:
        ctx.paths.root_disk.unlink(missing_ok=True)


def _work_disk(ctx: StartContext) -> None:
    if ctx.paths.work_disk.exists():
        return
    guest = ctx.host.guest
    pubkey = guest.ensure_key()
    inputs = (ctx.work_inputs or WorkInputsFetch(guest)).result()
    host_private, host_public, identity = (inputs.host_private, inputs.host_public,
                                           inputs.identity)
    files = {
        ".ssh/authorized_keys": (pubkey.strip().encode() + b"\n", 0o600),
        ".banger/hostname": (ctx.vm.name.encode() + b"\n", 0o644),
        ".banger/ssh_host_ed25519_key": (host_private, 0o600),
        ".banger/ssh_host_ed25519_key.pub": (host_public.encode() + b"\n", 0o644),
    }
    if identity:
        files[".gitconfig"] = (gitconfig(identity).encode(), 0o644)
    ctx.created.add(Stage.WORK_DISK)
    # Trusted before the disk exists: a daemon killed between the two must not leave a
    # work disk whose host key the next start's ssh refuses.
    guest.trust_host(ctx.paths.names.ssh_alias, host_public)
    size = ctx.vm.spec.work_disk_mib * MIB
    if ctx.workspace is None:
        ctx.host.disks.build_work_disk(ctx.paths.work_disk, size, files)
    else:
        ctx.detail(f"copying {ctx.workspace.files} files "
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
    if Stage.WORK_DISK in ctx.created:
        ctx.paths.work_disk.unlink(missing_ok=True)
        ctx.host.guest.forget_host(ctx.paths.names.ssh_alias)


def _port_forward(ctx: StartContext) -> None:
    ctx.ssh_port = ctx.host.vmm.free_port()


def _launch(ctx: StartContext) -> None:
    assert ctx.image is not None
    vmm = ctx.host.vmm
    ctx.boot_id = secrets.token_hex(8)
    spec = LaunchSpec(
        vm_id=ctx.vm.id,
        boot=boot_source(ctx.vm, ctx.image),
        root=Drive(ctx.paths.root_disk, backing=_backing(ctx)),
        work=Drive(ctx.paths.work_disk), vcpus=ctx.vm.spec.vcpus,
        memory_mib=ctx.vm.spec.memory_mib, net=_net_attachment(ctx),
        guest=GuestSettings(hostname=ctx.vm.name), serial_log=ctx.paths.serial_log,
        vmm_log=ctx.paths.vmm_log, runtime_dir=ctx.paths.sock_dir,
        control_socket=ctx.paths.control_socket,
    )
    up = vmm.launch(spec)
    ctx.pid = up.pid
    ctx.agent = up.agent
    ctx.handles.put(ctx.paths, Handles(
        pid=up.pid, ssh_port=ctx.ssh_port, control_socket=str(up.control_socket),
        accel=up.accel.accel, boot_id=ctx.boot_id, started_at=ctx.clock(), vmm=vmm.name,
        accel_reason=up.accel.reason, ssh_host=ctx.ssh_host,
        tap=spec.net.tap if isinstance(spec.net, TapNet) else None,
        agent=None if up.agent is None else str(up.agent)))


def _backing(ctx: StartContext) -> Path:
    """The base the VM's root overlay was made over (an OCI image pulled again under its
    name keeps its earlier build for the VMs made from it); the image's current root disk
    when the overlay names none. A recorded base that is gone is refused: the overlay holds
    only the blocks the VM changed, and over another base its filesystem is corrupt."""
    assert ctx.image is not None
    recorded = ctx.host.disks.backing_of(ctx.paths.root_disk)
    if recorded is None or recorded == ctx.image.rootfs:
        return ctx.image.rootfs
    if not recorded.is_file():
        raise OperationFailed(
            f"VM {ctx.vm.name!r}: its root disk was made over {recorded}, which is gone "
            f"(image {ctx.image.name!r} rebuilt or pulled again and its old build removed); "
            "booting it over the image's current root disk would corrupt its filesystem. "
            "Put that file back, or delete the VM (banger vm delete "
            f"{ctx.vm.name}) and create it again.")
    return recorded


def boot_source(vm: VM, image: ImageInfo) -> BootSource:
    """The kernel the VM's record names, from its image: banger's microVM kernel boots
    with no initramfs (its drivers are built in); the cloud kernel needs its initramfs."""
    if vm.spec.kernel is KernelKind.CLOUD:
        if not image.cloud_kernel:
            raise InvalidRequest(f"image {image.name!r} (OCI) boots banger's microVM kernel "
                                 "only: drop --kernel cloud")
        return BootSource(image.kernel, image.initrd, image.cmdline)
    if image.microvm_kernel is None:
        raise InvalidRequest(f"image {image.name!r} has no microVM kernel: rebuild it (a "
                             f"current banger builds one) or boot the cloud kernel "
                             f"(--kernel cloud)")
    return BootSource(image.microvm_kernel, None, image.cmdline)


def _net_attachment(ctx: StartContext) -> NetAttachment:
    """The VM's network as its VMM attaches it: the forwarded ssh port (user), or its
    tap, MAC and the address its init sets (tap)."""
    outbound = ctx.vm.spec.nat
    if ctx.vm.spec.network is not NetworkMode.TAP:
        assert ctx.ssh_port is not None
        return UserNet(ssh_port=ctx.ssh_port, outbound=outbound)
    subnet = ctx.config.network.subnet
    gateway = netalloc.gateway(subnet)
    # The gateway is also the guest's resolver: the daemon's DNS answers there (never the
    # host's 127.0.0.53 stub, which means nothing inside the guest).
    return TapNet(tap=ctx.paths.names.tap, mac=netalloc.mac_for(ctx.vm.id),
                  address=IPv4Interface(f"{_guest_ip(ctx)}/{subnet.prefixlen}"),
                  gateway=gateway, resolver=gateway, outbound=outbound)


def _undo_launch(ctx: StartContext) -> None:
    # The tap and NAT rules are their own stages' to undo.
    release_runtime(ctx.paths, ctx.host.vmm, ctx.handles, agent=ctx.host.agent)


def _channel(ctx: StartContext) -> Path:
    """The guest agent's channel, once the agent said HELLO on it (banger's own calls into
    the guest all go there)."""
    assert ctx.agent is not None
    return ctx.agent


def _vmm_alive(ctx: StartContext) -> Callable[[], bool]:
    """The liveness poll of a readiness wait: False once the VMM is gone; raises on a
    cancel (at once) or a VMM that can never make progress."""
    assert ctx.pid is not None
    pid, sock = ctx.pid, ctx.paths.control_socket
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

    return alive


def _wait_agent(ctx: StartContext) -> None:
    """Readiness: the guest agent's HELLO. Its boot id is the guest kernel's: it replaces
    the launch's placeholder in the handles and, once running, the record."""
    if ctx.agent is None:
        raise OperationFailed(f"the {ctx.host.vmm.name} driver gave no guest agent "
                              f"channel: banger cannot tell when the guest is ready")
    started = time.monotonic()
    hello = ctx.host.agent.wait_hello(
        channel=ctx.agent, timeout=ctx.ready_timeout, serial_log=ctx.paths.serial_log,
        alive=_vmm_alive(ctx))
    ctx.detail(f"guest agent {hello.version} said hello after "
               f"{time.monotonic() - started:.2f} s (guest boot id {hello.boot_id})")
    ctx.boot_id = hello.boot_id
    h = ctx.handles.get(ctx.vm.id)
    if h is not None:
        ctx.handles.put(ctx.paths, replace(h, boot_id=hello.boot_id))


def _post_start(ctx: StartContext) -> None:
    guest = ctx.host.guest
    # A work disk made by this start holds the identity read moments ago: not asked
    # again on the way to "ready". One from an earlier boot may be stale.
    if Stage.WORK_DISK in ctx.created and ctx.vm.id in ctx.identities:
        identity = ctx.identities[ctx.vm.id]
    else:
        identity = guest.git_identity()
    changed = identity if identity and ctx.identities.get(ctx.vm.id) != identity else None
    if not ctx.config.file_sync and changed is None:
        return  # nothing to send
    for warning in ctx.host.agent.sync_files(channel=_channel(ctx),
                                             entries=ctx.config.file_sync,
                                             identity=changed):
        ctx.detail(warning)
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
    ctx.host.agent.push_tree(channel=_channel(ctx), tree=pending / WORKSPACE_DIR,
                             guest_path=WORKSPACE_GUEST_PATH)
    # Gone once it is in the guest; a bootstrap mark stays until the install started.
    shutil.rmtree(pending / WORKSPACE_DIR)
    if not (pending / BOOTSTRAP_MARK).exists():
        shutil.rmtree(pending, ignore_errors=True)


def launch_bootstrap(host: HostPorts, channel: Path, installer_url: str,
                     detail: Callable[[str], None]) -> None:
    """Start the repo's tool install in the guest's background and say where its log is."""
    log = host.agent.start_bootstrap(channel=channel, workdir=WORKSPACE_GUEST_PATH,
                                     installer_url=installer_url)
    detail(f"installing the repo's tools in the background; log in the guest: {log}")


def _tool_bootstrap(ctx: StartContext) -> None:
    launch_bootstrap(ctx.host, _channel(ctx), ctx.config.installer_url, ctx.detail)
    shutil.rmtree(ctx.paths.pending_workspace, ignore_errors=True)


class VmmStuck(RuntimeError):
    pass


def _tail(path: Path, lines: int = 10) -> str:
    try:
        last = tail_lines(path, lines)
    except OSError:
        return "  (no log)"
    return "\n".join("  " + line for line in last) or "  (empty)"

