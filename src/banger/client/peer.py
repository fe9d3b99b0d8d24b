"""The client's side of the wire: HTTP over the daemon's Unix socket, whose peer is checked
before a byte is sent.

The CLI runs the ssh argv the daemon sends back (``vm ssh``, ``vm run``), so a socket
served by another local user must be refused before the first request, not after: every
new connection's peer (SO_PEERCRED) must be this user or root.

The stdlib's :mod:`http.client` carries the requests: the CLI sends one request per
connection and reads JSON or an NDJSON stream back, which needs nothing more, and it
loads in a few milliseconds where httpx took a quarter of a second per command.
"""

from __future__ import annotations

import http.client
import os
import socket

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


def check_peer(sock: socket.socket, path: str) -> None:
    """Refuse (and close) ``sock`` unless this user or root serves it."""
    peer = peer_cred(sock)
    if peer.uid not in trusted_uids():
        sock.close()
        raise UntrustedDaemon(path, peer)


class PeerCheckedConnection(http.client.HTTPConnection):
    """An HTTP connection to ``uds``: ``connect_timeout`` bounds the connect, ``timeout``
    every later read and write (the silence allowed between two bytes of the answer)."""

    def __init__(self, uds: str, *, timeout: float, connect_timeout: float) -> None:
        super().__init__("bangerd", timeout=timeout)
        self.uds = uds
        self.connect_timeout = connect_timeout
        self.connected = False  # set once the socket is connected and its peer checked

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.connect_timeout)
            sock.connect(self.uds)
            check_peer(sock, self.uds)
        except BaseException:
            sock.close()
            raise
        sock.settimeout(self.timeout)
        self.sock = sock
        self.connected = True
