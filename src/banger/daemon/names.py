"""`<name>.vm` for running tap VMs: the daemon's DNS server, kept in step with the VM list.

One server, two kinds of listener: 127.0.0.1:<[network] dns_port> for the host (route
``.vm`` there, e.g. with systemd-resolved: ``resolvectl dns banger0 <gateway>`` and
``resolvectl domain banger0 ~vm``, or point a dnsmasq ``server=/vm/127.0.0.1#<port>`` at
it), and the bridge gateway on port 53 for guests, which have it as their only resolver.
Names outside ``.vm`` are relayed to the host's own resolver only for guests that have
outbound access (--nat); the others get REFUSED, as their network is closed anyway.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from banger.core.service import VMView
from banger.host.dns import Address, DnsError, DnsServer
from banger.model import netalloc
from banger.model.config import Config
from banger.model.vm import NetworkMode, VMState

log = logging.getLogger(__name__)


def host_resolver(resolv_conf: Path = Path("/etc/resolv.conf")) -> Address | None:
    """The host's first nameserver (a loopback stub is fine: the daemon runs on the host)."""
    try:
        lines = resolv_conf.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            return (parts[1].split("%")[0], 53)
    return None


class VmNames:
    def __init__(self, load_config: Callable[[], Config],
                 upstream: Callable[[], Address | None] = host_resolver) -> None:
        self._load_config = load_config
        self._upstream = upstream
        self._lock = threading.Lock()
        self._nat_clients: set[str] = set()
        self._bridge_listener: Address | None = None
        self.dns = DnsServer(forward=self._forward)
        self.host_listener: Address | None = None
        self.problems: list[str] = []

    def start(self) -> None:
        port = self._config().network.dns_port
        self.dns.start([])
        if port:
            try:
                self.host_listener = self.dns.add_listener(("127.0.0.1", port))
            except DnsError as exc:
                self._problem(f"host DNS for .vm is off: {exc}; set [network] dns_port")

    def stop(self) -> None:
        self.dns.stop()

    def update(self, views: list[VMView]) -> None:
        """The on_change listener: records of running tap VMs, bridge listener when due."""
        running = [v.vm for v in views if v.vm.state is VMState.RUNNING
                   and v.vm.spec.network is NetworkMode.TAP and v.vm.guest_ip]
        self.dns.replace_all({vm.name: vm.guest_ip for vm in running if vm.guest_ip})
        with self._lock:
            self._nat_clients = {vm.guest_ip for vm in running if vm.spec.nat and vm.guest_ip}
        if running:
            self._ensure_bridge_listener()

    def _ensure_bridge_listener(self) -> None:
        cfg = self._config().network
        want = (str(netalloc.gateway(cfg.subnet)), 53)
        if self._bridge_listener == want:
            return
        if self._bridge_listener is not None:
            self.dns.remove_listener(self._bridge_listener)
            self._bridge_listener = None
        try:
            self._bridge_listener = self.dns.add_listener(want)
        except DnsError as exc:
            self._problem(f"guests cannot resolve .vm names: {exc}")

    def _forward(self, client: str) -> Address | None:
        with self._lock:
            allowed = client in self._nat_clients
        return self._upstream() if allowed else None

    def _config(self) -> Config:
        try:
            return self._load_config()
        except ValueError:  # a broken config is reported by the operation that reads it
            return Config()

    def _problem(self, message: str) -> None:
        log.warning("%s", message)
        self.problems.append(message)
