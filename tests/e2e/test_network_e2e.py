"""Tap networking on real VMs, each test inside a network namespace it creates and removes.

The daemon (started by the CLI) lives in that namespace, so its bridge, taps, nftables
rules, ip_forward and DNS listeners exist only there; the only traffic leaves for loopback
or for a "remote" namespace the test made. Afterwards no tap, NAT rule or DNS record may
remain.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import Banger, finish, make_banger
from tests.host.netns import throwaway

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="tap networking needs root (netns, bridge)"),
]

DNS_PORT = 5354  # the default [network] dns_port, on the namespace's own loopback
REMOTE_IP = "198.51.100.2"  # TEST-NET-2, only ever inside the test's namespaces
HOST_SIDE = "198.51.100.1"


def in_ns(ns: str, *argv: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True,
                          timeout=60, check=check)


def dig(ns: str, name: str) -> str:
    return in_ns(ns, "dig", "+short", "+time=2", "+tries=1", "@127.0.0.1", "-p",
                 str(DNS_PORT), name).stdout.strip()


def taps(ns: str) -> list[str]:
    links = json.loads(in_ns(ns, "ip", "-j", "link", "show", check=True).stdout)
    return [link["ifname"] for link in links if link["ifname"].startswith("bt")]


def vm_rules(ns: str) -> list[str]:
    """Comments of the per-VM nftables rules (``banger:<id>``) in the namespace."""
    out = in_ns(ns, "nft", "-j", "list", "ruleset", check=True).stdout
    return [item["rule"]["comment"] for item in json.loads(out)["nftables"]
            if "rule" in item and str(item["rule"].get("comment", "")).startswith("banger:")]


def assert_network_clean(ns: str, names: list[str]) -> None:
    assert taps(ns) == [], f"taps left: {taps(ns)}"
    assert vm_rules(ns) == [], f"NAT rules left: {vm_rules(ns)}"
    for name in names:
        assert dig(ns, f"{name}.vm") == "", f"DNS record of {name} left"


@pytest.fixture
def tapns(image_dir: Path) -> Iterator[tuple[Banger, str]]:
    """A Banger whose CLI and daemon run in a fresh network namespace, tap by config."""
    with throwaway("bge") as ns:
        b = make_banger(images_dir=image_dir)
        b.netns = ns
        config = b.home / "config" / "config.toml"
        config.parent.mkdir(parents=True)
        config.write_text('[network]\nmode = "tap"\n')
        names: list[str] = []
        b.names = names  # type: ignore[attr-defined]
        yield b, ns
        finish(b, lambda: assert_network_clean(ns, names))


def run_vm(b: Banger, name: str, *flags: str) -> dict[str, object]:
    b.names.append(name)  # type: ignore[attr-defined]
    b.run("vm", "run", "-d", "--name", name, *flags)
    return b.show(name)


def test_tap_vms_get_addresses_and_find_each_other_by_name(tapns: tuple[Banger, str]) -> None:
    b, ns = tapns
    a, c = run_vm(b, "alpha"), run_vm(b, "charlie")
    assert a["network"] == "tap" and c["network"] == "tap"
    assert a["guest_ip"] != c["guest_ip"]
    assert str(a["guest_ip"]).startswith("172.30.0.")
    addr = b.run("vm", "ssh", "alpha", "--", "ip", "-4", "-o", "addr", "show", "eth0").stdout
    assert f"inet {a['guest_ip']}/24" in addr
    # The guest resolves names through the daemon on the gateway, never a host stub.
    resolv = b.run("vm", "ssh", "alpha", "--", "cat", "/etc/resolv.conf").stdout
    assert resolv.strip() == "nameserver 172.30.0.1"
    seen = b.run("vm", "ssh", "alpha", "--", "getent", "hosts", "charlie.vm").stdout
    assert seen.split()[0] == c["guest_ip"]
    ping = b.run("vm", "ssh", "alpha", "--", "busybox", "ping", "-c", "1", "-W", "5",
                 "charlie.vm", check=False)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    # Plain ssh by name through banger's ssh_config, and the ports a tap VM offers.
    cfg = b.home / "state" / "ssh" / "config"
    plain = in_ns(ns, "ssh", "-F", str(cfg), "-o", "BatchMode=yes", "charlie.vm", "hostname")
    assert plain.stdout.strip() == "charlie", plain.stderr
    ports = b.json("vm", "ports", "alpha")
    assert isinstance(ports, list)
    assert {"proto": "tcp", "port": 22, "endpoint": "alpha.vm:22"}.items() <= next(
        p for p in ports if p["port"] == 22 and p["endpoint"]).items()
    # The host asks the daemon's DNS on loopback.
    assert dig(ns, "alpha.vm") == a["guest_ip"]
    assert dig(ns, "nobody.vm") == ""
    # A stopped VM has no tap and no name; its address is kept for the next start.
    b.run("vm", "stop", "alpha")
    assert dig(ns, "alpha.vm") == ""
    assert len(taps(ns)) == 1
    b.run("vm", "start", "alpha")
    assert b.show("alpha")["guest_ip"] == a["guest_ip"]
    assert dig(ns, "alpha.vm") == a["guest_ip"]


REMOTE_SERVER = """
import http.server, os, sys
os.chdir(sys.argv[1])
srv = http.server.HTTPServer((sys.argv[2], 8080), http.server.SimpleHTTPRequestHandler)
print("ready", flush=True)
srv.serve_forever()
"""


@pytest.fixture
def remote(tapns: tuple[Banger, str], tmp_path: Path) -> Iterator[str]:
    """A 'remote' host in a second namespace, linked to the daemon's by a veth pair: the
    outside world as far as the guests can tell. It has no route to the guests' subnet."""
    b, ns = tapns
    (tmp_path / "hello.txt").write_text("hello from remote\n")
    with throwaway("bgr") as rns:
        subprocess.run(["ip", "-n", ns, "link", "add", "vr-h", "type", "veth", "peer", "name",
                        "vr-r", "netns", rns], check=True)
        for argv in (["ip", "-n", ns, "addr", "add", f"{HOST_SIDE}/24", "dev", "vr-h"],
                     ["ip", "-n", ns, "link", "set", "vr-h", "up"],
                     ["ip", "-n", rns, "addr", "add", f"{REMOTE_IP}/24", "dev", "vr-r"],
                     ["ip", "-n", rns, "link", "set", "vr-r", "up"]):
            subprocess.run(argv, check=True)
        server = subprocess.Popen(["ip", "netns", "exec", rns, sys.executable, "-c",
                                   REMOTE_SERVER, str(tmp_path), REMOTE_IP],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            assert server.stdout is not None and server.stdout.readline().strip() == "ready"
            yield f"http://{REMOTE_IP}:8080/hello.txt"
        finally:
            server.kill()
            server.wait()


def test_outbound_only_with_nat(tapns: tuple[Banger, str], remote: str) -> None:
    b, ns = tapns
    fetch = ["curl", "-sS", "--max-time", "5", remote]
    b.names += ["closed", "open"]  # type: ignore[attr-defined]
    closed = b.run("vm", "run", "--rm", "--name", "closed", "--", *fetch, check=False)
    assert closed.returncode != 0 and "hello" not in closed.stdout
    opened = b.run("vm", "run", "--rm", "--name", "open", "--nat", "--", *fetch)
    assert opened.stdout == "hello from remote\n"
    assert "prepare_host_features" in opened.stderr
    # Forwarding is on now, yet a VM without --nat still gets nowhere (the bridge guard).
    again = b.run("vm", "run", "--rm", "--name", "closed", "--", *fetch, check=False)
    assert again.returncode != 0
    assert vm_rules(ns) == [] and taps(ns) == []


def test_kill_and_failed_start_leave_no_tap_rule_or_name(tapns: tuple[Banger, str]) -> None:
    b, ns = tapns
    run_vm(b, "victim", "--nat")
    assert len(taps(ns)) == 1 and len(vm_rules(ns)) >= 3
    b.run("vm", "kill", "victim")
    assert_network_clean(ns, ["victim"])
    # A start that fails after its tap and NAT rules exist rolls them back.
    b.stop_daemon()
    b.env["BANGER_FAILPOINT"] = "wait_agent"
    failed = b.run("vm", "start", "victim", check=False)
    assert failed.returncode != 0 and "wait_agent" in failed.stderr
    assert_network_clean(ns, ["victim"])
    assert b.show("victim")["last_error_stage"] == "wait_agent"
    b.stop_daemon()
    del b.env["BANGER_FAILPOINT"]
    b.run("vm", "delete", "victim")


def test_reconcile_after_daemon_sigkill_removes_dead_vms_rules(
        tapns: tuple[Banger, str]) -> None:
    b, ns = tapns
    dead, alive = run_vm(b, "dies", "--nat"), run_vm(b, "lives", "--nat")
    dead_pid = dead["runtime"]["pid"]  # type: ignore[index]
    alive_pid = alive["runtime"]["pid"]  # type: ignore[index]
    b.stop_daemon(signal.SIGKILL)
    os.kill(dead_pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{dead_pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    # Meanwhile a firewall reload took the masquerade rules away (of both VMs).
    in_ns(ns, "nft", "flush", "chain", "inet", "banger", "postrouting", check=True)
    # The next command starts a new daemon, whose reconcile finishes the teardown of the
    # dead VM and puts the living one's rules back.
    states = {v["name"]: v["state"] for v in json.loads(b.run("vm", "list", "--json").stdout)}
    assert states == {"dies": "stopped", "lives": "running"}
    assert taps(ns) == [f"bt{alive['id']}"]
    assert vm_rules(ns) == [f"banger:{alive['id']}"] * 3  # masquerade + two forward
    assert dig(ns, "dies.vm") == "" and dig(ns, "lives.vm") == alive["guest_ip"]
    assert b.show("lives")["runtime"]["pid"] == alive_pid  # type: ignore[index]
    assert b.run("vm", "ssh", "lives", "--", "hostname").stdout.strip() == "lives"
