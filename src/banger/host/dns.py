"""banger's DNS: an authoritative server for ``<name>.vm`` answering from memory.

Owns the name table (the daemon keeps it in step with the VMs: :meth:`DnsServer.set_record`
on start, :meth:`~DnsServer.remove_record` on stop/delete, :meth:`~DnsServer.replace_all`
after reconcile) and the listeners (UDP and TCP on the same port, on several addresses:
loopback for the host, later the bridge gateway for guests). Wire format is ``dnslib``;
the sockets are ``socketserver`` because dnslib's ``DNSServer`` neither closes its socket
nor joins its threads on ``stop()``, prints every query to stdout, shares UDP ports
(``SO_REUSEADDR``) and lets non-DNSError parse failures escape as tracebacks.

Answers, for the zone (default ``vm``), case-insensitively:

- ``<name>.<zone>`` A (or ANY): the address, TTL :data:`TTL`;
- ``<name>.<zone>`` of another type: NOERROR without answers (NODATA), SOA in authority;
- an unknown name in the zone: NXDOMAIN, SOA in authority (RFC 2308 negative caching);
- the zone apex: its SOA (or NODATA);
- anything outside the zone: REFUSED (this is not a recursive resolver).

A malformed query gets FORMERR when its header is readable and is dropped otherwise; it
never stops the server.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import socketserver
import struct
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from dnslib import QTYPE, RCODE, RR, SOA, A, DNSHeader, DNSRecord

log = logging.getLogger(__name__)

DEFAULT_ZONE = "vm"
# Short, so a VM that was recreated with another address is found again within seconds.
TTL = 5
# A TCP client that sends nothing for this long is hung up on (and stop() never waits
# longer than this for a handler thread, since stop() closes the connections first).
TCP_IDLE_TIMEOUT = 10.0
RELAY_TIMEOUT = 2.0  # an upstream that does not answer by then gets the client SERVFAIL
MAX_RELAYS_PER_CLIENT = 8  # UDP relays waiting at once for one client (see _UdpServer)
MAX_RELAYS = 64
# Guests can open connections too: bound the threads one listener can be made to hold.
MAX_TCP_CONNECTIONS = 64
# How often an idle serve_forever loop looks for a shutdown request; bounds stop()'s wait.
POLL_INTERVAL = 0.1
# With port 0 the TCP socket picks the port and UDP must get the same one; another
# program may hold it for UDP, so a few fresh ports are tried.
BIND_ATTEMPTS = 20

Address = tuple[str, int]


class DnsError(Exception):
    """A listener could not be set up (or torn down); the message names the address."""


@dataclass(frozen=True)
class Relay:
    """A query outside the zone that goes to ``upstream`` (see :meth:`DnsServer.answer_local`)."""

    request: Any
    upstream: Address


@dataclass(frozen=True)
class _Listener:
    udp: _UdpServer
    tcp: _TcpServer
    threads: tuple[threading.Thread, threading.Thread]


class DnsServer:
    """The ``.vm`` zone: a thread-safe name table and any number of listeners.

    Names are single DNS labels (a VM name); they are stored and matched lower-case.
    """

    def __init__(self, zone: str = DEFAULT_ZONE, *, ttl: int = TTL,
                 forward: Callable[[str], Address | None] | None = None) -> None:
        """``forward(client_ip)`` names the upstream resolver that queries outside the
        zone from that client are relayed to (None: refused). Guests with outbound
        access need names beyond ``.vm``; guests without it get nothing relayed."""
        self.forward = forward
        zone_labels = tuple(p.encode("ascii").lower() for p in zone.strip(".").split("."))
        if not all(zone_labels):
            raise ValueError(f"invalid DNS zone {zone!r}")
        self.zone = ".".join(p.decode() for p in zone_labels)
        self.ttl = ttl
        self._zone_labels = zone_labels
        self._records: dict[bytes, str] = {}
        self._serial = 1
        self._lock = threading.Lock()
        self._listeners: dict[Address, _Listener] = {}
        self._listeners_lock = threading.Lock()

    # -- the table -----------------------------------------------------------------------

    def set_record(self, name: str, ip: str) -> None:
        """Point ``<name>.<zone>`` at the IPv4 address ``ip`` (replacing any old one)."""
        key, addr = _label(name), str(ipaddress.IPv4Address(ip))
        with self._lock:
            if self._records.get(key) != addr:
                self._records[key] = addr
                self._serial += 1

    def remove_record(self, name: str) -> None:
        """Forget ``<name>.<zone>``; an unknown name is fine."""
        with self._lock:
            if self._records.pop(_label(name), None) is not None:
                self._serial += 1

    def replace_all(self, mapping: Mapping[str, str]) -> None:
        """Make the table exactly ``mapping`` (name -> IPv4), in one step."""
        new = {_label(n): str(ipaddress.IPv4Address(ip)) for n, ip in mapping.items()}
        with self._lock:
            if new != self._records:
                self._records = new
                self._serial += 1

    def records(self) -> dict[str, str]:
        """A copy of the table: name -> IPv4."""
        with self._lock:
            return {k.decode(): v for k, v in self._records.items()}

    # -- answering -----------------------------------------------------------------------

    def answer(self, packet: bytes, client: str | None = None) -> bytes | None:
        """The reply to one wire-format query, or None when it deserves no reply
        (unreadable header, or a response rather than a query). Never raises."""
        local = self.answer_local(packet, client)
        if isinstance(local, Relay):
            return _relay(packet, local.upstream) or _servfail(local.request)
        return local

    def answer_local(self, packet: bytes, client: str | None = None) -> bytes | Relay | None:
        """:meth:`answer` from memory, or the :class:`Relay` still to be done (which may wait
        :data:`RELAY_TIMEOUT` on its upstream). Never raises."""
        try:
            request = DNSRecord.parse(packet)
        except Exception:
            return _formerr(packet)
        if request.header.qr:  # a response: answering it could start a loop between servers
            return None
        try:
            reply = self._resolve(request)
            if reply.header.rcode == RCODE.REFUSED and client and self.forward is not None:
                upstream = self.forward(client)
                if upstream is not None:
                    return Relay(request, upstream)
            return bytes(reply.pack())
        except Exception:
            log.exception("DNS: failed to answer a query")
            return _formerr(packet)

    def _resolve(self, request: Any) -> Any:
        header = request.header
        if header.opcode != 0 or len(request.questions) != 1:
            return DNSRecord(DNSHeader(
                id=header.id, qr=1, rd=header.rd, opcode=header.opcode,
                rcode=RCODE.NOTIMP if header.opcode != 0 else RCODE.FORMERR))
        q = request.q
        reply = DNSRecord(DNSHeader(id=header.id, qr=1, aa=1, ra=0, rd=header.rd), q=q)
        labels = tuple(bytes(p).lower() for p in q.qname.label)
        n = len(self._zone_labels)
        in_zone = labels[len(labels) - n:] == self._zone_labels if len(labels) >= n else False
        if not in_zone or q.qclass not in (1, 255):  # IN, ANY
            reply.header.aa = 0
            reply.header.rcode = RCODE.REFUSED
            return reply
        host = labels[:len(labels) - n]
        with self._lock:
            ip = self._records.get(host[0]) if len(host) == 1 else None
            serial = self._serial
        soa = self._soa(serial)
        if not host:  # the apex
            if q.qtype in (QTYPE.SOA, QTYPE.ANY):
                reply.add_answer(soa)
            else:
                reply.add_auth(soa)
        elif ip is None:
            reply.header.rcode = RCODE.NXDOMAIN
            reply.add_auth(soa)
        elif q.qtype in (QTYPE.A, QTYPE.ANY):
            reply.add_answer(RR(q.qname, QTYPE.A, rdata=A(ip), ttl=self.ttl))
        else:
            reply.add_auth(soa)
        return reply

    def _soa(self, serial: int) -> Any:
        apex = self.zone + "."
        # Refresh/retry/expire matter only to secondaries (there are none); the last field
        # is the negative-caching TTL, kept as short as the records themselves.
        return RR(apex, QTYPE.SOA, ttl=self.ttl,
                  rdata=SOA(f"ns.{apex}", f"hostmaster.{apex}",
                            (serial % 2**32, 60, 60, 3600, self.ttl)))

    # -- listeners -----------------------------------------------------------------------

    def start(self, addresses: Iterable[Address]) -> list[Address]:
        """Listen on every address (UDP and TCP); returns the bound addresses (port 0
        becomes the real port). All or nothing: on a failure nothing stays open."""
        bound: list[Address] = []
        try:
            for addr in addresses:
                bound.append(self.add_listener(addr))
        except BaseException:
            for addr in reversed(bound):
                self.remove_listener(addr)
            raise
        return bound

    def stop(self) -> None:
        """Close every listener: loops ended, sockets closed, threads joined. Idempotent."""
        with self._listeners_lock:
            listeners = list(self._listeners.values())
            self._listeners.clear()
        _close(listeners)

    @property
    def addresses(self) -> list[Address]:
        """The addresses listened on, as bound (real ports)."""
        with self._listeners_lock:
            return sorted(self._listeners)

    def add_listener(self, address: Address) -> Address:
        """Listen on ``address`` (host, port) for UDP and TCP on one port; returns the bound
        address. Already listening there: returns it unchanged.

        Raises :class:`DnsError` when the address cannot be bound (in use, not configured
        on any interface yet, or a port below 1024 without the privilege).
        """
        host, port = address
        with self._listeners_lock:
            if port != 0 and (host, port) in self._listeners:
                return (host, port)
            udp, tcp = self._bind(host, port)
            bound = (host, tcp.server_address[1])
            threads = (
                threading.Thread(target=udp.serve_forever, args=(POLL_INTERVAL,),
                                 name=f"dns-udp-{host}:{bound[1]}", daemon=True),
                threading.Thread(target=tcp.serve_forever, args=(POLL_INTERVAL,),
                                 name=f"dns-tcp-{host}:{bound[1]}", daemon=True),
            )
            for t in threads:
                t.start()
            self._listeners[bound] = _Listener(udp, tcp, threads)
        log.info("DNS for .%s listening on %s:%d (udp, tcp)", self.zone, *bound)
        return bound

    def remove_listener(self, address: Address) -> None:
        """Stop listening on ``address`` (as returned by :meth:`add_listener`); unknown
        addresses are fine."""
        with self._listeners_lock:
            listener = self._listeners.pop(address, None)
        if listener is not None:
            _close([listener])

    def _bind(self, host: str, port: int) -> tuple[_UdpServer, _TcpServer]:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        last: OSError | None = None
        for _ in range(BIND_ATTEMPTS if port == 0 else 1):
            try:
                tcp = _TcpServer(family, (host, port), self)
            except OSError as exc:
                raise DnsError(f"cannot listen for DNS on {host}:{port} (tcp): "
                               f"{exc.strerror or exc}") from exc
            try:
                udp = _UdpServer(family, (host, tcp.server_address[1]), self)
            except OSError as exc:
                tcp.server_close()
                last = exc
                continue
            return udp, tcp
        assert last is not None
        raise DnsError(f"cannot listen for DNS on {host}:{port} (udp): "
                       f"{last.strerror or last}") from last

    def __enter__(self) -> DnsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _label(name: str) -> bytes:
    key = name.strip().lower().encode("ascii", errors="strict")
    if not key or len(key) > 63 or b"." in key:
        raise ValueError(f"invalid DNS name {name!r}: expected one label (a VM name)")
    return key


def _relay(packet: bytes, upstream: Address, timeout: float = RELAY_TIMEOUT) -> bytes | None:
    """Send ``packet`` to ``upstream`` over UDP and return its reply (None on timeout)."""
    family = socket.AF_INET6 if ":" in upstream[0] else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.settimeout(timeout)
            s.sendto(packet, upstream)
            reply, _ = s.recvfrom(65535)
            return reply
    except OSError as exc:
        log.info("DNS: relay to %s:%d failed: %s", upstream[0], upstream[1], exc)
        return None


def _servfail(request: Any) -> bytes:
    h = request.header
    return bytes(DNSRecord(DNSHeader(id=h.id, qr=1, rd=h.rd, ra=0, rcode=RCODE.SERVFAIL),
                           q=request.q).pack())


def _formerr(packet: bytes) -> bytes | None:
    if len(packet) < 12:
        return None
    ident, flags = struct.unpack("!HH", packet[:4])
    if flags & 0x8000:  # a response: answering it could start a loop between servers
        return None
    opcode, rd = (flags >> 11) & 0xF, (flags >> 8) & 1
    return bytes(DNSRecord(DNSHeader(id=ident, qr=1, opcode=opcode, rd=rd,
                                     rcode=RCODE.FORMERR)).pack())


def _close(listeners: list[_Listener]) -> None:
    # shutdown() waits for one loop at a time: ask every loop first, then wait.
    servers: list[socketserver.BaseServer] = [s for li in listeners for s in (li.udp, li.tcp)]
    stoppers = [threading.Thread(target=s.shutdown) for s in servers]
    for t in stoppers:
        t.start()
    for t in stoppers:
        t.join()
    for li in listeners:
        li.tcp.close_connections()
        for s in (li.udp, li.tcp):
            s.server_close()  # the TCP server also joins its handler threads here
        for t in li.threads:
            t.join()


class _UdpHandler(socketserver.BaseRequestHandler):
    server: _UdpServer

    def handle(self) -> None:
        data, sock = self.request
        client = self.client_address[0]
        local = self.server.dns.answer_local(data, client)
        if isinstance(local, Relay):
            if not self.server.relay_later(local, data, sock, self.client_address):
                _send(sock, _servfail(local.request), self.client_address)
            return
        if local is not None:
            _send(sock, local, self.client_address)


def _send(sock: socket.socket, reply: bytes, client: Any) -> None:
    with contextlib.suppress(OSError):
        sock.sendto(reply, client)


class _UdpServer(socketserver.UDPServer):
    # Answers from the table take microseconds: the listener's one thread gives them. A
    # relay may wait RELAY_TIMEOUT on an upstream that never answers (a guest asking for
    # names whose servers are black holes): it gets a thread of its own, at most
    # MAX_RELAYS_PER_CLIENT per client and MAX_RELAYS in all (beyond: SERVFAIL at once),
    # so one guest cannot hold up the `.vm` answers and relays of the others.
    # No SO_REUSEADDR: on Linux it would let a second server share the UDP port silently.
    allow_reuse_address = False
    max_packet_size = 65535

    def __init__(self, family: int, address: Address, dns: DnsServer) -> None:
        self.address_family = family
        self.dns = dns
        self._relays: dict[str, int] = {}
        self._relays_lock = threading.Lock()
        super().__init__(address, _UdpHandler)

    def relay_later(self, relay: Relay, packet: bytes, sock: socket.socket,
                    client: Any) -> bool:
        """Relay in a thread of its own; False when the client (or everyone) has too many
        relays waiting already."""
        ip = client[0]
        with self._relays_lock:
            if (self._relays.get(ip, 0) >= MAX_RELAYS_PER_CLIENT
                    or sum(self._relays.values()) >= MAX_RELAYS):
                return False
            self._relays[ip] = self._relays.get(ip, 0) + 1

        def run() -> None:
            try:
                reply = _relay(packet, relay.upstream) or _servfail(relay.request)
                _send(sock, reply, client)
            finally:
                with self._relays_lock:
                    self._relays[ip] -= 1
                    if not self._relays[ip]:
                        del self._relays[ip]

        # Daemonic: it ends within RELAY_TIMEOUT; a stop does not wait for it.
        threading.Thread(target=run, name=f"dns-relay-{ip}", daemon=True).start()
        return True

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.warning("DNS: error handling a UDP query from %s", client_address, exc_info=True)


class _TcpHandler(socketserver.BaseRequestHandler):
    """Length-prefixed messages, several per connection (RFC 7766), until EOF or idle."""

    server: _TcpServer

    def handle(self) -> None:
        conn: socket.socket = self.request
        conn.settimeout(TCP_IDLE_TIMEOUT)
        with contextlib.suppress(OSError):
            while True:
                head = _recv_exact(conn, 2)
                if head is None:
                    return
                (length,) = struct.unpack("!H", head)
                body = _recv_exact(conn, length)
                if body is None:
                    return
                reply = self.server.dns.answer(body, self.client_address[0])
                if reply is None:
                    return
                conn.sendall(struct.pack("!H", len(reply)) + reply)


def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


class _TcpServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True  # TIME_WAIT from an earlier run must not block a restart
    daemon_threads = False
    block_on_close = True  # server_close() joins the handler threads

    def __init__(self, family: int, address: Address, dns: DnsServer) -> None:
        self.address_family = family
        self.dns = dns
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(address, _TcpHandler)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        with self._conns_lock:
            if len(self._conns) >= MAX_TCP_CONNECTIONS:
                return False
            self._conns.add(request)
        return True

    def shutdown_request(self, request: Any) -> None:
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Wake every handler blocked in recv so server_close() can join it promptly."""
        with self._conns_lock:
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.warning("DNS: error handling a TCP query from %s", client_address, exc_info=True)
