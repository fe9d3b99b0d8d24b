"""Files in and out of a running VM: ``PUT`` and ``GET /v1/vms/{ref}/files?path=…``, tar
streams (``application/x-tar``) both ways, through the guest agent (docs/api.md,
"Files").

The agent's side is synchronous, the HTTP side the event loop: each transfer has one
thread of its own (never a shared pool: a guest that stalls holds only its own), which
pulls the upload from the request a chunk at a time, or hands the download to the loop
through a bounded queue. Nothing holds a whole tar: the request's body waits in the
socket (uvicorn pauses reading past 64 KiB) until the guest grants credit, and the guest
waits for credit until the client reads the download.

A failure before the stream starts is the usual JSON error body with its status. A
download that fails part way (the guest's ERROR, the agent gone, the VM stopped) cannot
change its 200 any more: the daemon logs why and ends the response **without the
chunked encoding's last chunk**, so no client can take a half tar for a whole one
(`banger.client` says "the transfer broke"). An upload that fails part way answers its
error as JSON (the status comes after the body), and the guest has removed the file it
was writing (entries already complete stay).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import AsyncIterator, Generator, Iterator
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from banger.api.wire import PREFIX, TAR
from banger.core.service import VMService
from banger.daemon.threads import in_thread
from banger.model.errors import BangerError, InvalidRequest, OperationFailed

log = logging.getLogger(__name__)

PATH = f"{PREFIX}/vms/{{ref}}/files"
# An upload whose client sends nothing for this long is given up (the guest's put is
# cancelled).
BODY_WAIT = 60.0
# Download chunks (≤ 64 KiB each) in flight between the transfer's thread and the loop.
QUEUE = 8
# How often a transfer's thread blocked on the loop checks whether its client left.
POLL = 0.5
# Thread names: not "banger-…" (the daemon's exit waits for those operations); a
# transfer ends with its connection, which the server's exit closes.
THREAD = "files"

GuestPath = Annotated[str, Query(min_length=1, max_length=4096, pattern="^/",
                                 description="an absolute path in the guest")]
_BINARY = {"schema": {"type": "string", "format": "binary"}}


class FilesPut(BaseModel):
    """An upload's answer: the guest directory the tar went into and its size."""

    path: str
    bytes: int


def add_file_routes(app: FastAPI, service: VMService) -> None:
    @app.put(PATH, openapi_extra={"requestBody": {"required": True,
                                                  "content": {TAR: _BINARY}}})
    async def put_files(ref: str, path: GuestPath, request: Request) -> FilesPut:
        """Extract the request's body, a tar stream (`Content-Type: application/x-tar`,
        chunked or with a length), into the guest directory `path` of running VM `ref`
        (made, with its parents, if missing): entries are named relative to it. Modes,
        mtimes, symlinks (as links) and directories are kept; absolute names, `..`,
        devices and writes through a symlink are refused by the guest."""
        if request.headers.get("content-type", TAR).split(";")[0].strip() != TAR:
            raise InvalidRequest(f"the body of a files upload must be {TAR}")
        loop = asyncio.get_running_loop()
        body = _Body(request.stream(), loop)
        n = await in_thread(lambda: service.put_files(ref, path, body), f"{THREAD}-put")
        return FilesPut(path=path, bytes=n)

    @app.get(PATH, response_class=Response, responses={200: {
        "content": {TAR: _BINARY},
        "description": "a tar stream of `path`, named from its last component; a "
                       "chunked response that ends without its last chunk broke part "
                       "way (see docs/api.md)"}})
    async def get_files(ref: str, path: GuestPath) -> Response:
        """A tar of `path` in running VM `ref` (a file, or a directory recursively): its
        entries are named from the path's last component (`/root/repo` → `repo/…`); a
        symlink at `path` is followed, none below it (they come as links)."""
        chunks = await in_thread(lambda: service.get_files(ref, path),
                                 f"{THREAD}-get-start")
        return _TarStream(chunks, path)


class _Body:
    """The request's body as the synchronous iterable the agent port reads, one chunk
    pulled from the event loop at a time (so at most one is held here)."""

    def __init__(self, stream: AsyncIterator[bytes], loop: asyncio.AbstractEventLoop) -> None:
        self.stream, self.loop = stream, loop

    async def _next(self) -> bytes | None:
        try:
            return await self.stream.__anext__()
        except StopAsyncIteration:
            return None

    def __iter__(self) -> Iterator[bytes]:
        while True:
            try:
                fut = asyncio.run_coroutine_threadsafe(self._next(), self.loop)
            except RuntimeError as exc:  # the loop is closed: the daemon is stopping
                raise OperationFailed("the daemon stopped during the upload") from exc
            try:
                chunk = fut.result(BODY_WAIT)
            except concurrent.futures.TimeoutError:
                fut.cancel()
                raise InvalidRequest(f"the client sent nothing of its upload for "
                                     f"{BODY_WAIT:.0f} s") from None
            except ClientDisconnect:
                raise InvalidRequest("the client went away during the upload") from None
            if chunk is None:
                return
            if chunk:
                yield chunk


class _TarStream(Response):
    """A download: the guest's tar as a chunked response; on a failure part way, the
    response ends without its last chunk (module docstring)."""

    media_type = TAR

    def __init__(self, chunks: Generator[bytes, None, None], path: str) -> None:
        super().__init__(media_type=TAR)
        # No length: the server sends it chunked, so that a failure can end it short.
        self.raw_headers = [(b"content-type", TAR.encode())]
        self.chunks, self.path = chunks, path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue(QUEUE)
        stop = threading.Event()
        threading.Thread(target=self._produce, args=(loop, q, stop), daemon=True,
                         name=f"{THREAD}-get").start()
        gone = asyncio.create_task(_disconnected(receive))
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": self.raw_headers})
            while True:
                getter = asyncio.create_task(q.get())
                await asyncio.wait({getter, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    log.info("download of %s: its client went away", self.path)
                    return
                item = getter.result()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    log.warning("download of %s broke part way: %s", self.path, item)
                    return  # no last chunk: the client sees the transfer broke
                await send({"type": "http.response.body", "body": item, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            stop.set()
            gone.cancel()

    def _produce(self, loop: asyncio.AbstractEventLoop,
                 q: asyncio.Queue[bytes | BaseException | None],
                 stop: threading.Event) -> None:
        try:
            try:
                for chunk in self.chunks:
                    if not _put(loop, q, chunk, stop):
                        return
                item: BaseException | None = None
            except BangerError as exc:
                item = exc
            except Exception as exc:  # reported as a broken transfer, never a whole one
                log.exception("download of %s failed", self.path)
                item = OperationFailed(f"the download failed in the daemon: {exc!r}")
            _put(loop, q, item, stop)
        finally:
            self.chunks.close()  # early (client gone): cancels the guest's side


def _put(loop: asyncio.AbstractEventLoop, q: asyncio.Queue[Any], item: object,
         stop: threading.Event) -> bool:
    """``item`` into the loop's queue, waiting while it is full; False once stopped."""
    try:
        fut = asyncio.run_coroutine_threadsafe(q.put(item), loop)
    except RuntimeError:  # the loop is closed: the daemon is stopping
        return False
    while True:
        try:
            fut.result(POLL)
            return True
        except concurrent.futures.TimeoutError:
            if stop.is_set():
                fut.cancel()
                return False
        except concurrent.futures.CancelledError:
            return False


async def _disconnected(receive: Receive) -> None:
    """Returns once the client has gone away (the request's body, empty, is skipped)."""
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return
