"""bangerd: the per-user daemon. Composition root: takes the state directory's lock,
wires store, host adapters and core, reconciles what really runs, then serves the API on a
Unix socket only its owner (and root where configured) can use.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from banger.api.wire import EXEC_MAX_MESSAGE
from banger.core.operations import Operations
from banger.core.service import Timeouts, VMService
from banger.core.stages import Stage
from banger.daemon import killpoint, lock
from banger.daemon.app import create_app
from banger.daemon.doctor import doctor
from banger.daemon.housekeeping import Housekeeping
from banger.daemon.names import VmNames
from banger.daemon.peercred import allowed_uids, peer_checked
from banger.daemon.sockets import bind_socket
from banger.daemon.sshconfig import attach as attach_ssh_config
from banger.daemon.threads import OP_THREAD_PREFIX
from banger.daemon.wiring import host_ports
from banger.host import ssh
from banger.host.scratch import Scratch
from banger.host.seriallog import SerialLogCap
from banger.local.trust import AGENT_ENV, UnsafeDirectory, private_dir
from banger.model.config import DEFAULT_SERIAL_MAX_MIB, ConfigError, load_config
from banger.model.layout import EXIT_ALREADY_RUNNING, Layout
from banger.store.db import Database
from banger.store.vms import OperationLog

log = logging.getLogger("bangerd")


def build_service(layout: Layout, db: Database) -> VMService:
    failpoint = os.environ.get("BANGER_FAILPOINT") or None
    if failpoint is not None and failpoint not in {s.value for s in Stage}:
        # A misspelt stage would never fail: the test would pass for the wrong reason.
        raise SystemExit(f"bangerd: BANGER_FAILPOINT={failpoint!r} is not a stage of "
                         f"banger.core.stages (e.g. qemu_launch, wait_agent)")
    ready = float(os.environ.get("BANGER_READY_TIMEOUT", "180"))
    try:
        max_boots = load_config(layout.config_file, Path.home()).max_concurrent_boots
    except ConfigError as exc:  # each request names the bad config again
        log.error("%s: using the default boot limit", exc)
        max_boots = None
    repo, oplog, host = killpoint.armed(os.environ.get("BANGER_KILLPOINT"), db,
                                        host_ports(layout))
    return VMService(repo=repo, ops=Operations(oplog),
                     host=host, layout=layout, timeouts=Timeouts(ready=ready),
                     failpoint=failpoint, max_boots=max_boots,
                     load_config=lambda: load_config(layout.config_file, Path.home()))


def _serial_max_mib(service: VMService) -> int:
    try:
        return service.load_config().serial_max_mib
    except ConfigError:
        return DEFAULT_SERIAL_MAX_MIB  # a broken config is reported where it is used


# The kernel's name of the daemon process (its comm, 15 bytes at most): what `pgrep -x`,
# `ps -e`, `ps -C`, top and killall show and match. The README calls the daemon bangerd.
PROCESS_NAME = "bangerd"


def name_process(name: str = PROCESS_NAME) -> None:
    """Name this process ``name`` in the kernel (/proc/self/comm, as prctl(PR_SET_NAME)).

    Only the comm: the command line and /proc/<pid>/environ stay what they are (rewriting
    argv in place, as setproctitle does, overwrites the environment block that leak checks
    and `cat /proc/<pid>/environ` read). Called first, while this is the only thread:
    the threads started later inherit the name.
    """
    try:
        with open("/proc/self/comm", "w") as f:
            f.write(name)
    except OSError as exc:  # no /proc: the daemon works the same, named python
        log.warning("cannot name the process %s: %s", name, exc)


def run() -> None:
    """The bangerd process (console script, `python -m banger.daemon.main`)."""
    name_process()
    main()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bangerd", description=__doc__)
    parser.add_argument("--socket", type=Path, help="Unix socket path (default: per user)")
    parser.add_argument("--log-level", default=os.environ.get("BANGER_LOG_LEVEL", "INFO"))
    args = parser.parse_args(argv)
    # Nothing the daemon starts (ssh to untrusted guests) may reach the user's ssh agent or
    # X display, however the daemon was started (the CLI's autostart drops them too).
    for key in AGENT_ENV:
        os.environ.pop(key, None)
    layout = Layout.for_user()
    layout.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        private_dir(layout.runtime_dir, what="runtime directory")
        held = lock.acquire(layout.daemon_lock)
    except UnsafeDirectory as exc:
        raise SystemExit(f"bangerd: {exc}") from None
    except lock.AlreadyRunning as exc:
        print(exc, file=sys.stderr)
        sys.exit(EXIT_ALREADY_RUNNING)
    try:
        serve(layout, args.socket or layout.daemon_socket, args.log_level)
    finally:
        _wait_for_operations()
        held.release()


def _wait_for_operations() -> None:
    """Wait for the operation threads still running once the server stopped.

    uvicorn waits for every request with a client, not for an operation whose client went
    away (it is rolling back, or deleting a `vm run --rm` VM): until those are done this
    daemon still changes the state directory, so it keeps the lock. Released earlier, a
    second bangerd could start, reconcile the half-rolled-back VM and sweep the scratch
    files under the first one's feet.
    """
    for thread in threading.enumerate():
        if thread.name.startswith(OP_THREAD_PREFIX) and thread is not threading.current_thread():
            log.info("waiting for %s to finish before releasing the state lock", thread.name)
            thread.join()


def serve(layout: Layout, sock_path: Path, log_level: str) -> None:
    """Everything after the state lock is held: housekeeping, socket, reconcile, serve."""
    # uvicorn re-raises the SIGTERM it shut down on once it has restored the previous
    # handler; with the default one the process would die before the `finally` below
    # removes the socket. Before uvicorn runs, the same handler makes a SIGTERM during
    # reconcile unwind through it too.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    db = Database(layout.db)
    keeper = Housekeeping(layout.daemon_log, OperationLog(db))
    keeper.at_start()
    # Startup sweep of what a killed daemon left behind goes here: under the lock (no other
    # daemon of this state dir is running), before the socket and before reconcile.
    for path in Scratch(layout.state_dir).sweep(layout.vms_dir):
        log.info("removed %s, left by a daemon that was killed", path)
    private_dir(layout.runtime_dir / "vms", what="runtime directory")
    bound = bind_socket(sock_path)
    service = build_service(layout, db)
    names = VmNames(service.load_config)
    serial_cap = SerialLogCap(layout, lambda: _serial_max_mib(service) << 20)
    stopping = threading.Event()
    try:
        names.start()
        serial_cap.start()  # from the first pass, for the VMs that ran on while no daemon did
        service.on_change.append(names.update)
        for vm in service.reconcile():
            log.info("reconciled %s: %s", vm.name, vm.state.value)
        attach_ssh_config(service)
        app = create_app(
            service,
            doctor=lambda: doctor(layout, service.host.vmm,
                                  [n for n in service.host.images.known()
                                   if (layout.images_dir / n / "manifest.json").exists()],
                                  user_ssh_config=Path.home() / ".ssh" / "config",
                                  names=names, load_config=service.load_config),
            ssh_key=str(layout.ssh_key), known_hosts=str(layout.known_hosts),
            ssh_argv=lambda addr, alias: ssh.ssh_base_argv(
                port=addr.port, host=addr.host, key=layout.ssh_key,
                known_hosts=layout.known_hosts, alias=alias, user_config=True),
            stopping=stopping)
        allowed = allowed_uids(_allow_root(layout))
        log.info("bangerd %d serving %s (uids allowed: %s)", os.getpid(), sock_path,
                 sorted(allowed))
        config = uvicorn.Config(app, log_level=log_level.lower(), access_log=False,
                                http=peer_checked(allowed), **WS_SETTINGS)
        keeper.start()
        Server(config, service.ops, stopping).run(sockets=[bound.sock])
    finally:
        # The kept agent connections (and their reader threads, which the lock's release
        # waits for: see _wait_for_operations) end with the daemon.
        service.host.agent.close()
        keeper.stop()
        serial_cap.stop()
        names.stop()
        bound.release()


# The exec WebSocket (daemon/execws.py): wsproto (the client's library too). No keepalive
# pings: on a Unix socket a peer that is gone shows as end of file, and a client that
# reads slowly (output piped into a pager) must not be dropped for a pong stuck behind
# the output it has not read yet.
WS_SETTINGS: dict[str, Any] = {"ws": "wsproto", "ws_ping_interval": None,
                               "ws_max_size": EXEC_MAX_MESSAGE}


# How long a stopping daemon waits for a client whose unsent output does not go down.
STALLED_CLIENT_SECONDS = 2.0


class Server(uvicorn.Server):
    """uvicorn's server that, told to stop (SIGTERM, SIGINT), also cancels every
    operation in flight.

    uvicorn stops taking requests, then waits for each response to end: a streamed boot
    would run to its end (minutes: readiness, then the boot-slot line behind it) while
    the daemon answers nothing, and a service manager's SIGKILL would then cut it off
    half made. Cancelled, each operation rolls back now and its client is told so.
    """

    def __init__(self, config: uvicorn.Config, ops: Operations,
                 stopping: threading.Event | None = None) -> None:
        super().__init__(config)
        self._ops = ops
        self._stopping = stopping or threading.Event()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        self._stopping.set()  # log streams that follow a VM end too
        # A signal handler may run while this thread holds the registry's lock: cancel
        # from a thread of its own.
        threading.Thread(target=self._cancel_all, name="cancel-on-exit", daemon=True).start()

    def _cancel_all(self) -> None:
        for op in self._ops.in_flight():
            op.control.cancel("cancelled: bangerd is stopping")

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        watch = asyncio.create_task(self._drop_stalled_clients())
        try:
            await super().shutdown(sockets)
        finally:
            watch.cancel()

    async def _drop_stalled_clients(self) -> None:
        """While the server stops: cut a connection whose client reads nothing.

        uvicorn waits for every connection to end, and one whose client stopped reading
        (`vm logs -f box | less` waiting at a full screen, a suspended CLI, an exec's
        output nobody takes) keeps unsent bytes that a close waits to flush: the stop
        would wait for that reader forever. A connection whose unsent bytes did not go
        down in :data:`STALLED_CLIENT_SECONDS` is aborted; a client that reads gets its
        stream's end as before."""
        unsent: dict[int, int] = {}
        while True:
            await asyncio.sleep(STALLED_CLIENT_SECONDS)
            now: dict[int, int] = {}
            for conn in list(self.server_state.connections):
                transport = getattr(conn, "transport", None)
                if transport is None:
                    continue
                size = transport.get_write_buffer_size()
                if size and unsent.get(id(conn), 0) and size >= unsent[id(conn)]:
                    log.info("stopping: dropped a client that read nothing for %.0f s "
                             "(%d bytes unsent)", STALLED_CLIENT_SECONDS, size)
                    transport.abort()
                    continue
                now[id(conn)] = size
            unsent = now


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _allow_root(layout: Layout) -> bool:
    """``[daemon] allow_root``, read once at start; an unreadable config allows no one more."""
    try:
        return load_config(layout.config_file, Path.home()).allow_root
    except ConfigError as exc:
        log.warning("%s; root is not allowed on the socket", exc)
        return False


if __name__ == "__main__":
    run()
