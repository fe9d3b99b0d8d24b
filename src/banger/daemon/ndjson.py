"""The lines of a streamed (NDJSON) answer, drained from the queue its worker thread fills:
one JSON line per message, a heartbeat line after every HEARTBEAT_SECONDS of silence (a
client treats a longer silence as a daemon gone), until the worker's closing ``None``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TypeVar

from pydantic import BaseModel

from banger.api.wire import HEARTBEAT_SECONDS

M = TypeVar("M", bound=BaseModel)


def encode(message: BaseModel) -> bytes:
    return message.model_dump_json(exclude_none=True).encode() + b"\n"


async def queued_lines(q: asyncio.Queue[M | None],
                       heartbeat: BaseModel) -> AsyncIterator[tuple[bytes, M | None]]:
    """(line, message) for each message of ``q``; (heartbeat line, None) in silences."""
    beat = encode(heartbeat)
    while True:
        try:
            item = await asyncio.wait_for(q.get(), HEARTBEAT_SECONDS)
        except TimeoutError:
            yield beat, None
            continue
        if item is None:
            return
        yield encode(item), item
