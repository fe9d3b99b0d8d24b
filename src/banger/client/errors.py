"""What every path of the client shares without loading :mod:`http.client`: the errors a
command reports (the daemon's answer, a daemon not answering) and a ref as a URL path
segment. The exec WebSocket (:mod:`banger.client.execws`) goes straight to the socket
and needs nothing more; :mod:`banger.client.client` re-exports these names."""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import quote

if TYPE_CHECKING:  # its ~30 dataclasses cost `vm exec` ~8 ms to import: only on an error
    from banger.client.types import ErrorBody


class ApiError(Exception):
    """An error the daemon reported: code, message, and where known the stage and op id."""

    def __init__(self, body: ErrorBody, status: int = 500) -> None:
        super().__init__(body.message)
        self.body = body
        self.status = status


class DaemonUnavailable(Exception):
    pass


def seg(ref: str) -> str:
    """``ref`` as one URL path segment: `banger vm start 'box/stop?'` must not stop box.

    '.' and '..' are encoded too, or a server could resolve them as dot segments. An
    empty ref is refused here: as an empty segment, `GET /v1/vms/` is answered with a
    redirect to the list, which is no answer about a VM."""
    if not ref:
        from banger.client.types import ErrorBody
        raise ApiError(ErrorBody(code="not_found", message="an empty name or id names no "
                                 "VM (see `banger vm list`)"), 404)
    q = quote(ref, safe="")
    return q.replace(".", "%2E") if q in (".", "..") else q

