"""The client's side of the wire: refs travel as one URL path segment, and a plain request
never waits forever on a daemon that stopped answering."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from banger.cli.main import cli
from banger.client import client as client_mod
from banger.client.client import Client, DaemonUnavailable
from tests.integration.conftest import Daemon


def banger(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def test_a_ref_with_url_syntax_acts_on_no_other_vm(daemon: Daemon) -> None:
    assert banger("vm", "create", "--name", "box")[0] == 0
    # Unencoded, these became POST /vms/box/stop?/start (stops box) and DELETE /vms/box?x.
    for args in (["vm", "start", "box/stop?"], ["vm", "restart", "box/stop#"],
                 ["vm", "delete", "box?x"], ["vm", "show", ".."], ["vm", "stop", "box/kill?"]):
        code, _, err = banger(*args)
        assert code != 0, (args, err)
        assert daemon.service.show("box").vm.state.value == "running", args
    assert len(daemon.vmm.procs) == 1
    # A VM whose id-prefix or name is looked up as one segment still works.
    assert banger("vm", "stop", "box")[0] == 0


@pytest.fixture
def silent_socket(tmp_path: Path) -> Iterator[Path]:
    """A socket that accepts connections and never answers (a wedged daemon)."""
    path = Path(f"/tmp/banger-silent-{id(tmp_path)}.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except TimeoutError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield path
    stop.set()
    t.join()
    for c in held:
        c.close()
    srv.close()
    path.unlink()


@pytest.mark.timeout(60)
def test_plain_requests_time_out_reads_short_changes_long(
        silent_socket: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_mod, "READ_TIMEOUT", 0.5)
    monkeypatch.setattr(client_mod, "CHANGE_TIMEOUT", 2.0)
    c = Client(silent_socket)
    try:
        t0 = time.monotonic()
        with pytest.raises(DaemonUnavailable, match=r"did not answer GET /v1/vms within"):
            c.list_vms()
        assert time.monotonic() - t0 < 2
        t0 = time.monotonic()
        with pytest.raises(DaemonUnavailable, match=r"did not answer POST /v1/vms/b%2Fx/stop"):
            c.stop("b/x")
        assert 2 <= time.monotonic() - t0 < 5
    finally:
        c.close()
