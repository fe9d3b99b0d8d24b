"""Where a guest's listening sockets are reached from the host (``banger vm ports``).

Pure rules over what the guest reported and how the VM is networked:

- a socket bound only to loopback (127.0.0.0/8, ::1) never leaves the guest;
- the VM networks are IPv4 (QEMU's user network, the tap /24): a socket bound to an IPv6
  address only (``[::]`` with IPV6_V6ONLY, a global v6 address) is not reached either;
- tap networking: every other socket is at ``<name>.vm:<port>`` (the guest's own address);
- user networking: only the guest's sshd is forwarded, to a loopback port on the host.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from banger.model.vm import VM, NetworkMode
from banger.ports import Endpoint, ListeningSocket

GUEST_SSH_PORT = 22
DNS_ZONE = "vm"

LOOPBACK_ONLY = "guest loopback only"
IPV6_ONLY = "IPv6 only: the VM network is IPv4"
USER_MODE_UNREACHABLE = ("not reachable from the host in user networking: only ssh is "
                         "forwarded")


@dataclass(frozen=True)
class GuestSocketView:
    """A guest socket and where the host reaches it (None, with a note saying why not)."""

    socket: ListeningSocket
    endpoint: str | None
    note: str | None = None


def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address as an IP; None for the dual-stack wildcard "*" (or anything unreadable)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_loopback_only(address: str) -> bool:
    ip = _ip(address)
    return ip is not None and ip.is_loopback


def reaches_ipv4(address: str) -> bool:
    """True when IPv4 traffic can arrive at a socket bound to ``address``."""
    if address == "*":
        return True
    ip = _ip(address)
    return ip is None or isinstance(ip, ipaddress.IPv4Address)


def _view(vm: VM, ssh: Endpoint | None, s: ListeningSocket) -> GuestSocketView:
    if is_loopback_only(s.address):
        return GuestSocketView(s, None, LOOPBACK_ONLY)
    if not reaches_ipv4(s.address):
        return GuestSocketView(s, None, IPV6_ONLY)
    ip = _ip(s.address)
    wildcard = ip is None or ip.is_unspecified
    if vm.spec.network is NetworkMode.TAP:
        if not wildcard and vm.guest_ip is not None and str(ip) != vm.guest_ip:
            return GuestSocketView(s, None, f"bound to {s.address}, not the VM's address "
                                            f"{vm.guest_ip}")
        note = f"{vm.guest_ip}:{s.port}" if vm.guest_ip else None
        return GuestSocketView(s, f"{vm.name}.{DNS_ZONE}:{s.port}", note)
    if s.proto == "tcp" and s.port == GUEST_SSH_PORT and ssh is not None:
        return GuestSocketView(s, str(ssh), f"forwarded to the guest's port {GUEST_SSH_PORT}")
    return GuestSocketView(s, None, USER_MODE_UNREACHABLE)


def reachability(vm: VM, ssh: Endpoint | None,
                 sockets: Sequence[ListeningSocket]) -> list[GuestSocketView]:
    """Each of ``sockets`` with its host endpoint. ``ssh`` is the VM's ssh endpoint as the
    host reaches it (the forwarded loopback port in user networking)."""
    return [_view(vm, ssh, s) for s in sockets]
