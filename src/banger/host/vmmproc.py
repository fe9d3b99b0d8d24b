"""A running QEMU seen from outside: which process serves which VM (from ``/proc``, never
trusting a look-alike of another user), its forwarded ssh port, signals, QMP with bounded
waits, and loopback ports for the forward.

:mod:`banger.host.qemu` builds the command line and starts the process; this module finds,
asks and stops it afterwards (also after a daemon restart, from the id-derived QMP path).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import re
import select
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from banger.host import vmmuser
from banger.ports import VmmUsage

QMP_TAG = "qmp:"  # the QMP fd set's opaque: "qmp:<socket path>"

T = TypeVar("T")


def split_opts(value: str) -> dict[str, str]:
    """A QEMU option list (``a=1,b=x,,y``) as a dict, un-escaping ``,,``."""
    out: dict[str, str] = {}
    for part in value.replace(",,", "\0").split(","):
        key, _, val = part.partition("=")
        out[key.replace("\0", ",")] = val.replace("\0", ",")
    return out


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


def usage(pid: int) -> VmmUsage | None:
    """The process's resident memory (``VmRSS`` of /proc/<pid>/status) and its CPU time
    (utime + stime of /proc/<pid>/stat); None when it is gone or a zombie."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rss = re.search(r"^VmRSS:\s+(\d+) kB$", status, re.MULTILINE)
    # After the command name (which may hold spaces and parens): state is field 3, utime
    # and stime fields 14 and 15 of stat(5).
    fields = stat.rpartition(")")[2].split()
    if rss is None or len(fields) < 13:
        return None  # a zombie has no VmRSS line
    ticks = int(fields[11]) + int(fields[12])
    return VmmUsage(rss_bytes=int(rss.group(1)) * 1024,
                    cpu_seconds=ticks / os.sysconf("SC_CLK_TCK"))


def pid_is_qemu_for(pid: int, qmp_socket: Path) -> bool:
    """True if ``pid`` is a live QEMU whose command line names ``qmp_socket``."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    args = raw.rstrip(b"\0").split(b"\0")
    if not args or not os.path.basename(args[0]).startswith(b"qemu-system"):
        return False
    if not any(_names_qmp(a, str(qmp_socket.absolute())) for a in args):
        return False
    return _started_by_us(pid) and pid_alive(pid)


def _started_by_us(pid: int) -> bool:
    """Whether ``pid`` runs as a uid banger starts QEMU as: the daemon's own or, under a
    root daemon, a QEMU user (:func:`banger.host.vmmuser.is_vmm_user`). Any local user
    can start a process named qemu-system-* whose arguments name a VM's QMP socket (every
    QEMU's command line is readable in /proc): taken for the VM's QEMU, it would block
    the VM's next start ("already running"), set its ssh port at rediscovery, and be
    what a stop signals."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith("Uid:"):
            uid = int(line.split()[1])
            me = os.geteuid()
            return uid == me or (me == 0 and vmmuser.is_vmm_user(uid))
    return False


def _names_qmp(arg: bytes, qmp: str) -> bool:
    text = arg.decode(errors="surrogateescape")
    # Today's: the QMP socket's fd set, tagged with its path; older daemons' QEMUs were
    # given the path itself (-qmp unix:<path>,server=on,...).
    if text == f"unix:{qmp}" or text.startswith(f"unix:{qmp},"):
        return True
    return "opaque=" in text and split_opts(text).get("opaque") == QMP_TAG + qmp


def running_qemu_uids() -> set[int]:
    """The real uids of every running QEMU on the host (so a new one gets another)."""
    uids = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            argv0 = Path(entry.path, "cmdline").read_bytes().split(b"\0", 1)[0]
            if not os.path.basename(argv0).startswith(b"qemu-system"):
                continue
            status = Path(entry.path, "status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("Uid:"):
                uids.add(int(line.split()[1]))
    return uids


def find_qemu_pid(qmp_socket: Path) -> int | None:
    """The pid of the running QEMU that serves ``qmp_socket``, found by scanning /proc."""
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and pid_is_qemu_for(int(entry.name), qmp_socket):
            return int(entry.name)
    return None


def kill_and_wait(pid: int, sig: int, timeout: float) -> bool:
    """Send ``sig`` and wait up to ``timeout`` s for the process to go; True if gone.

    Through a pidfd opened before the signal where the kernel has them: the signal goes
    to that very process (not to one that took its pid after a reap), and the wait
    ends the moment its whole thread group is gone (the pidfd polls readable), not on
    the next tick of a sleep loop (a --rm delete waits on this)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except OSError:
        return _kill_and_poll(pid, sig, timeout)
    try:
        try:
            signal.pidfd_send_signal(pidfd, sig)
        except ProcessLookupError:
            _reap(pid)
            return True
        deadline = time.monotonic() + timeout
        watch = select.poll()
        watch.register(pidfd, select.POLLIN)
        while True:
            if watch.poll(max(0.0, deadline - time.monotonic()) * 1000):
                _reap(pid)
                return True
            if time.monotonic() >= deadline:
                return False
    finally:
        os.close(pidfd)


def _kill_and_poll(pid: int, sig: int, timeout: float) -> bool:
    """kill_and_wait without a pidfd: ``pid_alive`` polled."""
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
