"""The image routes: list and show, pull from a registry, import from a path on this host
(`banger image ...`). A pull or import streams its progress as NDJSON when asked to (Accept:
application/x-ndjson), one line per step, a heartbeat every HEARTBEAT_SECONDS while skopeo
or the root disk build says nothing. A pull is not cancelled when its client goes away: it
runs to its end (a later pull of the same image then finds its layers cached)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Annotated

from fastapi import FastAPI, Header
from fastapi.responses import StreamingResponse

from banger.api.schema import ErrorBody, ImageImport, ImageOut, ImageProgress, ImagePull
from banger.api.wire import NDJSON, PREFIX
from banger.core.service import VMService
from banger.daemon.ndjson import queued_lines
from banger.daemon.threads import in_thread
from banger.model.errors import BangerError, OperationFailed
from banger.ports import ImageRecord

log = logging.getLogger(__name__)
Accept = Annotated[str | None, Header()]
THREAD = "banger-image"


def image_out(r: ImageRecord) -> ImageOut:
    return ImageOut(name=r.name, kind=r.kind, built=r.built, source=r.source, digest=r.digest,
                    size_bytes=r.size_bytes, env=list(r.env), workdir=r.workdir,
                    entrypoint=list(r.entrypoint), cmd=list(r.cmd), user=r.user)


def _error(exc: BangerError) -> ErrorBody:
    return ErrorBody(code=exc.code, message=str(exc))


def add_image_routes(app: FastAPI, service: VMService) -> None:
    stream_doc = {200: {"content": {NDJSON: {"schema": ImageProgress.model_json_schema()}},
                        "description": "with Accept: application/x-ndjson, ImageProgress "
                                       "lines"}}

    @app.get(f"{PREFIX}/images")
    async def list_images() -> list[ImageOut]:
        return [image_out(r) for r in await in_thread(service.images, THREAD)]

    @app.get(f"{PREFIX}/images/{{name}}")
    async def show_image(name: str) -> ImageOut:
        return image_out(await in_thread(lambda: service.image(name), THREAD))

    @app.post(f"{PREFIX}/images/pull", responses=stream_doc)  # type: ignore[arg-type]
    async def pull(body: ImagePull, accept: Accept = None) -> ImageOut:
        return await _run(lambda p: service.pull_image(body.ref, body.name, archive=False,
                                                       on_progress=p), accept)

    @app.post(f"{PREFIX}/images/import", responses=stream_doc)  # type: ignore[arg-type]
    async def import_(body: ImageImport, accept: Accept = None) -> ImageOut:
        return await _run(lambda p: service.pull_image(body.path, body.name, archive=True,
                                                       on_progress=p), accept)


async def _run(fn: Callable[[Callable[[str], None]], ImageRecord],
               accept: str | None) -> ImageOut:
    if accept is None or NDJSON not in accept:
        return image_out(await in_thread(lambda: fn(lambda _: None), THREAD))
    return _streamed(fn)  # type: ignore[return-value]


def _streamed(fn: Callable[[Callable[[str], None]], ImageRecord]) -> StreamingResponse:
    loop = asyncio.get_running_loop()
    q: asyncio.Queue[ImageProgress | None] = asyncio.Queue()

    def put(item: ImageProgress | None) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: the daemon is stopping
            loop.call_soon_threadsafe(q.put_nowait, item)

    def work() -> None:
        try:
            r = fn(lambda m: put(ImageProgress(type="progress", message=m)))
            put(ImageProgress(type="result", image=image_out(r)))
        except BangerError as exc:
            put(ImageProgress(type="error", error=_error(exc)))
        except Exception as exc:  # report, never drop the stream silently
            log.exception("image pull failed")
            put(ImageProgress(type="error", error=_error(OperationFailed(str(exc)))))
        finally:
            put(None)

    async def lines() -> AsyncIterator[bytes]:
        in_thread(work, THREAD)
        async for line, _ in queued_lines(q, ImageProgress(type="heartbeat")):
            yield line

    return StreamingResponse(lines(), media_type=NDJSON)
