"""Host side of tap networking: the bridge and one tap per VM.

Every change goes through the one command runner (``ip``); state is read back as JSON
(``ip -j``). The firewall side (NAT rules, the bridge's guard, ip_forward) is
:mod:`banger.host.nat`.

What banger creates is marked so that cleanup and reconcile find it and never touch what
is not theirs: links (bridge, taps) carry the alias ``banger-managed``.

Everything here acts on the network namespace of the calling thread.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from ipaddress import IPv4Interface
from typing import Any

from banger.host.runner import CommandError, Completed, run

MARKER = "banger-managed"

# IFNAMSIZ is 16 bytes with the NUL; '/', ':' and whitespace are refused by the kernel or
# by ip's parser, a leading '-' would read as an option.
_IFNAME = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.-]{0,14}$")
_GONE = ("does not exist", "Cannot find device")

Json = dict[str, Any]


class NetworkError(Exception):
    """A bridge, tap or firewall change failed or would touch something banger does not own."""


# --- links -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    """One network interface as ``ip -j -d link show`` reports it."""

    name: str
    kind: str | None  # "bridge", "tun", "veth", ...; None for a plain device
    alias: str | None
    master: str | None
    up: bool

    @property
    def owned(self) -> bool:
        return self.alias == MARKER


def get_link(name: str) -> Link | None:
    """The interface ``name``, or None when there is none."""
    check_ifname(name)
    out = run(["ip", "-j", "-d", "link", "show", "dev", name], check=False)
    if out.returncode != 0:
        if _is_gone(out):
            return None
        raise _error(out)
    links = [_link(item) for item in json.loads(out.stdout)]
    return links[0] if links else None


def list_links() -> list[Link]:
    """Every interface of the current network namespace."""
    out = run(["ip", "-j", "-d", "link", "show"])
    return [_link(item) for item in json.loads(out.stdout)]


def ensure_bridge(name: str, gateway_cidr: IPv4Interface | str) -> bool:
    """Make ``name`` a banger bridge carrying ``gateway_cidr`` (e.g. 172.30.0.1/24), up.

    Idempotent; returns whether the bridge was created by this call (so a rollback removes
    only what it made). An interface of that name that banger did not create is refused.
    Not safe against a concurrent ``ensure_bridge`` of the same name: callers serialize.
    """
    address = IPv4Interface(gateway_cidr)
    link = get_link(name)
    created = False
    if link is None:
        run(["ip", "link", "add", "name", name, "type", "bridge"])
        created = True
        try:
            run(["ip", "link", "set", "dev", name, "alias", MARKER])
        except CommandError:
            _delete_link(name)
            raise
        link = get_link(name)
    if link is None or link.kind != "bridge" or not link.owned:
        what = "a bridge" if link is not None and link.kind == "bridge" else "an interface"
        raise NetworkError(
            f"{what} named {name!r} already exists and was not created by banger; banger "
            "will not take it over: choose another bridge name ([network] bridge) or "
            f"remove {name} (ip link del {name})"
        )
    _set_only_address(name, address)
    run(["ip", "link", "set", "dev", name, "up"])
    return created


def delete_bridge(name: str) -> bool:
    """Remove banger's bridge ``name``; False when it was already gone."""
    return _delete_owned(name, "bridge")


def create_tap(name: str, bridge: str, owner_uid: int | None = None) -> bool:
    """Create the persistent tap ``name`` (usable by ``owner_uid`` without root), enslave it
    to ``bridge`` and bring it up. Returns whether it was created (False: banger's tap of
    that name was already there and is reattached)."""
    link = get_link(name)
    created = False
    if link is None:
        argv = ["ip", "tuntap", "add", "dev", name, "mode", "tap"]
        if owner_uid is not None:
            argv += ["user", str(owner_uid)]
        run(argv)
        created = True
    elif link.kind != "tun" or not link.owned:
        raise NetworkError(
            f"an interface named {name!r} already exists and was not created by banger; "
            "remove it or delete the VM it belongs to"
        )
    try:
        if created:
            run(["ip", "link", "set", "dev", name, "alias", MARKER])
        run(["ip", "link", "set", "dev", name, "master", bridge, "up"])
    except CommandError:
        if created:
            _delete_link(name)
        raise
    return created


def delete_tap(name: str) -> bool:
    """Remove banger's tap ``name``; False when it was already gone ("gone" is success)."""
    return _delete_owned(name, "tun")


def tap_exists(name: str) -> bool:
    return get_link(name) is not None


def list_banger_taps() -> list[str]:
    """Names of the taps banger created (for reconcile: compare with the VMs' tap names)."""
    return sorted(link.name for link in list_links() if link.kind == "tun" and link.owned)


def _set_only_address(name: str, address: IPv4Interface) -> None:
    # The bridge is ours: it carries exactly the configured gateway, so a changed subnet
    # does not leave the old address (and its route) behind.
    out = run(["ip", "-j", "-4", "addr", "show", "dev", name])
    present = {
        IPv4Interface(f"{a['local']}/{a['prefixlen']}")
        for item in json.loads(out.stdout)
        for a in item.get("addr_info", [])
        if a.get("family") == "inet"
    }
    if address not in present:
        run(["ip", "addr", "add", str(address), "dev", name])
    for stale in present - {address}:
        run(["ip", "addr", "del", str(stale), "dev", name])


def _delete_owned(name: str, kind: str) -> bool:
    link = get_link(name)
    if link is None:
        return False
    if link.kind != kind or not link.owned:
        raise NetworkError(f"refusing to delete {name!r}: it was not created by banger")
    return _delete_link(name)


def _delete_link(name: str) -> bool:
    out = run(["ip", "link", "del", "dev", name], check=False)
    if out.returncode == 0:
        return True
    if _is_gone(out):
        return False
    raise _error(out)


def _link(item: Json) -> Link:
    info = item.get("linkinfo") or {}
    return Link(
        name=item["ifname"],
        kind=info.get("info_kind"),
        alias=item.get("ifalias"),
        master=item.get("master"),
        up="UP" in item.get("flags", []),
    )


def check_ifname(name: str) -> None:
    """Refuse a name the kernel or ``ip`` would not take as an interface name."""
    if not _IFNAME.match(name):
        raise NetworkError(f"invalid interface name {name!r}: use 1-15 of A-Z a-z 0-9 _ . -")


def _is_gone(out: Completed) -> bool:
    return any(marker in out.stderr for marker in _GONE)


def _error(out: Completed) -> CommandError:
    return CommandError(out.argv, out.returncode, out.stdout, out.stderr)
