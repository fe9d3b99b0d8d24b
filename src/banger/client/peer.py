"""The client's side of the wire: who answers on the daemon socket is checked before a
byte is sent.

The CLI runs the ssh argv the daemon sends back (``vm ssh``, ``vm run``), so a socket
served by another local user must be refused before the first request, not after: every
new connection's peer (SO_PEERCRED) must be this user or root.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import httpcore
import httpx

from banger.local.trust import PeerCred, peer_cred, who


class Untrusted(Exception):
    """The daemon socket, or the directory it is in, belongs to someone else."""


class UntrustedDaemon(Untrusted):
    """What answers on the daemon socket is neither this user nor root."""

    def __init__(self, path: str, peer: PeerCred) -> None:
        me = os.geteuid()
        super().__init__(
            f"refusing the daemon on {path}: it is served by {peer}, neither you "
            f"({who(me)} here) nor root; nothing was sent to it. Another user may be "
            f"impersonating bangerd: stop that process and remove {path}, or set "
            "XDG_RUNTIME_DIR to a directory of your own")
        self.peer = peer


def trusted_uids() -> frozenset[int]:
    return frozenset({os.geteuid(), 0})


class PeerCheckedBackend(httpcore.SyncBackend):
    """httpcore's socket backend, refusing a Unix socket whose peer is not trusted."""

    def connect_unix_socket(
        self, path: str, timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        stream = super().connect_unix_socket(path, timeout, socket_options)
        peer = peer_cred(stream.get_extra_info("socket"))
        if peer.uid not in trusted_uids():
            stream.close()
            raise UntrustedDaemon(path, peer)
        return stream


class PeerCheckedTransport(httpx.HTTPTransport):
    """httpx's transport over a Unix socket with :class:`PeerCheckedBackend`."""

    def __init__(self, uds: str) -> None:
        super().__init__(uds=uds)
        # httpx offers no network_backend argument; its pool is the one documented way in
        # (httpcore.ConnectionPool(network_backend=...)), so the pool is replaced whole.
        self._pool = httpcore.ConnectionPool(uds=uds, network_backend=PeerCheckedBackend())
