"""The network port on this host: bridge, taps (banger.host.net) and nftables NAT with
IPv4 forwarding (banger.host.nat), for tap mode; needs root."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path
from typing import TypeVar

from banger.host import nat, net
from banger.host.runner import CommandError
from banger.model.errors import OperationFailed

T = TypeVar("T")


class LocalNet:
    """Bridge, taps and nftables NAT on this host (banger.host.net, banger.host.nat); needs root."""

    def __init__(self, ip_forward_record: Path | None = None) -> None:
        self._bridge_lock = threading.Lock()
        # ip_forward's value before banger turned it on, kept in the state dir so that a
        # restarted daemon still restores it when the last NAT VM goes.
        self._forward_record = ip_forward_record
        # Adding and removing NAT (and so turning forwarding on and off) never interleave:
        # a last VM going must not turn forwarding off under a VM being added.
        self._nat_lock = threading.Lock()

    def unavailable(self) -> str | None:
        if os.geteuid() != 0:
            return (f"tap networking needs root (bangerd runs as uid {os.geteuid()}) to "
                    "create the bridge, taps and NAT rules: run bangerd as root, or use "
                    "--network user (the default)")
        for tool in ("ip", "nft"):
            if shutil.which(tool) is None:
                return (f"tap networking needs `{tool}`, which is not installed "
                        f"(Debian: apt install {'iproute2' if tool == 'ip' else 'nftables'})")
        return None

    def ensure_bridge(self, name: str, gateway: IPv4Interface) -> bool:
        with self._bridge_lock:
            created = self._net(net.ensure_bridge, name, gateway)
            self._net(nat.ensure_guard, name)
            return created

    def create_tap(self, name: str, bridge: str) -> bool:
        # No owner: only root attaches to it; the daemon does, for QEMU (host.qemu).
        return self._net(net.create_tap, name, bridge)

    def delete_tap(self, name: str) -> bool:
        return self._net(net.delete_tap, name)

    def taps(self) -> list[str]:
        return self._net(net.list_banger_taps)

    def add_nat(self, vm_id: str, guest_ip: IPv4Address, bridge: str) -> list[str]:
        lines = []
        with self._nat_lock:
            if self._net(nat.ensure_ip_forward, self._forward_record):
                lines.append("enabled IPv4 forwarding (net.ipv4.ip_forward was 0; restored "
                             "when the last --nat VM goes)")
            setup = self._net(nat.add_nat, vm_id, guest_ip, bridge)
        return lines + setup.describe()

    def remove_nat(self, vm_id: str) -> int:
        with self._nat_lock:
            removed = self._net(nat.remove_nat, vm_id)
            if self._forward_record is not None and not self._net(nat.nat_vm_ids):
                self._net(nat.restore_ip_forward, self._forward_record)
            return removed

    def nat_vm_ids(self) -> set[str]:
        return self._net(nat.nat_vm_ids)

    @staticmethod
    def _net(fn: Callable[..., T], *args: object) -> T:
        try:
            return fn(*args)
        except (net.NetworkError, CommandError) as exc:
            raise OperationFailed(str(exc)) from exc
