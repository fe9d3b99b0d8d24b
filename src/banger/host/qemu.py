"""The QEMU driver: the command line, the detached VMM process, QMP, and finding it again.

Owns everything about a ``qemu-system-x86_64`` process: :func:`qemu_argv` (pure) turns the
driver-neutral :class:`~banger.ports.LaunchSpec` into a microvm command line and
:func:`kernel_cmdline` into the kernel arguments the guest's init reads, :func:`launch`
starts it so that it outlives the daemon, the QMP helpers talk to it with bounded waits,
and the pid helpers observe it from ``/proc`` (a recycled pid is never taken for our VM).

QEMU is the guest's way out, so it is confined:

- ``-sandbox`` (:data:`SANDBOX`): a seccomp filter denying obsolete system calls,
  set*uid/gid, fork/exec and scheduler/resource changes.
- It opens no file of banger's by name. :func:`launch` opens the disks, the serial log
  and the kernel and initrd, binds the QMP socket, and hands them over as inherited
  descriptors (``-add-fd`` fd sets, ``/proc/self/fd``, ``-chardev socket,fd=``, the tap
  as ``-netdev tap,fd=``). So under
  a root daemon QEMU runs as an unprivileged user (:mod:`banger.host.vmmuser`) that can
  reach nothing of banger's state (private 0700 directories, 0600 files), not even the
  other VMs' disks; only the kernel and initrd must be world-readable (QEMU re-opens them
  through ``/proc/self/fd``, which checks the file's own permission bits).
- Every path in an option value is comma-escaped (``,`` -> ``,,``, QEMU's own escape): a
  comma in BANGER_HOME cannot inject options.

Each fd set's ``opaque`` names the file it holds, so the command line still says which VM
a QEMU serves; :func:`find_qemu_pid` finds it again by the QMP socket's entry.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from banger.host.vmmproc import QMP_TAG, find_qemu_pid, kill_and_wait, qmp_status
from banger.host.vmmuser import RunAs
from banger.ports import LaunchSpec, NetAttachment, TapNet

QEMU = "qemu-system-x86_64"
# sun_path is 108 bytes including the terminating NUL.
UNIX_PATH_MAX = 107
# Translation-block cache per VM under TCG: QEMU's default (1 GiB) costs ~100 MiB more
# RSS per VM for no boot-time gain (HOST-FACTS); 64 MiB leaves room for real workloads.
DEFAULT_TB_SIZE_MIB = 64
# A VMM that dies this early was misconfigured, not shut down.
EARLY_EXIT_WINDOW = 0.3
QMP_SOCKET_WAIT = 5.0
# seccomp mode 2 with every optional deny QEMU 7.2 offers (checked against Debian 12's
# qemu-system-x86 7.2: the guest boots, QMP, hostfwd and taps work under it).
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
# The fd sets of the files QEMU is handed (``-add-fd``); see VmmFds.
FDSET_ROOT, FDSET_BASE, FDSET_WORK, FDSET_SERIAL, FDSET_QMP = 1, 2, 3, 4, 5

class VmmError(Exception):
    """The VMM could not be started or died on start."""


class HostPortBusy(VmmError):
    """The forwarded SSH port was taken between choosing and binding it: retry."""


@dataclass(frozen=True)
class VmmFds:
    """The descriptors :func:`launch` opened for QEMU, as numbered in the child."""

    root: int    # the qcow2 overlay, read-write
    work: int    # the work disk, read-write
    serial: int  # the serial log, write-only (append)
    kernel: int
    initrd: int
    qmp: int     # the bound, listening QMP socket
    qmp_tag: int  # a second descriptor of it, listed with its path (for find_qemu_pid)
    base: int | None = None  # the base image, read-only
    tap: int | None = None   # the tap, attached (TUNSETIFF) by the daemon

    def all(self) -> list[int]:
        fds = [self.root, self.work, self.serial, self.kernel, self.initrd, self.qmp,
               self.qmp_tag]
        return fds + [fd for fd in (self.base, self.tap) if fd is not None]


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
        "console=ttyS0", "root=/dev/vda", "rw",
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
    descriptors :func:`launch` opened; pure apart from reading the host TSC rate."""
    if accel not in ("kvm", "tcg"):
        raise ValueError(f"accel must be 'kvm' or 'tcg', not {accel!r}")
    if spec.restore is not None:
        raise VmmError("the qemu driver cannot restore a snapshot: boot the VM instead")
    if spec.work.backing is not None:
        raise ValueError("the work disk is a raw file and takes no backing file")
    qmp = spec.control_socket.absolute()
    if len(str(qmp)) > UNIX_PATH_MAX:
        raise VmmError(f"QMP socket path is {len(str(qmp))} bytes, over the "
                       f"{UNIX_PATH_MAX}-byte Unix socket limit: {qmp}")
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
        "-initrd", f"/proc/self/fd/{fds.initrd}",
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
    ]


def _add_fd(fd: int, fdset: int, path: Path) -> list[str]:
    # The opaque string only documents which file the set holds (ps, find_qemu_pid).
    return ["-add-fd", f"fd={fd},set={fdset},opaque={opt_value(path.absolute())}"]


# --- the process -----------------------------------------------------------------------


def launch(spec: LaunchSpec, accel: str, runas: RunAs | None = None) -> int:
    """Start QEMU for ``spec`` under ``accel`` detached from the caller (own session, no
    tty) and return its pid.

    ``runas``: the unprivileged identity to start it as (None: the caller's). The files
    QEMU uses are opened here and inherited, so ``runas`` needs no access to them.
    Returns once QMP answers; raises :class:`VmmError` with the tail of the VMM log if
    QEMU exits or does not answer in time.
    """
    vmm_log = spec.vmm_log
    qmp = spec.control_socket.absolute()
    other = find_qemu_pid(qmp)
    if other is not None:
        raise VmmError(f"a QEMU (pid {other}) is already running with {qmp}")
    vmm_log.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as opened, vmm_log.open("ab") as log, \
            open(os.devnull, "rb") as devnull:
        try:
            fds = _open_for_qemu(spec, runas, opened)
            argv = qemu_argv(spec, fds, accel=accel)
        except BaseException:
            qmp.unlink(missing_ok=True)  # bound by _open_for_qemu, for a QEMU never started
            raise
        log.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} launching"
                  f"{' as ' + runas.name if runas else ''}: {' '.join(argv)}\n".encode())
        log.flush()
        try:
            # user/group/extra_groups: the identity is set before exec, never after.
            proc = subprocess.Popen(
                argv, stdin=devnull, stdout=log, stderr=log, start_new_session=True,
                close_fds=True, pass_fds=fds.all(),
                user=runas.uid if runas else None, group=runas.gid if runas else None,
                extra_groups=list(runas.groups) if runas else None)
        except OSError as exc:
            qmp.unlink(missing_ok=True)
            raise VmmError(f"cannot run {QEMU}: {exc}") from exc
    # Reap it when it exits, so a dead VMM never lingers as a zombie of the daemon.
    threading.Thread(target=proc.wait, name=f"reap-qemu-{proc.pid}", daemon=True).start()
    started = time.monotonic()
    while True:
        code = proc.poll()
        if code is not None:
            qmp.unlink(missing_ok=True)
            _raise_died(vmm_log, code, time.monotonic() - started)
        # The socket is bound already (by us): QEMU is up once its monitor greets.
        if (time.monotonic() - started >= EARLY_EXIT_WINDOW
                and qmp_status(qmp, timeout=0.5) is not None):
            return proc.pid
        if time.monotonic() - started > QMP_SOCKET_WAIT:
            kill_and_wait(proc.pid, signal.SIGKILL, 2.0)
            qmp.unlink(missing_ok=True)
            raise VmmError(f"QEMU (pid {proc.pid}) did not answer on its QMP socket {qmp} "
                           f"within {QMP_SOCKET_WAIT:.0f} s; killed it.\n"
                           f"{log_tail(vmm_log)}")
        time.sleep(0.02)


def _open_for_qemu(spec: LaunchSpec, runas: RunAs | None,
                   opened: contextlib.ExitStack) -> VmmFds:
    """Open everything QEMU uses, closed by ``opened`` (QEMU keeps its inherited copies)."""
    def fd(path: Path, flags: int) -> int:
        try:
            n = os.open(path, flags | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise VmmError(f"cannot open {path} for QEMU: {exc.strerror}") from exc
        opened.callback(os.close, n)
        return n

    for path in (spec.boot.kernel, spec.boot.initrd):
        # QEMU re-opens these through /proc/self/fd, which checks the file's own mode.
        if runas is not None and not runas.can_access(path, os.R_OK):
            raise VmmError(f"{path} is not readable by QEMU's user {runas.name!r}: "
                           f"QEMU loads the kernel and initrd itself; make them "
                           f"world-readable (chmod o+r {path})")
    rw = os.O_RDWR
    kernel, initrd = fd(spec.boot.kernel, os.O_RDONLY), fd(spec.boot.initrd, os.O_RDONLY)
    root, work = fd(spec.root.path, rw), fd(spec.work.path, rw)
    backing = spec.root.backing
    base = fd(backing, os.O_RDONLY) if backing is not None else None
    # Write-only, as QEMU asks its fd set for it (it applies its own append or truncate).
    serial = fd(spec.serial_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    qmp = spec.control_socket.absolute()
    with contextlib.suppress(FileNotFoundError):
        qmp.unlink()  # stale, from a VMM that died without cleaning up
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    opened.callback(sock.close)
    try:
        sock.bind(str(qmp))
        sock.listen(8)
    except OSError as exc:
        raise VmmError(f"cannot listen on the QMP socket {qmp}: {exc.strerror}") from exc
    tag = os.dup(sock.fileno())
    opened.callback(os.close, tag)
    tap = _attach_tap(spec.net.tap, opened) if isinstance(spec.net, TapNet) else None
    return VmmFds(root=root, work=work, serial=serial, kernel=kernel, initrd=initrd,
                  qmp=sock.fileno(), qmp_tag=tag, base=base, tap=tap)


_TUNSETIFF = 0x400454CA
_IFF_TAP, _IFF_NO_PI, _IFF_VNET_HDR = 0x0002, 0x1000, 0x4000


def _attach_tap(name: str, opened: contextlib.ExitStack) -> int:
    """Open the existing tap ``name`` as QEMU would (``tap,ifname=``), for QEMU to inherit."""
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise VmmError(f"cannot open /dev/net/tun for the tap {name}: {exc.strerror}") from exc
    opened.callback(os.close, fd)
    # struct ifreq: the name, then the flags; virtio-net headers as QEMU asks for them.
    ifreq = struct.pack("16sH22x", name.encode(), _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR)
    try:
        fcntl.ioctl(fd, _TUNSETIFF, ifreq)
    except OSError as exc:
        raise VmmError(f"cannot attach to the tap {name}: {exc.strerror}") from exc
    return fd


def _raise_died(vmm_log: Path, code: int, after: float) -> None:
    tail = log_tail(vmm_log)
    msg = f"QEMU exited with status {code} {after:.1f} s after launch; {vmm_log}:\n{tail}"
    if "host forwarding rule" in tail:
        raise HostPortBusy(msg)
    raise VmmError(msg)


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode(errors="replace")
    except OSError as exc:
        return f"({path}: {exc.strerror})"
    return "\n".join(text.splitlines()[-lines:])
