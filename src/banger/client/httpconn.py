"""An HTTP/1.1 connection to the daemon's Unix socket whose peer is checked
(SO_PEERCRED, ``client/peer.py``) before a byte is sent: the plain requests, the streams
and the file transfers all go through it. The exec path does not (it speaks its own
Upgrade, ``client/execws.py``), so ``http.client`` stays off that path."""

from __future__ import annotations

import http.client
import socket

from banger.client.peer import check_peer


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
