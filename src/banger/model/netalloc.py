"""Guest addresses for tap networking: gateway, deterministic IPs and MACs from the VM id.

Pure and stdlib only. The same VM id always asks for the same address first, so a VM
keeps its IP across restarts while it is free; collisions are resolved by probing the
next free host address, so the caller passes in every address already handed out.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection
from ipaddress import IPv4Address, IPv4Network


class SubnetFull(ValueError):
    """No guest address is left in the subnet; the message names it and what to change."""


def gateway(subnet: IPv4Network) -> IPv4Address:
    """The host's address on the bridge: the subnet's first host (172.30.0.1 in a /24)."""
    _check_size(subnet)
    return subnet.network_address + 1


def guest_capacity(subnet: IPv4Network) -> int:
    """How many guests fit: every host address except network, gateway and broadcast."""
    _check_size(subnet)
    return subnet.num_addresses - 3


def allocate_ip(vm_id: str, subnet: IPv4Network, used: Collection[IPv4Address]) -> IPv4Address:
    """The guest address for ``vm_id``: a hash of the id picks the first candidate, then
    the next free address (wrapping around) if that one is in ``used``."""
    capacity = guest_capacity(subnet)
    first = subnet.network_address + 2
    start = _hash_int(vm_id, b"ip") % capacity
    for step in range(capacity):
        candidate = first + (start + step) % capacity
        if candidate not in used:
            return candidate
    raise SubnetFull(
        f"no free guest address left in {subnet}: all {capacity} are in use; delete a VM "
        "or choose a larger subnet ([network] subnet)"
    )


def mac_for(vm_id: str) -> str:
    """A stable MAC for the guest NIC: QEMU's locally administered 52:54:00 prefix (unicast)
    followed by three bytes of a hash of the id."""
    tail = hashlib.sha256(b"mac\0" + vm_id.encode()).digest()[:3]
    return "52:54:00:" + ":".join(f"{b:02x}" for b in tail)


def _hash_int(vm_id: str, purpose: bytes) -> int:
    return int.from_bytes(hashlib.sha256(purpose + b"\0" + vm_id.encode()).digest()[:8], "big")


def _check_size(subnet: IPv4Network) -> None:
    # A /30 leaves exactly one guest; /31 and /32 have no room for gateway and guest.
    if subnet.prefixlen > 30:
        raise ValueError(f"subnet {subnet} is too small for a bridge: use /30 or larger "
                         "(e.g. a /24)")
