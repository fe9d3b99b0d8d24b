from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from banger.model.vm import VM, KernelKind, VMSpec, VMState
from banger.store.db import MIGRATIONS, Database, MigrationError, applied_versions, migrate
from banger.store.vms import Conflict, NotFound, OperationLog, VMRepository


def _vm(name: str = "box", vm_id: str = "abc123abc123") -> VM:
    return VM(id=vm_id, name=name, spec=VMSpec(), state=VMState.CREATED, created_at=1.0,
              updated_at=1.0)


def test_pragmas_and_migrations(tmp_path: Path) -> None:
    db = Database(tmp_path / "s.db")
    assert db.query("PRAGMA journal_mode")[0][0] == "wal"
    assert db.query("PRAGMA foreign_keys")[0][0] == 1
    versions = [v for v, _ in MIGRATIONS]
    assert versions[:4] == [1, 2, 3, 4]
    assert [r[0] for r in db.query("SELECT version FROM schema_migrations")] == versions
    db.close()
    # Re-opening applies nothing twice.
    db2 = Database(tmp_path / "s.db")
    assert len(db2.query("SELECT * FROM schema_migrations")) == len(versions)


def test_newer_schema_refused(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "x.db", isolation_level=None)
    migrate(conn)
    conn.execute("INSERT INTO schema_migrations VALUES (99, 0)")
    with pytest.raises(MigrationError, match="newer banger"):
        migrate(conn)


def test_failed_migration_rolls_back(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "y.db", isolation_level=None)
    bad = ((1, "CREATE TABLE a (x INTEGER); CREATE TABLE a (y INTEGER)"),)
    with pytest.raises(sqlite3.OperationalError):
        migrate(conn, bad)
    assert applied_versions(conn) == []
    assert not list(conn.execute("SELECT name FROM sqlite_master WHERE name='a'"))


def test_vm_roundtrip_and_unique_name(tmp_path: Path) -> None:
    repo = VMRepository(Database(tmp_path / "s.db"))
    vm = _vm()
    repo.insert(vm)
    assert repo.get(vm.id) == vm
    assert repo.by_name("box") == vm
    with pytest.raises(Conflict, match="already exists"):
        repo.insert(_vm(vm_id="other0000000"))
    moved = vm.with_state(VMState.ERROR, 2.0, error="boom", stage="qemu_launch", op_id="op1")
    repo.update(moved)
    assert repo.get(vm.id).last_error_stage == "qemu_launch"
    repo.delete(vm.id)
    with pytest.raises(NotFound):
        repo.get(vm.id)
    assert repo.list() == []


def test_vm_remembers_its_kernel(tmp_path: Path) -> None:
    repo = VMRepository(Database(tmp_path / "s.db"))
    default, cloud = _vm(), _vm(name="old", vm_id="cloud0000000")
    cloud = VM(**{**cloud.__dict__, "spec": VMSpec(kernel=KernelKind.CLOUD)})
    repo.insert(default)
    repo.insert(cloud)
    assert repo.get(default.id).spec.kernel is KernelKind.MICROVM
    assert repo.get(cloud.id).spec.kernel is KernelKind.CLOUD


def test_operation_log(tmp_path: Path) -> None:
    db = Database(tmp_path / "s.db")
    VMRepository(db).insert(_vm())
    ops = OperationLog(db)
    ops.begin("op1", "abc123abc123", "start")
    ops.event("op1", 0, "run", "preflight", None, None)
    ops.event("op1", 1, "failed", "preflight", 0.1, "nope")
    ops.finish("op1", error="nope", stage="preflight")
    got = ops.get("op1")
    assert got["status"] == "failed" and got["stage"] == "preflight"
    assert [e["kind"] for e in got["events"]] == ["run", "failed"]  # type: ignore[attr-defined]
