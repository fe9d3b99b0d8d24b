"""`banger vm stats` through the real daemon app and CLI (fake host ports): the route, its
schema in the OpenAPI document, the table, --json, several refs, a VM not running, and a
guest's hostile mount point."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from banger.cli import stats as cli_stats
from banger.cli.main import cli
from banger.ports import GuestFilesystem
from tests.fakes import FakeAgent
from tests.integration.conftest import Daemon


def banger(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def _agent(daemon: Daemon) -> FakeAgent:
    agent = daemon.service.ctx.host.agent
    assert isinstance(agent, FakeAgent)
    return agent


def test_stats_route_json_and_table(daemon: Daemon) -> None:
    assert banger("vm", "create", "--name", "box")[0] == 0
    assert banger("vm", "create", "--name", "idle", "--no-start")[0] == 0
    _agent(daemon).mounts = (GuestFilesystem("/mnt/\x1b[2Jevil", 2 << 30, 1 << 30, 1 << 30),)
    body = daemon.http.get("/v1/vms/box/stats").json()
    (proc,) = daemon.vmm.procs.values()
    assert body["vm"] == "box" and body["interval"] > 0.3  # two samples ~0.5 s apart
    assert body["guest"]["cpu_percent"] == 25.0 and body["guest"]["ncpu"] == 2
    assert body["guest"]["filesystems"][0] == {"mountpoint": "/", "size_bytes": 4 << 30,
                                               "used_bytes": 1 << 30, "avail_bytes": 3 << 30}
    assert body["vmm"]["pid"] == proc.pid and body["vmm"]["rss_bytes"] == 64 << 20
    assert body["vmm"]["cpu_percent"] > 0
    code, out, err = banger("vm", "stats", "box", "--json")
    assert code == 0, err
    (row,) = json.loads(out)
    assert row.keys() == body.keys() and row["guest"].keys() == body["guest"].keys()
    assert row["guest"]["mem_total_kib"] == 1 << 20 and row["vmm"]["rss_bytes"] == 64 << 20

    code, out, err = banger("vm", "stats")  # every running VM: box, not idle
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "CPU", "LOAD", "MEMORY", "DISK", "/", "VMM", "RSS",
                                "VMM", "CPU"]
    assert lines[1].split()[:3] == ["box", "25.0%", "of"]
    assert "256.0 MiB / 1.0 GiB" in lines[1] and "1.0 GiB / 4.0 GiB" in lines[1]
    assert "64.0 MiB" in lines[1]
    assert "idle" not in out
    assert "\x1b" not in out and "/mnt/\\x1b[2Jevil" in out  # the guest's text, escaped


def test_stats_of_a_vm_not_running(daemon: Daemon) -> None:
    assert banger("vm", "create", "--name", "box")[0] == 0
    assert banger("vm", "create", "--name", "idle", "--no-start")[0] == 0
    code, _, err = banger("vm", "stats", "idle")
    assert code == 1 and "not running" in err and "banger vm start idle" in err
    r = daemon.http.get("/v1/vms/idle/stats")
    assert r.status_code == 409 and r.json()["error"]["code"] == "conflict"
    # One of several refs failing: the others are shown, the error said, exit 1.
    code, out, err = banger("vm", "stats", "box", "idle", "nope", "--json")
    assert code == 1
    assert [s["vm"] for s in json.loads(out)] == ["box"]
    assert "banger vm start idle" in err and "no VM named 'nope'" in err
    assert banger("vm", "stop", "box")[0] == 0
    assert banger("vm", "stats") == (0, "no VM is running\n", "")
    assert banger("vm", "stats", "--json")[1] == "[]\n"


def test_stats_in_the_openapi_document(daemon: Daemon) -> None:
    doc = daemon.http.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    assert "/v1/vms/{ref}/stats" in doc["paths"]
    assert {"VMStatsOut", "GuestStatsOut", "FilesystemOut", "VmmUsageOut"} <= schemas.keys()


def test_watch_redraws_until_ctrl_c(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    assert banger("vm", "create", "--name", "box")[0] == 0
    rounds: list[float] = []

    def pause(seconds: float) -> None:
        rounds.append(seconds)
        if len(rounds) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(cli_stats, "pause", pause)
    code, out, err = banger("vm", "stats", "--watch", "1")
    assert code == 0, err  # Ctrl-C ends a watch: not an error
    assert len(rounds) == 2 and all(0 <= r <= 1 for r in rounds)
    (proc,) = daemon.vmm.procs.values()
    assert proc.stats_samples == 4  # two rounds (Ctrl-C in the second pause), two samples each
    assert "box" in out and "25.0%" in out
    code, _, err = banger("vm", "stats", "--watch", "1", "--json")
    assert code == 2 and "does not go with --json" in err
    assert banger("vm", "stats", "--watch", "0.1")[0] == 2  # at least 0.5 s
