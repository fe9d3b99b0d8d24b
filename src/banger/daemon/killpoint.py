"""BANGER_KILLPOINT: a test hook that SIGKILLs bangerd at a chosen point of its work.

A crash or an OOM kill can end the daemon at any instant; the next daemon must find
state it can finish or roll back. The e2e tier names a point and checks what the next
daemon makes of what was left. Test-only, like BANGER_FAILPOINT: unset (always, outside
tests), nothing is wrapped. The points:

- ``created``: right after a VM's record was written (before its start began);
- ``work_disk_build``: in the middle of a work disk's build: the image made under its
  temporary name, not yet renamed into place;
- ``<event>:<stage>``, e.g. ``ok:work_disk`` or ``run:wait_agent``: right after that
  progress event of an operation was logged;
- ``running``: right after a VM's record says it runs (before its client is told).
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from banger.core.stages import Stage
from banger.host import disks
from banger.model.events import STEP_EVENT_KINDS
from banger.model.vm import VM, VMState
from banger.ports import DiskPort, HostPorts
from banger.store.db import Database
from banger.store.vms import OperationLog, VMRepository

log = logging.getLogger("bangerd.killpoint")

NAMED = ("created", "work_disk_build", "running")


def armed(point: str | None, db: Database,
          host: HostPorts) -> tuple[VMRepository, OperationLog, HostPorts]:
    """The repository, op log and host ports of the daemon, dying at ``point`` if set."""
    if not point:
        return VMRepository(db), OperationLog(db), host
    if point not in NAMED and not _is_step_event(point):
        # A misspelt point would never be reached: the test would wait for nothing.
        raise SystemExit(f"bangerd: BANGER_KILLPOINT={point!r}: use one of "
                         f"{', '.join(NAMED)} or <event>:<stage> (e.g. run:wait_agent; "
                         f"events: {', '.join(STEP_EVENT_KINDS)}; stages: banger.core.stages)")
    log.warning("BANGER_KILLPOINT=%s: this daemon SIGKILLs itself there (a test hook)", point)
    return (_Repository(db, point), _OpLog(db, point),
            replace(host, disks=_Disks(host.disks, point)))


def _is_step_event(point: str) -> bool:
    event, _, stage = point.partition(":")
    return event in STEP_EVENT_KINDS and stage in {s.value for s in Stage}


def die(point: str) -> None:
    log.warning("BANGER_KILLPOINT %s reached: SIGKILL", point)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class _Repository(VMRepository):
    def __init__(self, db: Database, point: str) -> None:
        super().__init__(db)
        self._point = point

    def insert(self, vm: VM) -> None:
        super().insert(vm)
        if self._point == "created":
            die(self._point)

    def update(self, vm: VM) -> None:
        super().update(vm)
        if self._point == "running" and vm.state is VMState.RUNNING:
            die(self._point)


class _OpLog(OperationLog):
    def __init__(self, db: Database, point: str) -> None:
        super().__init__(db)
        self._point = point

    def event(self, op_id: str, seq: int, kind: str, stage: str, elapsed: float | None,
              error: str | None) -> None:
        super().event(op_id, seq, kind, stage, elapsed, error)
        if self._point == f"{kind}:{stage}":
            die(self._point)


class _Disks:
    def __init__(self, inner: DiskPort, point: str) -> None:
        self._inner = inner
        self._point = point

    def create_overlay(self, base: Path, overlay: Path) -> None:
        self._inner.create_overlay(base, overlay)

    def backing_of(self, overlay: Path) -> Path | None:
        return self._inner.backing_of(overlay)

    def build_work_disk(self, path: Path, size_bytes: int,
                        files: Mapping[str, tuple[bytes, int]],
                        trees: Mapping[str, Path] | None = None) -> None:
        if self._point != "work_disk_build":
            self._inner.build_work_disk(path, size_bytes, files, trees)
            return
        # What a kill just before the rename leaves: a whole image, under the name the
        # build uses until it is complete (the most a killed build can have made).
        self._inner.build_work_disk(disks.partial_path(path), size_bytes, files, trees)
        die(self._point)
