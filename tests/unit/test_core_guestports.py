"""Where the host reaches a guest's sockets: pure rules per network mode."""

from __future__ import annotations

from banger.core.guestports import (
    IPV6_ONLY,
    LOOPBACK_ONLY,
    USER_MODE_UNREACHABLE,
    GuestSocketView,
    reachability,
)
from banger.model.vm import VM, NetworkMode, VMSpec, VMState
from banger.ports import Endpoint, ListeningSocket

SSH4 = ListeningSocket("tcp", "0.0.0.0", 22, "sshd")
SSH6 = ListeningSocket("tcp", "::", 22, "sshd")
WEB = ListeningSocket("tcp", "*", 8080, "busybox")
LOOP4 = ListeningSocket("tcp", "127.0.0.1", 5432, "postgres")
LOOP8 = ListeningSocket("udp", "127.0.0.53", 53, "resolved")
LOOP6 = ListeningSocket("tcp", "::1", 5432, "postgres")
MAPPED = ListeningSocket("tcp", "::ffff:127.0.0.1", 9000, None)
DNS = ListeningSocket("udp", "0.0.0.0", 53, "dnsmasq")
OTHER = ListeningSocket("tcp", "172.17.0.1", 3000, "node")


def vm(network: NetworkMode = NetworkMode.USER, guest_ip: str | None = None) -> VM:
    return VM(id="abc123abc123", name="box", spec=VMSpec(network=network),
              state=VMState.RUNNING, created_at=0, updated_at=0, guest_ip=guest_ip)


def by_key(views: list[GuestSocketView]) -> dict[tuple[str, str, int], tuple[str | None,
                                                                           str | None]]:
    return {(v.socket.proto, v.socket.address, v.socket.port): (v.endpoint, v.note)
            for v in views}


def test_user_mode_forwards_only_ssh() -> None:
    fwd = Endpoint("127.0.0.1", 40022)
    got = by_key(reachability(vm(), fwd, [SSH4, SSH6, WEB, LOOP4, LOOP8, LOOP6, MAPPED,
                                          DNS]))
    assert got[("tcp", "0.0.0.0", 22)][0] == "127.0.0.1:40022"
    # QEMU forwards to the guest's IPv4 address: a v6-only socket never sees it.
    assert got[("tcp", "::", 22)] == (None, IPV6_ONLY)
    assert got[("tcp", "*", 8080)] == (None, USER_MODE_UNREACHABLE)
    assert got[("udp", "0.0.0.0", 53)] == (None, USER_MODE_UNREACHABLE)
    for key in [("tcp", "127.0.0.1", 5432), ("udp", "127.0.0.53", 53),
                ("tcp", "::1", 5432), ("tcp", "::ffff:127.0.0.1", 9000)]:
        assert got[key] == (None, LOOPBACK_ONLY), key


def test_user_mode_udp_22_is_not_ssh() -> None:
    got = reachability(vm(), Endpoint("127.0.0.1", 40022),
                       [ListeningSocket("udp", "0.0.0.0", 22, None)])
    assert got[0].endpoint is None


def test_tap_mode_names_every_reachable_socket() -> None:
    tap = vm(NetworkMode.TAP, "172.16.0.2")
    got = by_key(reachability(tap, Endpoint("172.16.0.2", 22),
                              [SSH4, SSH6, WEB, LOOP4, DNS, OTHER,
                               ListeningSocket("tcp", "172.16.0.2", 8443, "caddy")]))
    assert got[("tcp", "0.0.0.0", 22)] == ("box.vm:22", "172.16.0.2:22")
    assert got[("tcp", "*", 8080)] == ("box.vm:8080", "172.16.0.2:8080")
    assert got[("udp", "0.0.0.0", 53)] == ("box.vm:53", "172.16.0.2:53")
    assert got[("tcp", "172.16.0.2", 8443)] == ("box.vm:8443", "172.16.0.2:8443")
    assert got[("tcp", "::", 22)] == (None, IPV6_ONLY)
    assert got[("tcp", "127.0.0.1", 5432)] == (None, LOOPBACK_ONLY)
    endpoint, note = got[("tcp", "172.17.0.1", 3000)]
    assert endpoint is None and note is not None and "172.17.0.1" in note


def test_order_is_kept() -> None:
    sockets = [WEB, SSH4, LOOP4]
    assert [v.socket for v in reachability(vm(), None, sockets)] == sockets
