"""bangerd: the per-user daemon. Composition root: wires store, host adapters and core,
reconciles what really runs, then serves the API on a Unix socket only its owner can use.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import uvicorn

from banger.core.operations import Operations
from banger.core.service import Timeouts, VMService
from banger.daemon.app import create_app
from banger.daemon.doctor import doctor
from banger.daemon.names import VmNames
from banger.daemon.sockets import bind_socket
from banger.daemon.sshconfig import attach as attach_ssh_config
from banger.daemon.wiring import host_ports
from banger.host import ssh
from banger.host.seriallog import SerialLogCap
from banger.model.config import DEFAULT_SERIAL_MAX_MIB, ConfigError, load_config
from banger.model.layout import Layout
from banger.store.db import Database
from banger.store.vms import OperationLog, VMRepository

log = logging.getLogger("bangerd")


def build_service(layout: Layout) -> VMService:
    db = Database(layout.db)
    failpoint = os.environ.get("BANGER_FAILPOINT") or None
    ready = float(os.environ.get("BANGER_READY_TIMEOUT", "180"))
    return VMService(repo=VMRepository(db), ops=Operations(OperationLog(db)),
                     host=host_ports(layout), layout=layout, timeouts=Timeouts(ready=ready),
                     failpoint=failpoint,
                     load_config=lambda: load_config(layout.config_file, Path.home()))


def _serial_max_mib(service: VMService) -> int:
    try:
        return service.load_config().serial_max_mib
    except ConfigError:
        return DEFAULT_SERIAL_MAX_MIB  # a broken config is reported where it is used


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bangerd", description=__doc__)
    parser.add_argument("--socket", type=Path, help="Unix socket path (default: per user)")
    parser.add_argument("--log-level", default=os.environ.get("BANGER_LOG_LEVEL", "INFO"))
    args = parser.parse_args(argv)
    layout = Layout.for_user()
    layout.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sock_path = args.socket or layout.daemon_socket
    sock = bind_socket(sock_path)
    service = build_service(layout)
    names = VmNames(service.load_config)
    names.start()
    serial_cap = SerialLogCap(layout, lambda: _serial_max_mib(service) << 20)
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
            port=addr.port, host=addr.host, key=layout.ssh_key, known_hosts=layout.known_hosts,
            alias=alias))
    log.info("bangerd %d serving %s", os.getpid(), sock_path)
    config = uvicorn.Config(app, log_level=args.log_level.lower(), access_log=False)
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        serial_cap.stop()
        names.stop()
        sock_path.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
