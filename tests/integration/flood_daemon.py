"""A bangerd for one test, in its own process so its memory is its own: the real app,
real SQLite, fake VMM.

Run as ``python -m tests.integration.flood_daemon`` with BANGER_HOME set.
"""

from __future__ import annotations

import sys
from pathlib import Path

import uvicorn

from banger.api.schema import Doctor
from banger.daemon.app import create_app
from banger.daemon.sockets import bind_socket
from banger.host.seriallog import SerialLogCap
from banger.model.layout import Layout
from tests.fakes import fake_service

FLOOD_SERIAL_CAP = 1 << 20


def main() -> None:
    layout = Layout.for_user()
    service, _images, _disks, _vmm, _guest, _db = fake_service(Path(sys.argv[1]), layout)
    app = create_app(service, doctor=lambda: Doctor(checks=[]), ssh_key="k",
                     known_hosts="kh", ssh_argv=lambda addr, alias: ["ssh"])
    # As bangerd's: a guest that floods its console is capped (at 1 MiB here).
    SerialLogCap(layout, lambda: FLOOD_SERIAL_CAP, interval=0.05).start()
    sock = bind_socket(layout.daemon_socket).sock
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


if __name__ == "__main__":
    main()
