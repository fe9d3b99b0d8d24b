"""The real daemon app on a temporary Unix socket, real SQLite, real CLI; fake host ports."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from banger.api.schema import Check, Doctor
from banger.client.client import Client
from banger.core.service import VMService
from banger.daemon.app import create_app
from banger.daemon.main import WS_SETTINGS
from banger.daemon.sockets import bind_socket
from banger.daemon.sshconfig import attach as attach_ssh_config
from banger.model.layout import Layout
from tests.fakes import FakeAgent, FakeGuest, FakeVmm, agent_of, fake_service


@dataclass
class Daemon:
    layout: Layout
    service: VMService
    vmm: FakeVmm
    client: Client
    guest: FakeGuest
    http: httpx.Client  # raw requests to the API, for what the CLI never sends
    stopping: threading.Event  # set: the daemon is stopping (log follows end)
    app: FastAPI
    agent: FakeAgent


@pytest.fixture
def daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Daemon]:
    home = tmp_path / "h"
    monkeypatch.setenv("BANGER_HOME", str(home))
    layout = Layout.for_user()
    service, _images, _disks, vmm, guest, db = fake_service(tmp_path, layout)
    attach_ssh_config(service)  # as bangerd's main does
    stopping = threading.Event()
    app = create_app(service, doctor=lambda: Doctor(checks=[Check(name="x", status="pass",
                                                                  detail="ok")]),
                     ssh_key="k", known_hosts="kh",
                     ssh_argv=lambda addr, alias: ["ssh", "-p", str(addr.port),
                                                   f"root@{addr.host}"],
                     stopping=stopping)
    sock = bind_socket(layout.daemon_socket).sock
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", **WS_SETTINGS))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "daemon did not start"
        time.sleep(0.02)
    client = Client(layout.daemon_socket)
    http = httpx.Client(transport=httpx.HTTPTransport(uds=str(layout.daemon_socket)),
                        base_url="http://bangerd", timeout=httpx.Timeout(30.0))
    yield Daemon(layout, service, vmm, client, guest, http, stopping, app, agent_of(service))
    http.close()
    client.close()
    server.should_exit = True
    thread.join(10)
    db.close()
