"""`banger vm stats` on a real VM: the guest's numbers come from its agent, the VMM's
from /proc; and hosts that reconnect to the agent at once still get their HELLO."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import Banger, agent_uname

pytestmark = pytest.mark.e2e


def test_stats_of_a_real_vm(banger: Banger) -> None:
    banger.run("vm", "run", "-d", "--name", "st")
    vm = banger.show("st")
    rows = banger.json("vm", "stats", "st")
    assert isinstance(rows, list) and len(rows) == 1, rows
    (s,) = rows
    g, vmm = s["guest"], s["vmm"]
    assert s["vm"] == "st" and s["interval"] > 0.3
    assert g["mem_total_kib"] > 0 and 0 < g["mem_available_kib"] <= g["mem_total_kib"]
    assert g["ncpu"] >= 1 and g["uptime_ms"] > 0
    assert g["cpu_percent"] is None or 0 <= g["cpu_percent"] <= 100
    assert g["cpu_user_ticks"] + g["cpu_system_ticks"] + g["cpu_idle_ticks"] > 0
    root = [f for f in g["filesystems"] if f["mountpoint"] == "/"]
    assert len(root) == 1 and root[0]["size_bytes"] > 0, g["filesystems"]
    assert 0 < root[0]["used_bytes"] <= root[0]["size_bytes"]
    rt = vm["runtime"]
    assert isinstance(rt, dict)
    assert vmm["pid"] == rt["pid"] and vmm["rss_bytes"] > 0 and vmm["cpu_seconds"] > 0
    assert vmm["cpu_percent"] is not None and vmm["cpu_percent"] >= 0
    table = banger.run("vm", "stats").stdout
    assert table.split()[:2] == ["NAME", "CPU"] and "\nst " in table, table
    # Hosts that connect one right after another (no pause: the agent may not see the
    # hang-up in between) each get a HELLO, because each asks for one. The daemon keeps
    # its connection (the channel serves one host at a time): stop it first; the next
    # command's daemon reconnects on first use.
    banger.stop_daemon()
    channel = banger.home / "run" / "vms" / str(vm["id"]) / "agent.sock"
    assert agent_uname(channel) == agent_uname(channel)
    assert banger.json("vm", "stats", "st")[0]["guest"]["ncpu"] >= 1  # type: ignore[index]
    banger.run("vm", "stop", "st")
    proc = banger.run("vm", "stats", "st", check=False)
    assert proc.returncode == 1 and "banger vm start st" in proc.stderr
