"""Transient handles of a running VM and the one function that releases them.

Handles (VMM pid, forwarded port, control socket) never go into SQLite: they live in memory
plus the VM directory's handles.json, and are rediscovered from the OS when that file is
missing or corrupt. :func:`release_runtime` is used by start rollback, stop, kill, delete
and reconcile alike, so teardown cannot drift from rollback; it keeps every failure.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from banger.model.errors import OperationFailed
from banger.model.layout import VMPaths
from banger.ports import AgentPort, Endpoint, NetPort, VmmPort

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Handles:
    pid: int
    ssh_port: int | None
    control_socket: str
    accel: str
    boot_id: str
    started_at: float
    vmm: str = "qemu"
    accel_reason: str = ""
    ssh_host: str = "127.0.0.1"  # the guest's own address in tap mode
    tap: str | None = None
    agent: str | None = None  # the host end of the guest agent's channel, if any

    @property
    def endpoint(self) -> Endpoint | None:
        return Endpoint(self.ssh_host, self.ssh_port) if self.ssh_port else None


class HandleStore:
    """In-memory handles, mirrored to each VM's handles.json."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._mem: dict[str, Handles] = {}

    def put(self, paths: VMPaths, h: Handles) -> None:
        tmp = paths.handles.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(h)))
        tmp.replace(paths.handles)
        with self._lock:
            self._mem[paths.names.vm_id] = h

    def get(self, vm_id: str) -> Handles | None:
        with self._lock:
            return self._mem.get(vm_id)

    def load(self, paths: VMPaths) -> Handles | None:
        """Read handles.json; None when it is missing or corrupt (caller rediscovers)."""
        try:
            data = json.loads(paths.handles.read_text())
            if isinstance(data, dict) and "qmp_socket" in data:
                # Written by a daemon from before the VMM port was driver-neutral.
                data.setdefault("control_socket", data.pop("qmp_socket"))
            h = Handles(**data)
            if not isinstance(h.pid, int):
                raise TypeError("pid")
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as exc:
            log.warning("handles file %s is corrupt (%s): rediscovering from the OS",
                        paths.handles, exc)
            return None
        with self._lock:
            self._mem[paths.names.vm_id] = h
        return h

    def forget(self, paths: VMPaths) -> None:
        with self._lock:
            self._mem.pop(paths.names.vm_id, None)
        paths.handles.unlink(missing_ok=True)
        paths.handles.with_suffix(".tmp").unlink(missing_ok=True)


class ReleaseFailed(OperationFailed):
    """Part of a VM's runtime could not be released; ``errors`` holds every failure, in
    the order they happened (the message names them all)."""

    def __init__(self, vm_id: str, errors: Sequence[Exception]) -> None:
        self.errors = tuple(errors)
        super().__init__(f"could not release everything VM {vm_id} held at run time: "
                         + "; ".join(f"{type(e).__name__}: {e}" for e in self.errors))


def release_runtime(paths: VMPaths, vmm: VmmPort, handles: HandleStore,
                    *, kill_timeout: float = 5.0, net: NetPort | None = None,
                    agent: AgentPort | None = None) -> None:
    """Close the daemon's connection to the guest agent (given ``agent``: its execs end
    saying the VM was stopped), kill the VMM (if any), remove sockets and handles and,
    given ``net`` (tap mode), the VM's NAT rules and tap. Idempotent: what is already
    gone is skipped.

    Every part is attempted even when an earlier one failed (a VMM that will not die
    must not keep its tap and rules alive); then :class:`ReleaseFailed` carries every
    failure."""
    errors: list[Exception] = []

    def attempt(part: Callable[[], object]) -> None:
        try:
            part()
        except Exception as exc:
            errors.append(exc)

    if agent is not None:
        attempt(lambda: _release_agent(paths, handles, agent))
    attempt(lambda: _kill_vmm(paths, vmm, handles, kill_timeout))
    attempt(lambda: handles.forget(paths))
    attempt(lambda: paths.control_socket.unlink(missing_ok=True))
    attempt(lambda: shutil.rmtree(paths.sock_dir, ignore_errors=True))
    if net is not None:
        attempt(lambda: net.remove_nat(paths.names.vm_id))
        attempt(lambda: net.delete_tap(paths.names.tap))
    if errors:
        raise ReleaseFailed(paths.names.vm_id, errors)


def _release_agent(paths: VMPaths, handles: HandleStore, agent: AgentPort) -> None:
    h = handles.get(paths.names.vm_id)
    channels = {paths.agent_socket} | ({Path(h.agent)} if h is not None and h.agent else set())
    for channel in channels:
        agent.release(channel=channel)


def _kill_vmm(paths: VMPaths, vmm: VmmPort, handles: HandleStore, timeout: float) -> None:
    h = handles.get(paths.names.vm_id) or handles.load(paths)
    pid: int | None = None
    if h is not None and vmm.alive(h.pid, paths.control_socket):
        pid = h.pid
    else:
        found = vmm.rediscover(paths.control_socket)
        pid = found.pid if found else None
    if pid is not None:
        vmm.kill(pid, signal.SIGKILL)
        if not vmm.wait_exit(pid, timeout):
            raise RuntimeError(f"VMM pid {pid} did not exit {timeout:g} s after SIGKILL")
