"""The client's side of the wire: HTTP over the daemon's Unix socket, whose peer is checked
before a byte is sent.

The CLI runs the ssh argv the daemon sends back (``vm ssh``, ``vm run``), so a socket
served by another local user must be refused before the first request, not after: every
new connection's peer (SO_PEERCRED) must be this user or root.

The check is here, apart from :mod:`http.client`: the exec WebSocket
(:mod:`banger.client.execws`) uses it on its own socket without loading HTTP's client.
"""

from __future__ import annotations

import os
import socket

from banger.local.trust import PeerCred, UnsafeDirectory, peer_cred, private_dir, who
from banger.model.layout import Layout


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


def check_peer(sock: socket.socket, path: str) -> None:
    """Refuse (and close) ``sock`` unless this user or root serves it."""
    peer = peer_cred(sock)
    if peer.uid not in trusted_uids():
        sock.close()
        raise UntrustedDaemon(path, peer)


def check_runtime_dir(layout: Layout) -> None:
    """Refuse a runtime directory (the socket's) that is not ours, 0700, a real
    directory: before its socket is used."""
    try:
        private_dir(layout.runtime_dir, what="runtime directory")
    except UnsafeDirectory as exc:
        raise Untrusted(str(exc)) from exc
