"""`vm logs`: the end of a VM's serial (or VMM) log, and the log followed as it grows.

``GET /vms/{ref}/logs`` answers the end of both logs in one JSON body.
``GET /vms/{ref}/logs/stream`` answers NDJSON :class:`~banger.api.schema.LogEvent` lines:
the end of one log first (the last ``lines`` lines, or the last :data:`LOG_TAIL` bytes),
then, with ``follow``, what the VM writes as it writes it (through the serial log's
rotations: :mod:`banger.host.logfollow`), until the VM is no longer running (what it
wrote is sent first, then an "end"), the daemon stops, or the client goes away.

A stream is an async generator on the event loop, no thread of its own: it reads a
chunk at a time from files it holds open and closes them when it ends, whichever way
(a client that goes away cancels it). It holds at most the backlog and one chunk; a
client slower than the guest makes it wait (the server's flow control), the rotation
moves on meanwhile and the stream reports what it skipped. Whether the VM still runs is
asked every :data:`VM_CHECK_SECONDS` on a short thread (it reads the store).
"""

from __future__ import annotations

import asyncio
import base64
import os
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, Query
from fastapi.responses import StreamingResponse

from banger.api.schema import LogEvent, Logs
from banger.api.wire import HEARTBEAT_SECONDS, NDJSON, PREFIX
from banger.core.context import LIVE_STATES
from banger.core.service import VMService
from banger.daemon.threads import in_thread
from banger.host.logfollow import BUSY, CHUNK, LogFollower, Skipped
from banger.local.logtail import tail_bytes
from banger.model.errors import NotFoundError

# What `vm logs` shows: the end of a log, so the answer stays small whatever a guest wrote.
LOG_TAIL = 256 * 1024
# How often a follow looks for new output when there was none: a console line shows up
# this late at most.
POLL_SECONDS = 0.1
VM_CHECK_SECONDS = 1.0


def _tail(path: os.PathLike[str] | str, limit: int = LOG_TAIL) -> bytes:
    try:
        return tail_bytes(path, limit)
    except FileNotFoundError:
        return b""


def _serial_tail(log: Path, rotated: Path) -> tuple[str, str | None]:
    """The last :data:`LOG_TAIL` bytes of the serial output, reaching back into the
    rotated file when the current one is shorter; and the rotated file, if any."""
    current = _tail(log)
    if not rotated.exists():
        return current.decode(errors="replace"), None
    older = _tail(rotated, LOG_TAIL - len(current)) if len(current) < LOG_TAIL else b""
    return (older + current).decode(errors="replace"), str(rotated)


def _line(ev: LogEvent) -> bytes:
    return ev.model_dump_json(exclude_none=True).encode() + b"\n"


def _data(chunk: bytes) -> bytes:
    return _line(LogEvent(type="data", data=base64.b64encode(chunk).decode()))


HEARTBEAT = _line(LogEvent(type="heartbeat"))


def _stream_doc() -> dict[int | str, dict[str, object]]:
    line = LogEvent.model_json_schema(ref_template="#/components/schemas/{model}")
    line.pop("$defs", None)
    return {200: {"content": {NDJSON: {"schema": line}}}}


async def _follow(service: VMService, vm_id: str, follower: LogFollower,
                  stopping: threading.Event) -> AsyncIterator[bytes]:
    """What the VM writes from now on, until it stops (then what is left), or the daemon
    does."""
    def running() -> bool:
        try:
            return service.view(service.resolve(vm_id)).vm.state in LIVE_STATES
        except NotFoundError:
            return False

    live = True
    # Asked at the first quiet moment: the follow of a VM that is not running ends at once.
    checked, beat = 0.0, time.monotonic()
    while True:
        if stopping.is_set():  # first: a flooding guest must not keep the daemon up
            yield _line(LogEvent(type="end", reason="daemon_stopping"))
            return
        got = follower.read()
        if isinstance(got, Skipped):
            yield _line(LogEvent(type="skipped", count=got.count))
            continue
        if got and got != BUSY:
            assert isinstance(got, bytes)
            yield _data(got)
            beat = time.monotonic()
            await asyncio.sleep(0)  # a flooding guest must not hold the loop
            continue
        if got == b"" and not live:
            yield _line(LogEvent(type="end", reason="stopped"))
            return
        now = time.monotonic()
        if live and now - checked >= VM_CHECK_SECONDS:
            live = await in_thread(running, "banger-logs-check")
            checked = now
            continue  # not live: read once more, to the end of what it wrote
        if now - beat >= HEARTBEAT_SECONDS:
            yield HEARTBEAT
            beat = now
        await asyncio.sleep(POLL_SECONDS)


def add_log_routes(app: FastAPI, service: VMService, stopping: threading.Event) -> None:
    @app.get(f"{PREFIX}/vms/{{ref}}/logs")
    def logs(ref: str) -> Logs:
        paths = service.show(ref).paths
        serial, rotated = _serial_tail(paths.serial_log, paths.serial_log_rotated)
        return Logs(serial_log=str(paths.serial_log), serial=serial,
                    serial_rotated=rotated, vmm_log=str(paths.vmm_log),
                    vmm=_tail(paths.vmm_log).decode(errors="replace"))

    @app.get(f"{PREFIX}/vms/{{ref}}/logs/stream", responses=_stream_doc(),
             response_class=StreamingResponse)
    async def log_stream(ref: str, follow: bool = False, vmm: bool = False,
                         lines: Annotated[int | None, Query(ge=0)] = None,
                         ) -> StreamingResponse:
        """The end of the serial log (the VMM's with ``vmm``): its last ``lines`` lines
        (among its last 256 KiB), or its last 256 KiB; then with ``follow`` what the VM
        writes as it writes it, until it is no longer running."""
        view = await in_thread(lambda: service.show(ref), "banger-logs-show")
        paths = view.paths
        follower = (LogFollower(paths.vmm_log, None) if vmm
                    else LogFollower(paths.serial_log, paths.serial_log_rotated))

        async def events() -> AsyncIterator[bytes]:
            try:
                while (backlog := follower.backlog(LOG_TAIL, lines)) == BUSY:
                    await asyncio.sleep(POLL_SECONDS)
                assert isinstance(backlog, bytes)
                for i in range(0, len(backlog), CHUNK):
                    yield _data(backlog[i:i + CHUNK])
                if not follow:
                    yield _line(LogEvent(type="end", reason="done"))
                    return
                async for line in _follow(service, view.vm.id, follower, stopping):
                    yield line
            finally:
                follower.close()

        return StreamingResponse(events(), media_type=NDJSON)
