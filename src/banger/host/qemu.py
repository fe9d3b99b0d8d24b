"""The QEMU driver's process: started detached from the daemon, confined, handed its files.

:func:`launch` starts ``qemu-system-x86_64`` with the command line of
:mod:`banger.host.qemu_cmdline` so that it outlives the daemon, and returns once QMP
answers; :mod:`banger.host.vmmproc` observes, asks and stops it afterwards.

QEMU is the guest's way out, so it opens no file of banger's by name: :func:`launch` opens
the disks, the serial log and the kernel and initrd, binds the QMP socket, attaches the
tap, and hands them over as inherited descriptors. So under a root daemon QEMU runs as an
unprivileged user (:mod:`banger.host.vmmuser`) that can reach nothing of banger's state
(private 0700 directories, 0600 files), not even the other VMs' disks; only the kernel
and initrd must be world-readable (QEMU re-opens them through ``/proc/self/fd``, which
checks the file's own permission bits).
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
from pathlib import Path

from banger.host.qemu_cmdline import QEMU, VmmError, VmmFds, agent_socket, qemu_argv
from banger.host.vmmproc import find_qemu_pid, kill_and_wait, qmp_status
from banger.host.vmmuser import RunAs
from banger.local.logtail import tail_lines
from banger.ports import LaunchSpec, TapNet

# A VMM that dies this early was misconfigured, not shut down.
EARLY_EXIT_WINDOW = 0.3
QMP_SOCKET_WAIT = 5.0


class HostPortBusy(VmmError):
    """The forwarded SSH port was taken between choosing and binding it: retry."""


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
    agent = agent_socket(spec)

    def unlink_sockets() -> None:
        # Bound by _open_for_qemu, for a QEMU that never started or died on start.
        qmp.unlink(missing_ok=True)
        agent.unlink(missing_ok=True)

    with contextlib.ExitStack() as opened, vmm_log.open("ab") as log, \
            open(os.devnull, "rb") as devnull:
        try:
            fds = _open_for_qemu(spec, runas, opened)
            argv = qemu_argv(spec, fds, accel=accel)
        except BaseException:
            unlink_sockets()
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
            unlink_sockets()
            raise VmmError(f"cannot run {QEMU}: {exc}") from exc
    # Reap it when it exits, so a dead VMM never lingers as a zombie of the daemon.
    threading.Thread(target=proc.wait, name=f"reap-qemu-{proc.pid}", daemon=True).start()
    started = time.monotonic()
    while True:
        code = proc.poll()
        if code is not None:
            unlink_sockets()
            _raise_died(vmm_log, code, time.monotonic() - started)
        # The socket is bound already (by us): QEMU is up once its monitor greets.
        if (time.monotonic() - started >= EARLY_EXIT_WINDOW
                and qmp_status(qmp, timeout=0.5) is not None):
            return proc.pid
        if time.monotonic() - started > QMP_SOCKET_WAIT:
            kill_and_wait(proc.pid, signal.SIGKILL, 2.0)
            unlink_sockets()
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

    boot_files = [p for p in (spec.boot.kernel, spec.boot.initrd) if p is not None]
    for path in boot_files:
        # QEMU re-opens these through /proc/self/fd, which checks the file's own mode.
        if runas is not None and not runas.can_access(path, os.R_OK):
            raise VmmError(f"{path} is not readable by QEMU's user {runas.name!r}: "
                           f"QEMU loads the kernel and initrd itself; make them "
                           f"world-readable (chmod o+r {path})")
    rw = os.O_RDWR
    kernel = fd(spec.boot.kernel, os.O_RDONLY)
    initrd = None if spec.boot.initrd is None else fd(spec.boot.initrd, os.O_RDONLY)
    root, work = fd(spec.root.path, rw), fd(spec.work.path, rw)
    backing = spec.root.backing
    base = fd(backing, os.O_RDONLY) if backing is not None else None
    # Write-only, as QEMU asks its fd set for it (it applies its own append or truncate).
    serial = fd(spec.serial_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    sock = _listen(spec.control_socket.absolute(), "the QMP socket", opened)
    tag = os.dup(sock)
    opened.callback(os.close, tag)
    # The agent's channel: QEMU accepts one client at a time on it (the daemon).
    agent = _listen(agent_socket(spec), "the guest agent socket", opened)
    tap = _attach_tap(spec.net.tap, opened) if isinstance(spec.net, TapNet) else None
    return VmmFds(root=root, work=work, serial=serial, kernel=kernel, initrd=initrd,
                  qmp=sock, qmp_tag=tag, agent=agent, base=base, tap=tap)


def _listen(path: Path, what: str, opened: contextlib.ExitStack) -> int:
    """A Unix socket bound at ``path`` (in the VM's 0700 runtime dir) and listening, for
    QEMU to inherit and serve."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # stale, from a VMM that died without cleaning up
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    opened.callback(sock.close)
    try:
        sock.bind(str(path))
        sock.listen(8)
    except OSError as exc:
        raise VmmError(f"cannot listen on {what} {path}: {exc.strerror}") from exc
    return sock.fileno()


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
        return "\n".join(tail_lines(path, lines))
    except OSError as exc:
        return f"({path}: {exc.strerror})"
