"""The client's side of ``/v1/vms/{ref}/files`` (docs/api.md, "Files"): an upload
streamed with chunked encoding from any iterable of bytes, a download as an iterator of
chunks. Both over one peer-checked connection each; every read and write has a timeout.

A download that the daemon ends without the chunked encoding's last chunk broke part
way: :class:`TransferBroken`, never a short tar taken for a whole one.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

from banger.api.wire import PREFIX, TAR
from banger.client.httpconn import PeerCheckedConnection

# Each read or write: the daemon waits at most 60 s for the guest at each step.
FILE_TIMEOUT = 120.0
CONNECT_TIMEOUT = 5.0
READ = 1 << 20


class TransferBroken(Exception):
    """A transfer that started and did not finish (the daemon, the guest or the
    connection went away part way)."""


def _url(ref_seg: str, path: str) -> str:
    return f"{PREFIX}/vms/{ref_seg}/files?path={quote(path, safe='/')}"


def _connection(socket_path: Path) -> PeerCheckedConnection:
    return PeerCheckedConnection(str(socket_path), timeout=FILE_TIMEOUT,
                                 connect_timeout=CONNECT_TIMEOUT)


def put(socket_path: Path, ref_seg: str, dest: str, body: Iterable[bytes]) -> Any:
    """Send the tar ``body`` into ``dest``; the daemon's JSON answer. An exception from
    ``body`` closes the connection without the last chunk (the daemon cancels the put)
    and propagates."""
    from banger.client.client import DaemonUnavailable, _api_error

    conn = _connection(socket_path)
    try:
        try:
            conn.putrequest("PUT", _url(ref_seg, dest), skip_accept_encoding=True)
            conn.putheader("Content-Type", TAR)
            conn.putheader("Accept", "application/json")
            conn.putheader("Transfer-Encoding", "chunked")
            conn.endheaders()
            early = False
            try:
                for chunk in body:
                    if chunk:
                        conn.send(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                conn.send(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                early = True  # the daemon answered before the end (an error): read it
            resp = conn.getresponse()
            content = resp.read()
        except TimeoutError as exc:
            raise TransferBroken(f"the upload stalled: bangerd took nothing for "
                                 f"{FILE_TIMEOUT:.0f} s") from exc
        except (OSError, http.client.HTTPException) as exc:
            raise DaemonUnavailable(f"lost bangerd on {socket_path} during the upload: "
                                    f"{exc or type(exc).__name__}") from exc
    finally:
        conn.close()
    if not 200 <= resp.status < 300:
        raise _api_error(resp.status, content)
    if early:
        raise TransferBroken("bangerd stopped reading the upload before its end")
    return json.loads(content)


def get(socket_path: Path, ref_seg: str, path: str) -> Iterator[bytes]:
    """The tar of ``path``, in chunks as they come; closing the iterator early ends the
    download (the daemon cancels the guest's side). Errors before the first byte are
    ApiError; a download cut short is TransferBroken."""
    from banger.client.client import DaemonUnavailable, _api_error

    conn = _connection(socket_path)
    try:
        try:
            conn.request("GET", _url(ref_seg, path), headers={"Accept": TAR})
            resp = conn.getresponse()
        except TimeoutError as exc:
            raise DaemonUnavailable(f"bangerd did not answer within {FILE_TIMEOUT:.0f} s "
                                    "(the guest may be stuck)") from exc
        except (OSError, http.client.HTTPException) as exc:
            raise DaemonUnavailable(f"bangerd is not answering on {socket_path}: "
                                    f"{exc or type(exc).__name__}") from exc
        if not 200 <= resp.status < 300:
            raise _api_error(resp.status, resp.read())
        if not resp.chunked:
            raise TransferBroken("bangerd's download is not chunked: this banger cannot "
                                 "tell whether it is whole")
        while True:
            try:
                data = resp.read1(READ)
            except http.client.IncompleteRead as exc:
                raise TransferBroken("the transfer broke: bangerd ended the download part "
                                     "way (its log says why: the guest's agent failed or "
                                     "went away, or the VM was stopped)") from exc
            except TimeoutError as exc:
                raise TransferBroken(f"the transfer broke: nothing came for "
                                     f"{FILE_TIMEOUT:.0f} s") from exc
            except (OSError, http.client.HTTPException) as exc:
                raise TransferBroken(f"the transfer broke: {exc or type(exc).__name__}"
                                     ) from exc
            if not data:
                return
            yield data
    finally:
        conn.close()
