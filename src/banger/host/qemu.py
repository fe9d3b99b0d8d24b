"""The QEMU driver: the command line, the detached VMM process, QMP, and finding it again.

Owns everything about a ``qemu-system-x86_64`` process: :func:`qemu_argv` (pure) turns a
:class:`QemuConfig` into a microvm command line, :func:`launch` starts it so that it
outlives the daemon, the QMP helpers talk to it with bounded waits, and the pid helpers
observe it from ``/proc`` (a recycled pid is never taken for our VM).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

QEMU = "qemu-system-x86_64"
# sun_path is 108 bytes including the terminating NUL.
UNIX_PATH_MAX = 107
# Translation-block cache per VM under TCG: QEMU's default (1 GiB) costs ~100 MiB more
# RSS per VM for no boot-time gain (HOST-FACTS); 64 MiB leaves room for real workloads.
DEFAULT_TB_SIZE_MIB = 64
# A VMM that dies this early was misconfigured, not shut down.
EARLY_EXIT_WINDOW = 0.3
QMP_SOCKET_WAIT = 5.0

T = TypeVar("T")


class VmmError(Exception):
    """The VMM could not be started or died on start."""


class HostPortBusy(VmmError):
    """The forwarded SSH port was taken between choosing and binding it: retry."""


@dataclass(frozen=True)
class QemuConfig:
    kernel: Path
    initrd: Path
    root_disk: Path  # qcow2 overlay
    work_disk: Path  # raw ext4
    vcpus: int
    memory_mib: int
    ssh_port: int
    serial_log: Path
    qmp_socket: Path
    accel: str  # "kvm" | "tcg"
    hostname: str
    cmdline: str = ""  # appended last: the image's and the caller's extra kernel args
    restrict_net: bool = True
    tb_size_mib: int = DEFAULT_TB_SIZE_MIB
    # Tap networking: the host tap to attach and the guest's MAC; ``net_args`` tell the
    # guest's init its address (the cloud kernel has no IP autoconfig).
    tap: str | None = None
    mac: str | None = None
    net_args: str = "banger.net=user"


def host_tsc_khz(cpuinfo: Path = Path("/proc/cpuinfo")) -> int:
    """The host TSC rate from "cpu MHz": microvm guests hang calibrating without it."""
    for line in cpuinfo.read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "cpu MHz":
            return round(float(value) * 1000)
    raise VmmError(f"no 'cpu MHz' in {cpuinfo}: cannot set tsc_early_khz")


def kernel_cmdline(cfg: QemuConfig, tsc_khz: int) -> str:
    """The kernel arguments: the VMM's own, then ``cfg.cmdline`` (the image's, which
    names its init, e.g. ``init=/sbin/banger-init banger.init=systemd``, and the
    caller's)."""
    args = [
        "console=ttyS0", "root=/dev/vda", "rw",
        f"tsc_early_khz={tsc_khz}",
        # Boot-time savers under emulation: no crypto self-tests, one UART to probe,
        # quiet console (every character costs an emulated UART write).
        "quiet", "cryptomgr.notests", "8250.nr_uarts=1", "random.trust_cpu=on",
        # A panicking guest reboots at once, which -no-reboot turns into a VMM exit:
        # the daemon sees a dead VM instead of a hung one.
        "panic=-1",
        cfg.net_args, f"banger.hostname={cfg.hostname}",
    ]
    if cfg.vcpus > 1:
        args.append("tsc=reliable")
    if cfg.cmdline.strip():
        args.append(cfg.cmdline.strip())
    return " ".join(args)


def qemu_argv(cfg: QemuConfig, *, tsc_khz: int | None = None) -> list[str]:
    """The full command line for ``cfg``; pure apart from reading the host TSC rate."""
    if cfg.accel not in ("kvm", "tcg"):
        raise ValueError(f"accel must be 'kvm' or 'tcg', not {cfg.accel!r}")
    qmp = cfg.qmp_socket.absolute()
    if len(str(qmp)) > UNIX_PATH_MAX:
        raise VmmError(f"QMP socket path is {len(str(qmp))} bytes, over the "
                       f"{UNIX_PATH_MAX}-byte Unix socket limit: {qmp}")
    if tsc_khz is None:
        tsc_khz = host_tsc_khz()
    accel = "kvm" if cfg.accel == "kvm" else f"tcg,tb-size={cfg.tb_size_mib}"
    if cfg.tap is not None:
        # The tap exists and sits on the bridge already; QEMU only opens it.
        netdev = f"tap,id=n0,ifname={cfg.tap},script=no,downscript=no"
    else:
        netdev = f"user,id=n0,hostfwd=tcp:127.0.0.1:{cfg.ssh_port}-:22"
        if cfg.restrict_net:
            # No outbound traffic from the guest; the forwarded port still works.
            netdev += ",restrict=on"
    nic = "virtio-net-device,netdev=n0" + (f",mac={cfg.mac}" if cfg.mac else "")
    return [
        QEMU,
        "-name", f"banger-{cfg.hostname}",
        # microvm: no PCI, no firmware tables beyond what ACPI needs to list the
        # virtio-mmio devices; the fastest machine here.
        "-M", "microvm,acpi=on",
        # max: without it an idle microvm guest burns 5-7 % of a core under TCG.
        "-cpu", "max",
        "-accel", accel,
        "-smp", str(cfg.vcpus),
        "-m", f"{cfg.memory_mib}M",
        "-nodefaults", "-no-user-config", "-display", "none",
        # Guest reboot or poweroff ends the process: a VM stops from inside.
        "-no-reboot",
        "-kernel", str(cfg.kernel.absolute()),
        "-initrd", str(cfg.initrd.absolute()),
        "-append", kernel_cmdline(cfg, tsc_khz),
        # Device order fixes the guest names: root disk /dev/vda, work disk /dev/vdb.
        "-drive", f"id=root,file={_drive_path(cfg.root_disk)},format=qcow2,if=none,"
                  "discard=unmap",
        "-device", "virtio-blk-device,drive=root",
        "-drive", f"id=work,file={_drive_path(cfg.work_disk)},format=raw,if=none,"
                  "discard=unmap",
        "-device", "virtio-blk-device,drive=work",
        "-netdev", netdev,
        "-device", nic,
        # append=on: O_APPEND, so the daemon's copy-truncate rotation (host/seriallog.py)
        # leaves no hole, and nothing is lost if the file is ever reused.
        "-chardev", f"file,id=serial0,path={cfg.serial_log.absolute()},append=on",
        "-serial", "chardev:serial0",
        "-qmp", f"unix:{qmp},server=on,wait=off",
    ]


def _drive_path(p: Path) -> str:
    # -drive splits on commas; QEMU's escape for a literal comma is a double comma.
    return str(p.absolute()).replace(",", ",,")


# --- the process -----------------------------------------------------------------------


def launch(cfg: QemuConfig, vmm_log: Path) -> int:
    """Start QEMU detached from the caller (own session, no tty) and return its pid.

    Returns once the QMP socket is up; raises :class:`VmmError` with the tail of
    ``vmm_log`` if QEMU exits or the socket does not appear in time.
    """
    argv = qemu_argv(cfg)
    qmp = cfg.qmp_socket.absolute()
    other = find_qemu_pid(qmp)
    if other is not None:
        raise VmmError(f"a QEMU (pid {other}) is already running with {qmp}")
    with contextlib.suppress(FileNotFoundError):
        qmp.unlink()  # stale, from a VMM that died without cleaning up
    vmm_log.parent.mkdir(parents=True, exist_ok=True)
    with vmm_log.open("ab") as log, open(os.devnull, "rb") as devnull:
        log.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} launching: "
                  f"{' '.join(argv)}\n".encode())
        log.flush()
        try:
            proc = subprocess.Popen(argv, stdin=devnull, stdout=log, stderr=log,
                                    start_new_session=True, close_fds=True)
        except OSError as exc:
            raise VmmError(f"cannot run {QEMU}: {exc}") from exc
    # Reap it when it exits, so a dead VMM never lingers as a zombie of the daemon.
    threading.Thread(target=proc.wait, name=f"reap-qemu-{proc.pid}", daemon=True).start()
    started = time.monotonic()
    while True:
        code = proc.poll()
        if code is not None:
            _raise_died(vmm_log, code, time.monotonic() - started)
        if qmp.exists() and time.monotonic() - started >= EARLY_EXIT_WINDOW:
            return proc.pid
        if time.monotonic() - started > QMP_SOCKET_WAIT:
            kill_and_wait(proc.pid, signal.SIGKILL, 2.0)
            raise VmmError(f"QEMU (pid {proc.pid}) did not open its QMP socket {qmp} "
                           f"within {QMP_SOCKET_WAIT:.0f} s; killed it.\n"
                           f"{log_tail(vmm_log)}")
        time.sleep(0.02)


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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def port_is_free(port: int) -> bool:
    """True if a listener could bind ``port`` on 127.0.0.1 now (as QEMU's forward does,
    with SO_REUSEADDR: connections of a finished VM lingering in TIME_WAIT do not
    count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie.

    A killed multi-threaded process (QEMU) shows its main thread as a zombie while the
    other threads still tear down and hold its sockets and files: it is dead only once
    no thread of it is left running.
    """
    state = _state(Path(f"/proc/{pid}/stat"))
    if state is None:
        return False
    if state not in ("Z", "X"):
        return True
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    return any(_state(Path(f"/proc/{pid}/task/{t}/stat")) not in (None, "Z", "X")
               for t in tasks if t != str(pid))


def _state(stat_file: Path) -> str | None:
    try:
        stat = stat_file.read_text()
    except OSError:
        return None
    # The state follows the command name, which may itself hold spaces and parens.
    fields = stat.rpartition(")")[2].split()
    return fields[0] if fields else None


def pid_is_qemu_for(pid: int, qmp_socket: Path) -> bool:
    """True if ``pid`` is a live QEMU whose command line names ``qmp_socket``."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    args = raw.rstrip(b"\0").split(b"\0")
    if not args or not os.path.basename(args[0]).startswith(b"qemu-system"):
        return False
    want = f"unix:{qmp_socket.absolute()}".encode()
    if not any(a == want or a.startswith(want + b",") for a in args):
        return False
    return pid_alive(pid)


def find_qemu_pid(qmp_socket: Path) -> int | None:
    """The pid of the running QEMU that serves ``qmp_socket``, found by scanning /proc."""
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and pid_is_qemu_for(int(entry.name), qmp_socket):
            return int(entry.name)
    return None


def kill_and_wait(pid: int, sig: int, timeout: float) -> bool:
    """Send ``sig`` and wait up to ``timeout`` s for the process to go; True if gone."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + timeout
    while True:
        _reap(pid)
        if not pid_alive(pid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def _reap(pid: int) -> None:
    """Collect ``pid`` if it is our own exited child (no-op otherwise)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


# --- QMP -------------------------------------------------------------------------------


def qmp_status(sock: Path, timeout: float = 2.0) -> str | None:
    """The VM run state ("running", "paused", ...), or None if QMP does not answer."""
    async def status(client: Any) -> str:
        res = await client.execute("query-status")
        return str(res["status"])

    try:
        return _qmp_call(sock, status, timeout)
    except Exception:
        return None


def qmp_quit(sock: Path, timeout: float = 2.0) -> bool:
    """Ask QEMU to exit now (no guest shutdown); True if the command was accepted."""
    async def quit_(client: Any) -> bool:
        await client.execute("quit")
        return True

    try:
        return _qmp_call(sock, quit_, timeout)
    except Exception:
        return False


def qmp_command(sock: Path, command: str, arguments: dict[str, object] | None = None,
                timeout: float = 2.0) -> object:
    """Run one QMP command and return its result; raises on any failure."""
    async def call(client: Any) -> object:
        return await client.execute(command, arguments)

    return _qmp_call(sock, call, timeout)


def _qmp_call(sock: Path, fn: Callable[[Any], Awaitable[T]], timeout: float) -> T:
    # qemu.qmp's sync shim (legacy.QEMUMonitorProtocol) cannot bound the connect and
    # greeting; a wedged QEMU would hang the caller. The asyncio client under
    # wait_for can.
    from qemu.qmp import QMPClient

    async def session() -> T:
        client = QMPClient("banger")
        try:
            await asyncio.wait_for(client.connect(str(sock.absolute())), timeout)
            return await asyncio.wait_for(fn(client), timeout)
        finally:
            # After "quit" QEMU hangs up first; that is not a failure.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.disconnect(), timeout)

    if not sock.exists():
        raise FileNotFoundError(sock)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(session())
    # Called from inside an event loop (e.g. an async route): use a private loop in a
    # helper thread rather than nesting loops.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, session()).result()


_HOSTFWD = re.compile(rb"hostfwd=tcp:127\.0\.0\.1:(\d+)-:22")


def ssh_port_of(pid: int) -> int | None:
    """The forwarded SSH port in a running QEMU's command line (handles rediscovery)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    m = _HOSTFWD.search(raw)
    return int(m.group(1)) if m else None
