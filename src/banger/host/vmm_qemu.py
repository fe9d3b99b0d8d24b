"""The VMM port on this host, driven by QEMU: which user each QEMU runs as, the KVM or
TCG choice (probed once per host boot), loopback ports for user networking, and the
launch, observation and stop of the process (banger.host.qemu, banger.host.vmmproc)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from banger.host import kvm, qemu, qemu_cmdline, seriallog, vmmproc, vmmuser
from banger.host.bootid import boot_id
from banger.model.errors import OperationFailed
from banger.model.vm import ResourceNames
from banger.ports import Accel, Launched, LaunchSpec, Rediscovered, VmmUsage


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
        key = {"boot_id": boot_id(), "qemu": _stat_key(shutil.which(qemu_cmdline.QEMU)),
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

    def launch(self, spec: LaunchSpec) -> Launched:
        accel = self.accel()
        seriallog.new_boot(spec.serial_log, spec.serial_log.with_name(
            ResourceNames(spec.vm_id).serial_log_rotated))
        with self._users.free() as runas:
            # Once launched, the process itself marks its uid as taken.
            pid = qemu.launch(spec, accel.accel, runas)
        return Launched(pid=pid, control_socket=spec.control_socket, accel=accel,
                        agent=qemu_cmdline.agent_socket(spec))

    def alive(self, pid: int, control_socket: Path) -> bool:
        return vmmproc.pid_alive(pid) and vmmproc.pid_is_qemu_for(pid, control_socket)

    def stuck(self, control_socket: Path) -> str | None:
        status = vmmproc.qmp_status(control_socket)
        return status if status in ("internal-error", "guest-panicked", "io-error",
                                    "shutdown") else None

    def quit(self, control_socket: Path) -> bool:
        return vmmproc.qmp_quit(control_socket)

    def kill(self, pid: int, sig: int) -> None:
        vmmproc.kill_and_wait(pid, sig, 0.0)

    def wait_exit(self, pid: int, timeout: float) -> bool:
        return vmmproc.kill_and_wait(pid, 0, timeout)

    def usage(self, pid: int) -> VmmUsage | None:
        return vmmproc.usage(pid)

    def rediscover(self, control_socket: Path) -> Rediscovered | None:
        pid = vmmproc.find_qemu_pid(control_socket)
        if pid is None:
            return None
        # The agent's socket sits next to the control socket (both in the VM's runtime
        # dir, which is named by its id).
        sock_dir = control_socket.parent
        agent = sock_dir / ResourceNames(sock_dir.name).agent_socket
        return Rediscovered(pid, vmmproc.ssh_port_of(pid),
                            agent=agent if agent.exists() else None)


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
