"""Operations: ids, the in-flight registry, progress events and the durable op log."""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger("banger.ops")


@dataclass(frozen=True)
class Progress:
    """One progress event of an operation, as streamed to the CLI (NDJSON)."""

    op_id: str
    vm: str
    kind: str  # run | ok | failed | undo | undone | undo_failed | detail
    stage: str
    label: str | None = None
    elapsed: float | None = None
    message: str | None = None


ProgressSink = Callable[[Progress], None]


def no_progress(_: Progress) -> None:
    return None


class OpLogPort(Protocol):
    def begin(self, op_id: str, vm_id: str | None, kind: str) -> None: ...

    def event(self, op_id: str, seq: int, kind: str, stage: str, elapsed: float | None,
              error: str | None) -> None: ...

    def finish(self, op_id: str, *, error: str | None = None,
               stage: str | None = None) -> None: ...


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


class Operations:
    """Registry of operations in flight, each also written to the durable log."""

    def __init__(self, oplog: OpLogPort) -> None:
        self._oplog = oplog
        self._lock = threading.Lock()
        self._live: dict[str, Operation] = {}

    @contextmanager
    def track(self, kind: str, vm_id: str | None, vm_name: str | None,
              sink: ProgressSink = no_progress) -> Iterator[Operation]:
        op = Operation(id="op-" + secrets.token_hex(5), kind=kind, vm_id=vm_id,
                       vm_name=vm_name, started_at=time.time(), sinks=[sink])
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

    def in_flight(self) -> list[Operation]:
        with self._lock:
            return sorted(self._live.values(), key=lambda o: o.started_at)
