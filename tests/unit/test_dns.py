"""The .vm DNS server: answers from the table, over UDP and TCP on loopback, survives
garbage, and stops without leaving threads or sockets behind."""

from __future__ import annotations

import re
import shutil
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator

import pytest
from dnslib import QTYPE, RCODE, DNSRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from banger.host.dns import DnsError, DnsServer

LOOPBACK = "127.0.0.1"


@pytest.fixture
def server() -> Iterator[tuple[DnsServer, int]]:
    before = {t.ident for t in threading.enumerate()}
    dns = DnsServer()
    [(_, port)] = dns.start([(LOOPBACK, 0)])
    dns.set_record("box", "10.0.2.15")
    yield dns, port
    dns.stop()
    leaked = [t for t in threading.enumerate() if t.ident not in before and t.is_alive()]
    assert not leaked, f"threads left running: {leaked}"


def ask(port: int, name: str, qtype: str = "A", *, tcp: bool = False) -> DNSRecord:
    raw = DNSRecord.question(name, qtype).send(LOOPBACK, port, tcp=tcp, timeout=5)
    return DNSRecord.parse(raw)



@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_a_record(server: tuple[DnsServer, int], tcp: bool) -> None:
    _, port = server
    reply = ask(port, "box.vm", tcp=tcp)
    assert reply.header.rcode == RCODE.NOERROR
    assert reply.header.aa == 1 and reply.header.ra == 0
    [rr] = reply.rr
    assert str(rr.rdata) == "10.0.2.15" and rr.rtype == QTYPE.A and rr.ttl == 5


def test_case_insensitive(server: tuple[DnsServer, int]) -> None:
    dns, port = server
    dns.set_record("MixedCase", "10.0.2.16")
    for name in ("BOX.VM", "Box.Vm.", "mixedcase.vm", "MIXEDCASE.vm"):
        reply = ask(port, name)
        assert reply.header.rcode == RCODE.NOERROR and len(reply.rr) == 1, name
    # The answer echoes the question's spelling (resolvers using 0x20 randomisation check).
    assert str(ask(port, "BoX.vM").rr[0].rname) == "BoX.vM."


def test_nxdomain_carries_soa(server: tuple[DnsServer, int]) -> None:
    _, port = server
    for name in ("nope.vm", "a.box.vm"):
        reply = ask(port, name)
        assert reply.header.rcode == RCODE.NXDOMAIN
        assert not reply.rr
        [soa] = reply.auth
        assert soa.rtype == QTYPE.SOA and str(soa.rname) == "vm."


@pytest.mark.parametrize("qtype", ["AAAA", "MX", "TXT"])
def test_nodata_for_other_types(server: tuple[DnsServer, int], qtype: str) -> None:
    _, port = server
    reply = ask(port, "box.vm", qtype)
    assert reply.header.rcode == RCODE.NOERROR
    assert not reply.rr
    assert [a.rtype for a in reply.auth] == [QTYPE.SOA]


def test_apex_soa(server: tuple[DnsServer, int]) -> None:
    _, port = server
    reply = ask(port, "vm", "SOA")
    assert reply.header.rcode == RCODE.NOERROR
    assert [a.rtype for a in reply.rr] == [QTYPE.SOA]


def test_outside_zone_refused(server: tuple[DnsServer, int]) -> None:
    _, port = server
    for name in ("example.com", "box.vm.example.com", "vmx", "."):
        assert ask(port, name).header.rcode == RCODE.REFUSED, name


def test_table_updates(server: tuple[DnsServer, int]) -> None:
    dns, port = server
    dns.set_record("web", "10.0.2.20")
    assert str(ask(port, "web.vm").rr[0].rdata) == "10.0.2.20"
    dns.set_record("web", "10.0.2.21")
    assert str(ask(port, "web.vm").rr[0].rdata) == "10.0.2.21"
    dns.remove_record("web")
    dns.remove_record("web")  # idempotent
    assert ask(port, "web.vm").header.rcode == RCODE.NXDOMAIN
    dns.replace_all({"a": "10.0.2.30", "B": "10.0.2.31"})
    assert dns.records() == {"a": "10.0.2.30", "b": "10.0.2.31"}
    assert ask(port, "box.vm").header.rcode == RCODE.NXDOMAIN
    assert str(ask(port, "b.vm").rr[0].rdata) == "10.0.2.31"


def test_soa_serial_moves_with_changes() -> None:
    dns = DnsServer()

    def serial() -> int:
        raw = dns.answer(DNSRecord.question("vm", "SOA").pack())
        assert raw is not None
        return int(DNSRecord.parse(raw).rr[0].rdata.times[0])

    s0 = serial()
    dns.set_record("x", "10.0.0.1")
    s1 = serial()
    dns.set_record("x", "10.0.0.1")  # no change
    assert serial() == s1 > s0
    dns.replace_all({"x": "10.0.0.1"})
    assert serial() == s1


@pytest.mark.parametrize(("name", "ip"), [("a.b", "10.0.0.1"), ("", "10.0.0.1"),
                                          ("x" * 64, "10.0.0.1"), ("ok", "::1"),
                                          ("ok", "10.0.0.300")])
def test_invalid_records_rejected(name: str, ip: str) -> None:
    with pytest.raises(ValueError):
        DnsServer().set_record(name, ip)


def test_custom_zone() -> None:
    dns = DnsServer("Banger.Test.")
    dns.set_record("box", "10.0.0.9")
    raw = dns.answer(DNSRecord.question("box.banger.test").pack())
    assert raw is not None and str(DNSRecord.parse(raw).rr[0].rdata) == "10.0.0.9"
    raw = dns.answer(DNSRecord.question("box.vm").pack())
    assert raw is not None and DNSRecord.parse(raw).header.rcode == RCODE.REFUSED


def test_tcp_several_queries_one_connection(server: tuple[DnsServer, int]) -> None:
    _, port = server
    with socket.create_connection((LOOPBACK, port), timeout=5) as conn:
        for name in ("box.vm", "nope.vm", "box.vm"):
            q = DNSRecord.question(name).pack()
            conn.sendall(struct.pack("!H", len(q)) + q)
            (length,) = struct.unpack("!H", _recv(conn, 2))
            reply = DNSRecord.parse(_recv(conn, length))
            assert str(reply.q.qname) == name + "."


def _recv(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        assert chunk, "connection closed early"
        buf += chunk
    return buf


def test_stop_with_idle_tcp_client_is_prompt() -> None:
    dns = DnsServer()
    [(_, port)] = dns.start([(LOOPBACK, 0)])
    with socket.create_connection((LOOPBACK, port), timeout=5) as conn:
        conn.sendall(b"\x00")  # half a length prefix, then silence
        done = threading.Event()
        stopper = threading.Thread(target=lambda: (dns.stop(), done.set()))
        stopper.start()
        assert done.wait(3), "stop() waited for an idle client"
        stopper.join()
    dns.stop()  # idempotent


def test_several_listeners_add_remove() -> None:
    with DnsServer() as dns:
        a = dns.add_listener((LOOPBACK, 0))
        b = dns.add_listener(("127.0.0.2", 0))
        assert dns.add_listener(a) == a  # already listening: unchanged
        dns.set_record("box", "10.0.2.15")
        assert dns.addresses == sorted([a, b])
        for host, port in (a, b):
            raw = DNSRecord.question("box.vm").send(host, port, timeout=5)
            assert str(DNSRecord.parse(raw).rr[0].rdata) == "10.0.2.15"
        dns.remove_listener(b)
        dns.remove_listener(b)  # idempotent
        assert dns.addresses == [a]
        with pytest.raises(socket.timeout):
            DNSRecord.question("box.vm").send(b[0], b[1], timeout=0.3)
    # Everything is closed: the ports can be bound again (UDP and TCP).
    for host, port in (a, b):
        for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
            with socket.socket(socket.AF_INET, kind) as s:
                if kind == socket.SOCK_STREAM:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((host, port))


def test_port_in_use_is_a_clear_error() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind((LOOPBACK, 0))
        port = taken.getsockname()[1]
        dns = DnsServer()
        with pytest.raises(DnsError, match=re.escape(f"127.0.0.1:{port}")):
            dns.start([(LOOPBACK, 0), (LOOPBACK, port)])
        assert dns.addresses == []  # all or nothing


def test_unbindable_address_is_a_clear_error() -> None:
    with pytest.raises(DnsError, match=re.escape("192.0.2.1")):
        DnsServer().add_listener(("192.0.2.1", 0))  # TEST-NET-1: on no interface


def test_concurrent_updates_and_queries(server: tuple[DnsServer, int]) -> None:
    dns, port = server
    errors: list[BaseException] = []

    def writer() -> None:
        for i in range(300):
            dns.set_record(f"n{i % 7}", f"10.0.1.{i % 250}")
            if i % 50 == 0:
                dns.replace_all({"box": "10.0.2.15"})

    def reader() -> None:
        try:
            for _ in range(50):
                assert ask(port, "box.vm").header.rcode == RCODE.NOERROR
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer), *(threading.Thread(target=reader)
                                                  for _ in range(4))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


@pytest.mark.skipif(shutil.which("dig") is None, reason="dig not installed (bind9-dnsutils)")
@pytest.mark.parametrize("extra", [[], ["+tcp"]], ids=["udp", "tcp"])
def test_dig(server: tuple[DnsServer, int], extra: list[str]) -> None:
    _, port = server
    argv = ["dig", f"@{LOOPBACK}", "-p", str(port), "+norec", "+time=2", "+tries=1", *extra]
    out = subprocess.run([*argv, "+short", "box.vm"], capture_output=True, text=True,
                         timeout=10, check=True).stdout
    assert out.strip() == "10.0.2.15"
    full = subprocess.run([*argv, "nope.vm"], capture_output=True, text=True, timeout=10,
                          check=True).stdout
    assert "status: NXDOMAIN" in full and "flags: qr aa" in full


# -- robustness --------------------------------------------------------------------------

labels = st.text(alphabet=st.characters(codec="ascii"), min_size=1, max_size=63).filter(
    lambda s: "." not in s and "\\" not in s)


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.lists(labels, min_size=1, max_size=4),
       qtype=st.sampled_from(["A", "AAAA", "ANY", "SOA", "MX", "TXT", "CNAME", "NS"]),
       zone=st.booleans())
def test_random_names_always_answered(server: tuple[DnsServer, int], name: list[str],
                                      qtype: str, zone: bool) -> None:
    dns, port = server
    qname = ".".join([*name, "vm"] if zone else name)
    query = DNSRecord.question(qname, qtype)
    raw = dns.answer(query.pack())
    assert raw is not None
    reply = DNSRecord.parse(raw)
    assert reply.header.id == query.header.id
    assert reply.header.rcode in (RCODE.NOERROR, RCODE.NXDOMAIN, RCODE.REFUSED)
    if zone:
        assert reply.header.rcode != RCODE.REFUSED


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(packet=st.binary(max_size=600))
def test_garbage_never_raises(server: tuple[DnsServer, int], packet: bytes) -> None:
    dns, _ = server
    raw = dns.answer(packet)
    if raw is not None:
        DNSRecord.parse(raw)  # a reply we send is always well-formed


@settings(max_examples=50, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(packet=st.binary(max_size=600))
def test_server_survives_garbage_on_the_wire(server: tuple[DnsServer, int],
                                             packet: bytes) -> None:
    _, port = server
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(packet, (LOOPBACK, port))
    with socket.create_connection((LOOPBACK, port), timeout=5) as conn:
        conn.sendall(struct.pack("!H", len(packet)) + packet)
    assert ask(port, "box.vm").header.rcode == RCODE.NOERROR
    assert ask(port, "box.vm", tcp=True).header.rcode == RCODE.NOERROR


def test_responses_are_not_answered() -> None:
    dns = DnsServer()
    query = DNSRecord.question("box.vm")
    raw = dns.answer(query.reply().pack())
    assert raw is None


def test_relays_outside_the_zone_only_for_clients_the_policy_names() -> None:
    """Guests with outbound access get other names through an upstream; others do not."""
    upstream = DnsServer(zone="example")
    upstream.set_record("www", "192.0.2.7")
    allowed: set[str] = set()
    with upstream:
        (up,) = upstream.start([("127.0.0.1", 0)])
        relay = DnsServer(forward=lambda client: up if client in allowed else None)
        relay.set_record("box", "10.0.0.5")
        with relay:
            (addr,) = relay.start([("127.0.0.1", 0)])
            q = DNSRecord.question("www.example", "A")
            refused = DNSRecord.parse(q.send(addr[0], addr[1], timeout=2))
            assert refused.header.rcode == RCODE.REFUSED
            allowed.add("127.0.0.1")
            relayed = DNSRecord.parse(q.send(addr[0], addr[1], timeout=2))
            assert relayed.header.rcode == RCODE.NOERROR
            assert [str(r.rdata) for r in relayed.rr] == ["192.0.2.7"]
            # Its own zone is still answered locally.
            own = DNSRecord.parse(DNSRecord.question("box.vm", "A").send(*addr, timeout=2))
            assert [str(r.rdata) for r in own.rr] == ["10.0.0.5"]


def test_relay_to_a_dead_upstream_is_servfail() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))  # bound, never answers
        dead = silent.getsockname()
        relay = DnsServer(forward=lambda client: dead)
        with relay:
            (addr,) = relay.start([("127.0.0.1", 0)])
            reply = DNSRecord.parse(DNSRecord.question("www.example", "A").send(
                addr[0], addr[1], timeout=5))
            assert reply.header.rcode == RCODE.SERVFAIL


def test_relay_to_a_black_hole_holds_up_no_other_answer() -> None:
    # A --nat guest asking for names whose servers never answer held the listener's one
    # thread RELAY_TIMEOUT per query: every other guest's `.vm` lookups (and relays)
    # waited behind it, for as long as the guest kept asking.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))  # bound, never answers
        dead = silent.getsockname()
        relay = DnsServer(forward=lambda client: dead)
        relay.set_record("box", "10.0.0.5")
        with relay:
            (addr,) = relay.start([("127.0.0.1", 0)])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as guest:
                for i in range(20):  # more than one client may have waiting
                    guest.sendto(DNSRecord.question(f"n{i}.black.hole", "A").pack(), addr)
                for _ in range(3):
                    own = DNSRecord.parse(DNSRecord.question("box.vm", "A").send(
                        *addr, timeout=0.5))
                    assert [str(r.rdata) for r in own.rr] == ["10.0.0.5"]
                # Past its share, the guest's relays fail at once instead of queueing.
                guest.settimeout(0.5)
                replies = [DNSRecord.parse(guest.recv(65535)) for _ in range(12)]
                assert all(r.header.rcode == RCODE.SERVFAIL for r in replies)
