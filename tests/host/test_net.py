"""Real bridges, taps, nft rules and forwarded traffic, all inside throwaway namespaces.

The code under test runs in a "host" netns the test thread enters (see netns.py). Guest
and remote machines are further namespaces joined by veth pairs: the guest's veth sits in
the bridge where a VM's tap would. Traffic only ever goes between these namespaces.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path

import pytest
from netns import current_inode, entered, run_in, throwaway

from banger.host import nat, net
from banger.host.net import NetworkError
from banger.host.network import LocalNet

pytestmark = [
    pytest.mark.host,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, nft)"),
    pytest.mark.skipif(shutil.which("nft") is None or shutil.which("ip") is None,
                       reason="nftables / iproute2 not installed"),
]

BRIDGE = "bgbr0"
GATEWAY = "172.30.0.1/24"
GUEST_IP = IPv4Address("172.30.0.5")
REMOTE_IP = "198.51.100.2"
HOST_REMOTE_SIDE = "198.51.100.1"
PORT = 7777


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def root_state() -> tuple[int, set[str], str, str]:
    links = {item["ifname"] for item in json.loads(sh("ip", "-j", "link", "show"))}
    with open("/proc/sys/net/ipv4/ip_forward") as f:
        forward = f.read()
    return current_inode(), links, sh("nft", "list", "ruleset"), forward


@pytest.fixture(autouse=True)
def root_untouched() -> Iterator[None]:
    """Leak check on the namespace the tests start in: nothing added, nothing changed."""
    before = root_state()
    yield
    after = root_state()
    assert after[0] == before[0], "test thread left in a foreign namespace"
    assert after[1] - before[1] == set(), "links appeared in the root namespace"
    assert "banger" not in after[2]
    assert after[2:] == before[2:], "root namespace nft ruleset or ip_forward changed"


@pytest.fixture
def hostns() -> Iterator[str]:
    with throwaway("bgt-host") as ns, entered(ns):
        yield ns


def link(name: str) -> net.Link:
    found = net.get_link(name)
    assert found is not None
    return found


def addresses(name: str) -> set[str]:
    out = json.loads(sh("ip", "-j", "-4", "addr", "show", "dev", name))
    return {f"{a['local']}/{a['prefixlen']}" for item in out for a in item["addr_info"]}


def test_bridge_is_created_once_and_owned(hostns: str) -> None:
    assert net.ensure_bridge(BRIDGE, GATEWAY) is True
    assert net.ensure_bridge(BRIDGE, IPv4Interface(GATEWAY)) is False
    br = link(BRIDGE)
    assert (br.kind, br.owned, br.up) == ("bridge", True, True)
    assert addresses(BRIDGE) == {GATEWAY}
    # A changed subnet moves the gateway; the old address does not linger.
    assert net.ensure_bridge(BRIDGE, "172.31.0.1/24") is False
    assert addresses(BRIDGE) == {"172.31.0.1/24"}
    assert net.delete_bridge(BRIDGE) is True
    assert net.delete_bridge(BRIDGE) is False
    assert net.get_link(BRIDGE) is None


@pytest.mark.parametrize("kind", [["bridge"], ["veth", "peer", "name", "br-y"]])
def test_foreign_interface_is_refused(hostns: str, kind: list[str]) -> None:
    sh("ip", "link", "add", "name", "br-x", "type", *kind)
    with pytest.raises(NetworkError, match=r"'br-x'.*\[network\] bridge"):
        net.ensure_bridge("br-x", GATEWAY)
    with pytest.raises(NetworkError, match="not created by banger"):
        net.delete_bridge("br-x")
    assert addresses("br-x") == set()


def uid_names(uid: int) -> set[str]:
    try:
        return {pwd.getpwuid(uid).pw_name}
    except KeyError:
        return set()


def test_tap_lifecycle(hostns: str) -> None:
    net.ensure_bridge(BRIDGE, GATEWAY)
    sh("ip", "tuntap", "add", "dev", "foreign0", "mode", "tap")
    assert net.create_tap("bt0123", BRIDGE, owner_uid=1000) is True
    tap = link("bt0123")
    assert (tap.kind, tap.owned, tap.master, tap.up) == ("tun", True, BRIDGE, True)
    info = json.loads(sh("ip", "-j", "-d", "link", "show", "dev", "bt0123"))[0]
    assert info["linkinfo"]["info_data"]["type"] == "tap"
    # ip prints the owner by name when the uid has one.
    assert str(info["linkinfo"]["info_data"]["user"]) in {"1000", *uid_names(1000)}
    assert net.tap_exists("bt0123")
    assert net.list_banger_taps() == ["bt0123"]
    assert net.create_tap("bt0123", BRIDGE) is False  # reattached, not duplicated
    with pytest.raises(NetworkError, match="'foreign0'"):
        net.create_tap("foreign0", BRIDGE)
    with pytest.raises(NetworkError, match="not created by banger"):
        net.delete_tap("foreign0")
    assert net.delete_tap("bt0123") is True
    assert net.delete_tap("bt0123") is False
    assert not net.tap_exists("bt0123")
    assert net.list_banger_taps() == []


def test_tap_on_missing_bridge_is_rolled_back(hostns: str) -> None:
    with pytest.raises(net.CommandError):
        net.create_tap("bt0456", "nobridge")
    assert not net.tap_exists("bt0456")


def rule_comments() -> list[str]:
    return [r["comment"] for r in
            (item["rule"] for item in nat.list_ruleset() if "rule" in item)
            if "comment" in r]


def test_nat_rules_are_added_and_removed_by_vm_id(hostns: str) -> None:
    assert nat.nat_vm_ids() == set()
    assert nat.remove_nat("aaa") == 0  # nothing there yet: still fine
    setup = nat.add_nat("aaa", GUEST_IP, BRIDGE)
    assert setup.rules == 3 and setup.forward_drops == ()
    nat.add_nat("bbb", IPv4Address("172.30.0.6"), BRIDGE, out_iface="eth9")
    nat.add_nat("aaa", GUEST_IP, BRIDGE)  # replaces, never duplicates
    assert sorted(rule_comments()) == ["banger:aaa"] * 3 + ["banger:bbb"] * 3
    assert nat.nat_vm_ids() == {"aaa", "bbb"}
    assert nat.remove_nat("aaa") == 3
    assert nat.remove_nat("aaa") == 0
    assert nat.nat_vm_ids() == {"bbb"}
    assert rule_comments() == ["banger:bbb"] * 3
    ruleset = sh("nft", "list", "table", "inet", "banger")
    assert 'oifname "eth9" masquerade' in ruleset and "172.30.0.6" in ruleset
    assert nat.delete_nat_table() is True
    assert nat.delete_nat_table() is False
    assert nat.nat_vm_ids() == set()


def test_ip_forward_is_per_namespace(hostns: str) -> None:
    assert not nat.ip_forward_enabled()
    assert nat.ensure_ip_forward() is True
    assert nat.ensure_ip_forward() is False
    assert nat.ip_forward_enabled()
    # root_untouched checks the original namespace still has its own value.


def test_ip_forward_is_restored_when_the_last_nat_vm_goes(hostns: str, tmp_path: Path) -> None:
    record = tmp_path / "ip_forward.orig"
    host = LocalNet(record)
    assert host.ensure_bridge(BRIDGE, IPv4Interface(GATEWAY))
    assert not nat.ip_forward_enabled()
    lines = host.add_nat("vm1", GUEST_IP, BRIDGE)
    assert any("enabled IPv4 forwarding" in line for line in lines), lines
    assert nat.ip_forward_enabled() and record.read_text().strip() == "0"
    host.add_nat("vm2", IPv4Address("172.30.0.6"), BRIDGE)
    host = LocalNet(record)  # a daemon restart: the original is read back from disk
    assert host.remove_nat("vm1") > 0
    assert nat.ip_forward_enabled(), "vm2 still needs forwarding"
    assert host.remove_nat("vm2") > 0
    assert not nat.ip_forward_enabled() and not record.exists()
    # Forwarding that was on before banger (a router, Docker) stays on.
    nat.ensure_ip_forward()
    assert not any("forwarding" in line for line in host.add_nat("vm3", GUEST_IP, BRIDGE))
    assert not record.exists()
    host.remove_nat("vm3")
    assert nat.ip_forward_enabled()


@dataclass
class Topology:
    host: str
    guest: str
    remote: str

    def reach(self) -> str | None:
        """Connect from the guest to the remote server; the source address it saw, or
        None when no connection came up within a second and a half."""
        client = (f"import socket; s = socket.create_connection(({REMOTE_IP!r}, {PORT}), "
                  "timeout=1.5); print(s.recv(64).decode())")
        out = run_in(self.guest, sys.executable, "-c", client)
        return out.stdout.strip() if out.returncode == 0 else None


SERVER = f"""
import socket
srv = socket.create_server(({REMOTE_IP!r}, {PORT}))
print("ready", flush=True)
while True:
    conn, peer = srv.accept()
    conn.sendall(peer[0].encode())
    conn.close()
"""


@pytest.fixture
def topology(hostns: str) -> Iterator[Topology]:
    """host (bridge, gateway) - guest (veth in the bridge, default route via the gateway);
    host - remote on 198.51.100.0/24, with no route back to the guests' subnet, so only
    masqueraded traffic gets an answer."""
    with throwaway("bgt-guest") as guest, throwaway("bgt-remote") as remote:
        net.ensure_bridge(BRIDGE, GATEWAY)
        sh("ip", "link", "add", "vg-h", "type", "veth", "peer", "name", "vg-g", "netns", guest)
        sh("ip", "link", "set", "dev", "vg-h", "master", BRIDGE, "up")
        for argv in (["ip", "addr", "add", f"{GUEST_IP}/24", "dev", "vg-g"],
                     ["ip", "link", "set", "dev", "vg-g", "up"],
                     ["ip", "route", "add", "default", "via", "172.30.0.1"]):
            assert run_in(guest, *argv).returncode == 0
        sh("ip", "link", "add", "vr-h", "type", "veth", "peer", "name", "vr-r", "netns",
           remote)
        sh("ip", "addr", "add", f"{HOST_REMOTE_SIDE}/24", "dev", "vr-h")
        sh("ip", "link", "set", "dev", "vr-h", "up")
        for argv in (["ip", "addr", "add", f"{REMOTE_IP}/24", "dev", "vr-r"],
                     ["ip", "link", "set", "dev", "vr-r", "up"]):
            assert run_in(remote, *argv).returncode == 0
        server = subprocess.Popen(["ip", "netns", "exec", remote, sys.executable, "-c", SERVER],
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout is not None and server.stdout.readline().strip() == "ready"
            yield Topology(hostns, guest, remote)
        finally:
            server.kill()
            server.wait()


def test_nat_gives_the_guest_outbound_access(topology: Topology) -> None:
    assert topology.reach() is None  # ip_forward off
    assert nat.ensure_ip_forward() is True
    assert topology.reach() is None  # forwarded, but the remote cannot answer 172.30.0.5
    nat.add_nat("vm1", GUEST_IP, BRIDGE)
    assert topology.reach() == HOST_REMOTE_SIDE  # masqueraded behind the host
    assert nat.remove_nat("vm1") == 3
    assert topology.reach() is None


def test_guard_keeps_guests_without_nat_closed_even_when_routed(topology: Topology) -> None:
    """A remote that routes the guests' subnet back (a LAN router would) gets through to a
    guest without NAT once forwarding is on - unless the bridge's guard is there."""
    assert run_in(topology.remote, "ip", "route", "add", "172.30.0.0/24", "via",
                  HOST_REMOTE_SIDE).returncode == 0
    nat.ensure_ip_forward()
    assert topology.reach() == str(GUEST_IP)  # plain routing: the guest is out
    assert nat.ensure_guard(BRIDGE) is True
    assert nat.ensure_guard(BRIDGE) is False  # idempotent
    assert topology.reach() is None  # guarded: no NAT, no way out
    nat.add_nat("vm1", GUEST_IP, BRIDGE)
    assert topology.reach() == HOST_REMOTE_SIDE  # its NAT rules go ahead of the guard
    nat.remove_nat("vm1")
    assert topology.reach() is None
    assert nat.nat_vm_ids() == set()  # the guard is not a VM's rule


IPTABLES = shutil.which("iptables-nft")


def add_foreign_forward_drop(docker: bool) -> None:
    """What Docker leaves through iptables-nft: ip filter FORWARD, policy drop, jumping
    first to DOCKER-USER (which returns). Made with iptables-nft itself when installed."""
    if IPTABLES:
        sh(IPTABLES, "-P", "FORWARD", "DROP")
        if docker:
            sh(IPTABLES, "-N", "DOCKER-USER")
            sh(IPTABLES, "-A", "DOCKER-USER", "-j", "RETURN")
            sh(IPTABLES, "-A", "FORWARD", "-j", "DOCKER-USER")
        return
    sh("nft", "add", "table", "ip", "filter")
    sh("nft", "add", "chain", "ip", "filter", "FORWARD",
       "{ type filter hook forward priority 0; policy drop; }")
    if docker:
        sh("nft", "add", "chain", "ip", "filter", "DOCKER-USER")
        sh("nft", "add", "rule", "ip", "filter", "DOCKER-USER", "counter", "return")
        sh("nft", "add", "rule", "ip", "filter", "FORWARD", "counter", "jump", "DOCKER-USER")


@pytest.mark.parametrize("docker", [True, False], ids=["docker-user", "plain-forward"])
def test_foreign_forward_drop_gets_accept_rules(topology: Topology, docker: bool) -> None:
    nat.ensure_ip_forward()
    add_foreign_forward_drop(docker)
    accept_in = "DOCKER-USER" if docker else "FORWARD"
    [drop] = nat.forward_drop_chains()
    assert (str(drop.chain), drop.accept_in.name) == ("ip filter FORWARD", accept_in)
    setup = nat.add_nat("vm1", GUEST_IP, BRIDGE)
    assert setup.forward_drops == (drop,)
    assert setup.rules == 5
    assert any(accept_in in line for line in setup.describe())
    assert topology.reach() == HOST_REMOTE_SIDE
    if IPTABLES:
        # iptables-nft (Docker) must still be able to read and edit its table.
        listing = sh(IPTABLES, "-S", accept_in)
        assert listing.count('--comment "banger:vm1"') == 2
        if docker:
            sh(IPTABLES, "-C", "FORWARD", "-j", "DOCKER-USER")

    # Only the rules in the foreign chain let the traffic through it.
    foreign = [item["rule"] for item in nat.list_ruleset()
               if "rule" in item and item["rule"]["table"] == "filter"
               and item["rule"].get("comment") == "banger:vm1"]
    assert len(foreign) == 2 and {r["chain"] for r in foreign} == {accept_in}
    for rule in foreign:
        sh("nft", "delete", "rule", "ip", "filter", accept_in, "handle", str(rule["handle"]))
    assert topology.reach() is None

    nat.add_nat("vm1", GUEST_IP, BRIDGE)
    assert topology.reach() == HOST_REMOTE_SIDE
    assert nat.remove_nat("vm1") == 5
    assert "banger" not in sh("nft", "list", "table", "ip", "filter")
    assert topology.reach() is None
