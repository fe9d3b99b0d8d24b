"""Operations: ids, the in-flight registry, progress events, cancellation, the admission
of boots (a bounded number at once, first come first served) and the durable op log."""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

from banger.model.errors import Cancelled, NotFoundError
from banger.model.events import EventKind

log = logging.getLogger("banger.ops")


@dataclass(frozen=True)
class Progress:
    """One progress event of an operation, as streamed to the CLI (NDJSON)."""

    op_id: str
    vm: str
    kind: EventKind
    stage: str
    label: str | None = None
    elapsed: float | None = None
    message: str | None = None


ProgressSink = Callable[[Progress], None]


def no_progress(_: Progress) -> None:
    return None


class OpLogPort(Protocol):
    def begin(self, op_id: str, vm_id: str | None, kind: str) -> None: ...

    def event(self, op_id: str, seq: int, kind: EventKind, stage: str, elapsed: float | None,
              error: str | None) -> None: ...

    def finish(self, op_id: str, *, error: str | None = None,
               stage: str | None = None) -> None: ...


class OpControl:
    """The caller's handle on an operation: cancel it. Set from any thread (the cancel
    route, a client that went away); the operation polls it between steps and in waits."""

    def __init__(self) -> None:
        self._cancelled = threading.Event()
        self.reason = "cancelled"

    def cancel(self, reason: str = "cancelled") -> None:
        if not self._cancelled.is_set():
            self.reason = reason
            self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def check(self) -> None:
        """Raise :class:`Cancelled` once the operation was cancelled."""
        if self._cancelled.is_set():
            raise Cancelled(self.reason)


@dataclass
class Operation:
    id: str
    kind: str
    vm_id: str | None
    vm_name: str | None
    started_at: float
    stage: str | None = None
    seq: int = 0
    sinks: list[ProgressSink] = field(default_factory=list)
    control: OpControl = field(default_factory=OpControl)


class Operations:
    """Registry of operations in flight, each also written to the durable log."""

    def __init__(self, oplog: OpLogPort) -> None:
        self._oplog = oplog
        self._lock = threading.Lock()
        self._live: dict[str, Operation] = {}

    @contextmanager
    def track(self, kind: str, vm_id: str | None, vm_name: str | None,
              sink: ProgressSink = no_progress,
              control: OpControl | None = None) -> Iterator[Operation]:
        op = Operation(id="op-" + secrets.token_hex(5), kind=kind, vm_id=vm_id,
                       vm_name=vm_name, started_at=time.time(), sinks=[sink],
                       control=control or OpControl())
        self._oplog.begin(op.id, vm_id, kind)
        with self._lock:
            self._live[op.id] = op
        try:
            yield op
        except Exception as exc:
            stage = getattr(exc, "stage", None) or op.stage
            log.warning("%s %s failed vm=%s stage=%s: %s", op.id, kind, vm_name, stage, exc)
            self._oplog.finish(op.id, error=str(exc), stage=stage)
            raise
        else:
            log.info("%s %s done vm=%s in %.2fs", op.id, kind, vm_name,
                     time.time() - op.started_at)
            self._oplog.finish(op.id)
        finally:
            with self._lock:
                self._live.pop(op.id, None)

    def emit(self, op: Operation, p: Progress) -> None:
        if p.kind == "run":
            op.stage = p.stage
        took = f" {p.elapsed:.2f}s" if p.elapsed is not None else ""
        log.info("%s %s %s vm=%s stage=%s%s%s", op.id, op.kind, p.kind, p.vm, p.stage, took,
                 f": {p.message}" if p.message else "")
        if p.kind != "detail":
            self._oplog.event(op.id, op.seq, p.kind, p.stage, p.elapsed, p.message)
            op.seq += 1
        for sink in op.sinks:
            sink(p)

    def cancel(self, op_id: str, reason: str = "cancelled by its client") -> Operation:
        """Ask the operation ``op_id`` in flight to stop (it rolls back)."""
        with self._lock:
            op = self._live.get(op_id)
        if op is None:
            raise NotFoundError(f"no operation {op_id!r} in flight (see `banger ops`)")
        op.control.cancel(reason)
        return op

    def in_flight(self) -> list[Operation]:
        with self._lock:
            return sorted(self._live.values(), key=lambda o: o.started_at)


def default_max_boots() -> int:
    """One boot per CPU, at least 2: a boot is mostly CPU (TCG) and disk work."""
    return max(2, os.cpu_count() or 2)


class BootSlots:
    """At most ``limit`` boots at once; the others wait first come, first served.

    A waiter is told its place in the line whenever it changes and gives up its place
    when its operation is cancelled.
    """

    POLL = 0.2  # how often a waiter looks at its cancel flag

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"max_concurrent_boots must be at least 1, not {limit}")
        self.limit = limit
        self._cond = threading.Condition()
        self._line: deque[object] = deque()
        self._running = 0

    def describe(self) -> str:
        return "one boot at a time" if self.limit == 1 else f"{self.limit} boots at once"

    @contextmanager
    def slot(self, control: OpControl, on_queued: Callable[[int], None]) -> Iterator[None]:
        ticket = object()
        told: int | None = None
        with self._cond:
            self._line.append(ticket)
        try:
            while True:
                with self._cond:
                    if self._line[0] is ticket and self._running < self.limit:
                        self._line.popleft()
                        self._running += 1
                        self._cond.notify_all()  # the next in line may fit too
                        break
                    position = self._line.index(ticket) + 1  # 1: the next to boot
                if position != told:
                    told = position
                    on_queued(position)  # outside the lock: it writes the op log
                control.check()
                with self._cond:
                    if not (self._line[0] is ticket and self._running < self.limit):
                        self._cond.wait(self.POLL)
        except BaseException:
            with self._cond:
                if ticket in self._line:
                    self._line.remove(ticket)
                self._cond.notify_all()
            raise
        try:
            yield
        finally:
            with self._cond:
                self._running -= 1
                self._cond.notify_all()
