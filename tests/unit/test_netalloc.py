from __future__ import annotations

import re
from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from banger.model.netalloc import SubnetFull, allocate_ip, gateway, guest_capacity, mac_for

SUBNET = IPv4Network("172.30.0.0/24")
ids = st.text(alphabet="0123456789abcdef", min_size=1, max_size=12)


def test_gateway_is_first_host() -> None:
    assert gateway(SUBNET) == IPv4Address("172.30.0.1")
    assert gateway(IPv4Network("10.9.0.0/16")) == IPv4Address("10.9.0.1")
    assert guest_capacity(SUBNET) == 253


@pytest.mark.parametrize("net", ["10.0.0.0/31", "10.0.0.1/32"])
def test_too_small_subnet_is_refused(net: str) -> None:
    with pytest.raises(ValueError, match="too small"):
        gateway(IPv4Network(net))


@given(ids, st.sampled_from(["172.30.0.0/24", "10.0.0.0/30", "192.168.64.0/22"]))
def test_ip_is_deterministic_and_usable(vm_id: str, net: str) -> None:
    subnet = IPv4Network(net)
    ip = allocate_ip(vm_id, subnet, set())
    assert ip == allocate_ip(vm_id, subnet, set())
    assert ip in subnet
    assert ip not in {subnet.network_address, gateway(subnet), subnet.broadcast_address}


@given(st.lists(ids, unique=True, max_size=300))
def test_distinct_ids_never_share_an_ip(vm_ids: list[str]) -> None:
    used: set[IPv4Address] = set()
    for vm_id in vm_ids[:253]:
        ip = allocate_ip(vm_id, SUBNET, used)
        assert ip not in used
        used.add(ip)
    if len(vm_ids) > 253:
        with pytest.raises(SubnetFull, match=re.escape("172.30.0.0/24")):
            allocate_ip(vm_ids[253], SUBNET, used)


def test_full_subnet_names_it() -> None:
    subnet = IPv4Network("10.0.0.0/29")
    used: set[IPv4Address] = set()
    while len(used) < guest_capacity(subnet):
        used.add(allocate_ip(f"x{len(used)}", subnet, used))
    with pytest.raises(SubnetFull, match=r"10\.0\.0\.0/29.*\[network\] subnet"):
        allocate_ip("another", subnet, used)


@given(ids)
def test_mac_is_stable_unicast_locally_administered(vm_id: str) -> None:
    mac = mac_for(vm_id)
    assert mac == mac_for(vm_id)
    assert re.fullmatch(r"([0-9a-f]{2}:){5}[0-9a-f]{2}", mac)
    first = int(mac[:2], 16)
    assert first & 0x02 and not first & 0x01
