"""Only the daemon's owner (and root where configured) may talk to it.

The socket file is 0600 in a 0700 directory, but that is a file mode anyone with the path
and a chmod mistake can undo; the peer's uid (SO_PEERCRED) is checked on every connection
too, in uvicorn's HTTP protocol before a byte of HTTP is read: a refused connection is
closed and logged with the peer's uid and pid.
"""

from __future__ import annotations

import asyncio
import logging
import os

from uvicorn.protocols.http.h11_impl import H11Protocol

from banger.local.trust import peer_cred

log = logging.getLogger("bangerd.peer")


def allowed_uids(allow_root: bool) -> frozenset[int]:
    """The daemon's own uid, and root if ``[daemon] allow_root`` (a root daemon's own uid
    is root already)."""
    return frozenset({os.geteuid(), 0} if allow_root else {os.geteuid()})


def peer_checked(allowed: frozenset[int]) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol class, refusing connections from any uid not in ``allowed``
    (pass it as ``uvicorn.Config(http=...)``)."""

    class PeerCheckedH11(H11Protocol):
        refused = False

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            sock = transport.get_extra_info("socket")
            try:
                peer = peer_cred(sock)
            except (OSError, AttributeError) as exc:
                log.warning("refused a connection whose peer could not be read: %s", exc)
                self._refuse(transport)
                return
            if peer.uid not in allowed:
                log.warning("refused a connection from %s: only uids %s may use this "
                            "daemon", peer, sorted(allowed))
                self._refuse(transport)
                return
            super().connection_made(transport)

        def _refuse(self, transport: asyncio.Transport) -> None:
            self.refused = True
            transport.abort()

        def connection_lost(self, exc: Exception | None) -> None:
            if not self.refused:  # a refused one was never set up in the base class
                super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if not self.refused:
                super().data_received(data)

    return PeerCheckedH11
