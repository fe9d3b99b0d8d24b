"""The QEMU driver's command line: the driver-neutral :class:`~banger.ports.LaunchSpec` as
a ``qemu-system-x86_64`` microvm argv (:func:`qemu_argv`), with the kernel arguments
banger's init reads (:func:`kernel_cmdline`, :func:`guest_net_args`). Pure apart from
reading the host's TSC rate; :mod:`banger.host.qemu` starts the process.

The command line confines QEMU (the guest's way out):

- ``-sandbox`` (:data:`SANDBOX`): a seccomp filter denying obsolete system calls,
  set*uid/gid, fork/exec and scheduler/resource changes.
- It names no file of banger's: every file is an inherited descriptor (:class:`VmmFds`:
  ``-add-fd`` fd sets, ``/proc/self/fd``, ``-chardev socket,fd=``, the tap as
  ``-netdev tap,fd=``), opened by :func:`banger.host.qemu.launch`.
- Every path in an option value is comma-escaped (``,`` -> ``,,``, QEMU's own escape): a
  comma in BANGER_HOME cannot inject options.

Each fd set's ``opaque`` names the file it holds, so the command line still says which VM
a QEMU serves; :func:`banger.host.vmmproc.find_qemu_pid` finds it again by the QMP
socket's entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from banger.host.vmmproc import QMP_TAG
from banger.model.vm import ResourceNames
from banger.ports import LaunchSpec, NetAttachment, TapNet

QEMU = "qemu-system-x86_64"
# sun_path is 108 bytes including the terminating NUL.
UNIX_PATH_MAX = 107
# Translation-block cache per VM under TCG: QEMU's default (1 GiB) costs ~100 MiB more
# RSS per VM for no boot-time gain (HOST-FACTS); 64 MiB leaves room for real workloads.
DEFAULT_TB_SIZE_MIB = 64
# seccomp mode 2 with every optional deny QEMU 7.2 offers (checked against Debian 12's
# qemu-system-x86 7.2: the guest boots, QMP, hostfwd and taps work under it).
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
# The virtio-serial port the guest agent looks for by name (banger-agent.c, open_port).
AGENT_PORT = "banger.agent"
# The fd sets of the files QEMU is handed (``-add-fd``); see VmmFds.
FDSET_ROOT, FDSET_BASE, FDSET_WORK, FDSET_SERIAL, FDSET_QMP = 1, 2, 3, 4, 5


class VmmError(Exception):
    """The VMM could not be started or died on start."""


@dataclass(frozen=True)
class VmmFds:
    """The descriptors :func:`banger.host.qemu.launch` opened for QEMU, as numbered in
    the child."""

    root: int    # the qcow2 overlay, read-write
    work: int    # the work disk, read-write
    serial: int  # the serial log, write-only (append)
    kernel: int
    initrd: int | None  # None: the kernel mounts its root disk itself
    qmp: int     # the bound, listening QMP socket
    qmp_tag: int  # a second descriptor of it, listed with its path (for find_qemu_pid)
    agent: int   # the bound, listening socket of the guest agent's channel
    base: int | None = None  # the base image, read-only
    tap: int | None = None   # the tap, attached (TUNSETIFF) by the daemon

    def all(self) -> list[int]:
        fds = [self.root, self.work, self.serial, self.kernel, self.qmp, self.qmp_tag,
               self.agent]
        return fds + [fd for fd in (self.initrd, self.base, self.tap) if fd is not None]


def opt_value(value: object) -> str:
    """``value`` as one QEMU option value: QEMU's escape for a literal comma is ``,,``."""
    return str(value).replace(",", ",,")


def host_tsc_khz(cpuinfo: Path = Path("/proc/cpuinfo")) -> int:
    """The host TSC rate from "cpu MHz": microvm guests hang calibrating without it."""
    for line in cpuinfo.read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "cpu MHz":
            return round(float(value) * 1000)
    raise VmmError(f"no 'cpu MHz' in {cpuinfo}: cannot set tsc_early_khz")


def agent_socket(spec: LaunchSpec) -> Path:
    """Where the host end of the guest agent's channel goes: in the VM's runtime dir."""
    return (spec.runtime_dir / ResourceNames(spec.vm_id).agent_socket).absolute()


def check_socket_path(path: Path, what: str) -> None:
    if len(str(path)) > UNIX_PATH_MAX:
        raise VmmError(f"{what} path is {len(str(path))} bytes, over the "
                       f"{UNIX_PATH_MAX}-byte Unix socket limit: {path} (use a shorter "
                       f"BANGER_RUNTIME_DIR or XDG_RUNTIME_DIR)")


def guest_net_args(net: NetAttachment) -> str:
    """The kernel arguments that tell banger's init (host/guest/banger-init) how to bring
    up eth0: QEMU's user network (its fixed 10.0.2.15 via 10.0.2.2), or the tap's static
    address, gateway and resolver (the cloud kernel has no IP autoconfig)."""
    if isinstance(net, TapNet):
        return (f"banger.net=tap banger.ip={net.address} banger.gw={net.gateway} "
                f"banger.dns={net.resolver}")
    return "banger.net=user"


def kernel_cmdline(spec: LaunchSpec, tsc_khz: int) -> str:
    """The kernel arguments: the VMM's own, the network's and the guest settings', then
    the image's (which name its init, e.g. ``init=/sbin/banger-init
    banger.init=systemd``)."""
    args = [
        # rootfstype: a kernel without an initramfs would otherwise try every filesystem.
        "console=ttyS0", "root=/dev/vda", "rootfstype=ext4", "rw",
        f"tsc_early_khz={tsc_khz}",
        # Boot-time savers under emulation: no crypto self-tests, one UART to probe,
        # quiet console (every character costs an emulated UART write).
        "quiet", "cryptomgr.notests", "8250.nr_uarts=1", "random.trust_cpu=on",
        # A panicking guest reboots at once, which -no-reboot turns into a VMM exit:
        # the daemon sees a dead VM instead of a hung one.
        "panic=-1",
        guest_net_args(spec.net), f"banger.hostname={spec.guest.hostname}",
    ]
    if spec.vcpus > 1:
        args.append("tsc=reliable")
    if spec.boot.cmdline.strip():
        args.append(spec.boot.cmdline.strip())
    return " ".join(args)


def qemu_argv(spec: LaunchSpec, fds: VmmFds, *, accel: str, tsc_khz: int | None = None,
              tb_size_mib: int = DEFAULT_TB_SIZE_MIB) -> list[str]:
    """The full command line for ``spec`` under ``accel`` ("kvm" | "tcg") given the
    descriptors :func:`banger.host.qemu.launch` opened; pure apart from reading the host
    TSC rate."""
    if accel not in ("kvm", "tcg"):
        raise ValueError(f"accel must be 'kvm' or 'tcg', not {accel!r}")
    if spec.restore is not None:
        raise VmmError("the qemu driver cannot restore a snapshot: boot the VM instead")
    if spec.work.backing is not None:
        raise ValueError("the work disk is a raw file and takes no backing file")
    qmp = spec.control_socket.absolute()
    check_socket_path(qmp, "QMP socket")
    check_socket_path(agent_socket(spec), "guest agent socket")
    if tsc_khz is None:
        tsc_khz = host_tsc_khz()
    accel_opt = "kvm" if accel == "kvm" else f"tcg,tb-size={tb_size_mib}"
    net = spec.net
    if isinstance(net, TapNet):
        # The tap exists and sits on the bridge; the daemon attached to it (QEMU's user
        # could not: the tap has no owner and /dev/net/tun may be root's alone).
        if fds.tap is None:
            raise ValueError("a tap needs its descriptor (VmmFds.tap)")
        netdev = f"tap,id=n0,fd={fds.tap}"
    else:
        netdev = f"user,id=n0,hostfwd=tcp:127.0.0.1:{net.ssh_port}-:22"
        if not net.outbound:
            # No outbound traffic from the guest; the forwarded port still works.
            netdev += ",restrict=on"
    mac = net.mac if isinstance(net, TapNet) else None
    nic = "virtio-net-device,netdev=n0" + (f",mac={opt_value(mac)}" if mac else "")
    root_backing = ""
    base: list[str] = []
    if spec.root.backing is not None:
        if fds.base is None:
            raise ValueError("a base image needs its descriptor (VmmFds.base)")
        root_backing = ",backing=base"
        base = [*_add_fd(fds.base, FDSET_BASE, spec.root.backing),
                "-blockdev", f"driver=file,node-name=base-file,filename=/dev/fdset/{FDSET_BASE},"
                             "read-only=on",
                "-blockdev", "driver=raw,node-name=base,file=base-file,read-only=on"]
    return [
        QEMU,
        "-name", f"banger-{opt_value(spec.guest.hostname)}",
        "-sandbox", SANDBOX,
        # microvm: no PCI, no firmware tables beyond what ACPI needs to list the
        # virtio-mmio devices; the fastest machine here.
        "-M", "microvm,acpi=on",
        # max: without it an idle microvm guest burns 5-7 % of a core under TCG.
        "-cpu", "max",
        "-accel", accel_opt,
        "-smp", str(spec.vcpus),
        "-m", f"{spec.memory_mib}M",
        "-nodefaults", "-no-user-config", "-display", "none",
        # Guest reboot or poweroff ends the process: a VM stops from inside.
        "-no-reboot",
        # Plain file names (not option lists); QEMU re-opens the inherited descriptors.
        "-kernel", f"/proc/self/fd/{fds.kernel}",
        *([] if fds.initrd is None else ["-initrd", f"/proc/self/fd/{fds.initrd}"]),
        "-append", kernel_cmdline(spec, tsc_khz),
        *base,
        # Device order fixes the guest names: root disk /dev/vda, work disk /dev/vdb.
        *_add_fd(fds.root, FDSET_ROOT, spec.root.path),
        "-blockdev", f"driver=file,node-name=root-file,filename=/dev/fdset/{FDSET_ROOT},"
                     "discard=unmap",
        "-blockdev", f"driver=qcow2,node-name=root,file=root-file{root_backing},"
                     "discard=unmap",
        "-device", "virtio-blk-device,drive=root",
        *_add_fd(fds.work, FDSET_WORK, spec.work.path),
        "-blockdev", f"driver=file,node-name=work-file,filename=/dev/fdset/{FDSET_WORK},"
                     "discard=unmap",
        "-blockdev", "driver=raw,node-name=work,file=work-file,discard=unmap",
        "-device", "virtio-blk-device,drive=work",
        "-netdev", netdev,
        "-device", nic,
        *_add_fd(fds.serial, FDSET_SERIAL, spec.serial_log),
        # append=on: O_APPEND, so the daemon's copy-truncate rotation (host/seriallog.py)
        # leaves no hole, and nothing is lost if the file is ever reused.
        "-chardev", f"file,id=serial0,path=/dev/fdset/{FDSET_SERIAL},append=on",
        "-serial", "chardev:serial0",
        "-add-fd", f"fd={fds.qmp_tag},set={FDSET_QMP},opaque={QMP_TAG}{opt_value(qmp)}",
        "-chardev", f"socket,id=qmp,fd={fds.qmp},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        # The guest agent's channel: a virtio-serial port the agent finds by its name,
        # whose host end is a socket the daemon bound (QEMU accepts the daemon on it).
        "-device", "virtio-serial-device",
        "-chardev", f"socket,id=agent,fd={fds.agent},server=on,wait=off",
        "-device", f"virtserialport,chardev=agent,name={AGENT_PORT}",
    ]


def _add_fd(fd: int, fdset: int, path: Path) -> list[str]:
    # The opaque string only documents which file the set holds (ps, find_qemu_pid).
    return ["-add-fd", f"fd={fd},set={fdset},opaque={opt_value(path.absolute())}"]
