"""The daemon's own threads: one per operation (lifecycle work, guest calls), awaited
from the event loop as a future."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

# Every operation thread's name starts so: the daemon waits for them before its lock goes.
OP_THREAD_PREFIX = "banger-"


def in_thread(fn: Callable[[], T], name: str = "banger-op") -> asyncio.Future[T]:
    """Run ``fn`` on a new thread of its own; its result as a future of the running loop.

    One thread per operation rather than a pool: a pool every stream and boot shares is
    what let a burst of starts take every thread and stop the daemon answering. Boots are
    bounded by the service's boot slots, not by the number of threads.
    """
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: object) -> None:
        if fut.done():
            return  # the awaiting request went away
        if ok:
            fut.set_result(value)  # type: ignore[arg-type]
        else:
            fut.set_exception(value)  # type: ignore[arg-type]

    def target() -> None:
        try:
            ok, value = True, fn()
        except BaseException as exc:
            ok, value = False, exc  # type: ignore[assignment]
        with contextlib.suppress(RuntimeError):  # a closed loop: the daemon is stopping
            loop.call_soon_threadsafe(settle, ok, value)

    threading.Thread(target=target, name=name).start()
    return fut
