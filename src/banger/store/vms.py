"""Repository of durable VM records and the operation log. No business rules here."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import time

from banger.model.vm import VM, KernelKind, NetworkMode, PendingWorkspace, VMSpec, VMState
from banger.store.db import Database


class NotFound(LookupError):
    pass


class Conflict(ValueError):
    pass


class VMRepository:
    def __init__(self, db: Database) -> None:
        self.db = db

    def insert(self, vm: VM) -> None:
        try:
            with self.db.tx() as c:
                c.execute(
                    "INSERT INTO vms (id, name, image, vcpus, memory_mib, work_disk_mib, network, "
                    "nat, state, created_at, updated_at, last_error, last_error_stage, "
                    "last_op_id, boot_id, guest_ip, workspace_path, workspace_guest_path, "
                    "workspace_head, pending_workspace, kernel) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    _row(vm),
                )
        except sqlite3.IntegrityError as exc:
            raise Conflict(f"a VM named {vm.name!r} already exists") from exc

    def update(self, vm: VM) -> None:
        with self.db.tx() as c:
            cur = c.execute(
                "UPDATE vms SET name=?, image=?, vcpus=?, memory_mib=?, work_disk_mib=?, "
                "network=?, nat=?, state=?, created_at=?, updated_at=?, last_error=?, "
                "last_error_stage=?, last_op_id=?, boot_id=?, guest_ip=?, workspace_path=?, "
                "workspace_guest_path=?, workspace_head=?, pending_workspace=?, kernel=? "
                "WHERE id=?",
                (*_row(vm)[1:], vm.id),
            )
            if cur.rowcount == 0:
                raise NotFound(vm.id)

    def delete(self, vm_id: str) -> None:
        with self.db.tx() as c:
            c.execute("DELETE FROM vms WHERE id=?", (vm_id,))

    def get(self, vm_id: str) -> VM:
        rows = self.db.query("SELECT * FROM vms WHERE id=?", (vm_id,))
        if not rows:
            raise NotFound(vm_id)
        return _vm(rows[0])

    def by_name(self, name: str) -> VM | None:
        rows = self.db.query("SELECT * FROM vms WHERE name=?", (name,))
        return _vm(rows[0]) if rows else None

    def list(self) -> list[VM]:
        return [_vm(r) for r in self.db.query("SELECT * FROM vms ORDER BY created_at, name")]


class OperationLog:
    """Operations in the durable log: kind, status, timings, failing stage and events."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def begin(self, op_id: str, vm_id: str | None, kind: str) -> None:
        with self.db.tx() as c:
            c.execute("INSERT INTO operations (id, vm_id, kind, status, started_at) "
                      "VALUES (?,?,?,?,?)", (op_id, vm_id, kind, "running", time.time()))

    def event(self, op_id: str, seq: int, kind: str, stage: str, elapsed: float | None,
              error: str | None) -> None:
        with self.db.tx() as c:
            c.execute("INSERT INTO operation_events VALUES (?,?,?,?,?,?,?)",
                      (op_id, seq, time.time(), kind, stage, elapsed, error))

    def finish(self, op_id: str, *, error: str | None = None, stage: str | None = None) -> None:
        with self.db.tx() as c:
            c.execute("UPDATE operations SET status=?, finished_at=?, error=?, stage=? WHERE id=?",
                      ("failed" if error else "ok", time.time(), error, stage, op_id))

    def interrupt_running(self, error: str) -> int:
        """Mark ops still "running" (their daemon died under them) interrupted; how many.

        Only the daemon holding the state lock calls this, before it starts any op."""
        with self.db.tx() as c:
            return c.execute("UPDATE operations SET status='interrupted', finished_at=?, "
                             "error=? WHERE status='running'", (time.time(), error)).rowcount

    def prune(self, *, older_than: float, keep: int) -> int:
        """Delete finished ops that finished before ``older_than`` or beyond the ``keep``
        most recent (their events go with them); how many."""
        with self.db.tx() as c:
            n = c.execute("DELETE FROM operations WHERE finished_at IS NOT NULL AND "
                          "finished_at < ?", (older_than,)).rowcount
            n += c.execute("DELETE FROM operations WHERE finished_at IS NOT NULL AND id NOT IN "
                           "(SELECT id FROM operations WHERE finished_at IS NOT NULL "
                           "ORDER BY finished_at DESC LIMIT ?)", (keep,)).rowcount
            return n

    def get(self, op_id: str) -> dict[str, object]:
        rows = self.db.query("SELECT * FROM operations WHERE id=?", (op_id,))
        if not rows:
            raise NotFound(op_id)
        events = self.db.query(
            "SELECT seq, at, kind, stage, elapsed, error FROM operation_events WHERE op_id=? "
            "ORDER BY seq", (op_id,))
        out = dict(rows[0])
        out["events"] = [dict(e) for e in events]
        return out


def _row(vm: VM) -> tuple[object, ...]:
    s = vm.spec
    return (vm.id, vm.name, s.image, s.vcpus, s.memory_mib, s.work_disk_mib, s.network.value,
            int(s.nat), vm.state.value, vm.created_at, vm.updated_at, vm.last_error,
            vm.last_error_stage, vm.last_op_id, vm.boot_id, vm.guest_ip, vm.workspace_path,
            vm.workspace_guest_path, vm.workspace_head, _pending_json(vm.pending_workspace),
            s.kernel.value)


def _pending_json(p: PendingWorkspace | None) -> str | None:
    return None if p is None else json.dumps(dataclasses.asdict(p), sort_keys=True)


def _pending(text: str | None) -> PendingWorkspace | None:
    return None if text is None else PendingWorkspace(**json.loads(text))


def _vm(r: sqlite3.Row) -> VM:
    spec = VMSpec(vcpus=r["vcpus"], memory_mib=r["memory_mib"], work_disk_mib=r["work_disk_mib"],
                  image=r["image"], network=NetworkMode(r["network"]), nat=bool(r["nat"]),
                  kernel=KernelKind(r["kernel"]))
    return VM(id=r["id"], name=r["name"], spec=spec, state=VMState(r["state"]),
              created_at=r["created_at"], updated_at=r["updated_at"],
              last_error=r["last_error"], last_error_stage=r["last_error_stage"],
              last_op_id=r["last_op_id"], boot_id=r["boot_id"], guest_ip=r["guest_ip"],
              workspace_path=r["workspace_path"],
              workspace_guest_path=r["workspace_guest_path"],
              workspace_head=r["workspace_head"],
              pending_workspace=_pending(r["pending_workspace"]))
