"""SQLite connection and forward-only numbered migrations.

WAL, foreign keys and a busy timeout on every connection; the applied versions live in
``schema_migrations``. A connection is used by one thread at a time: callers serialise
through :class:`Database`'s lock.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MIGRATIONS: tuple[tuple[int, str], ...] = (
    (
        1,
        """
        CREATE TABLE vms (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            image TEXT NOT NULL,
            vcpus INTEGER NOT NULL CHECK (vcpus > 0),
            memory_mib INTEGER NOT NULL CHECK (memory_mib > 0),
            work_disk_mib INTEGER NOT NULL CHECK (work_disk_mib > 0),
            network TEXT NOT NULL,
            nat INTEGER NOT NULL DEFAULT 0,
            state TEXT NOT NULL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            last_error TEXT,
            last_error_stage TEXT,
            last_op_id TEXT,
            boot_id TEXT,
            guest_ip TEXT
        );
        CREATE TABLE operations (
            id TEXT PRIMARY KEY,
            vm_id TEXT REFERENCES vms(id) ON DELETE SET NULL,
            kind TEXT NOT NULL,
            status TEXT NOT NULL,
            started_at REAL NOT NULL,
            finished_at REAL,
            error TEXT,
            stage TEXT
        );
        CREATE TABLE operation_events (
            op_id TEXT NOT NULL REFERENCES operations(id) ON DELETE CASCADE,
            seq INTEGER NOT NULL,
            at REAL NOT NULL,
            kind TEXT NOT NULL,
            stage TEXT NOT NULL,
            elapsed REAL,
            error TEXT,
            PRIMARY KEY (op_id, seq)
        );
        """,
    ),
    (
        2,
        """
        ALTER TABLE vms ADD COLUMN workspace_path TEXT;
        ALTER TABLE vms ADD COLUMN workspace_guest_path TEXT;
        """,
    ),
    (
        3,
        """
        ALTER TABLE vms ADD COLUMN workspace_head TEXT;
        """,
    ),
    (
        4,
        # Finished operations are pruned by age and count (retention), and ops a dead
        # daemon left "running" are found at start: both by status and finish time.
        """
        CREATE INDEX operations_status_finished ON operations (status, finished_at);
        CREATE INDEX operations_finished ON operations (finished_at);
        """,
    ),
    (
        5,
        # The repo a never-started VM gets on its work disk (JSON of PendingWorkspace),
        # written with the record itself: no instant has the VM without it.
        """
        ALTER TABLE vms ADD COLUMN pending_workspace TEXT;
        """,
    ),
    (
        6,
        # The kernel a VM boots (KernelKind): banger's microVM kernel unless asked for the
        # cloud kernel; VMs from before the choice existed get the default.
        """
        ALTER TABLE vms ADD COLUMN kernel TEXT NOT NULL DEFAULT 'microvm';
        """,
    ),
)


class MigrationError(RuntimeError):
    pass


class Database:
    """One SQLite connection guarded by a lock (the daemon is its only writer)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        self._conn.execute("PRAGMA busy_timeout = 5000")
        self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute("PRAGMA foreign_keys = ON")
        migrate(self._conn)

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def query(self, sql: str, params: tuple[object, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return list(self._conn.execute(sql, params))

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def applied_versions(conn: sqlite3.Connection) -> list[int]:
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
        "applied_at REAL NOT NULL)"
    )
    return [r[0] for r in conn.execute("SELECT version FROM schema_migrations ORDER BY version")]


def migrate(conn: sqlite3.Connection,
            migrations: tuple[tuple[int, str], ...] = MIGRATIONS) -> list[int]:
    """Apply the migrations not yet applied, each in its own transaction; return them."""
    done = set(applied_versions(conn))
    known = {v for v, _ in migrations}
    unknown = done - known
    if unknown:
        raise MigrationError(
            f"the state database has schema versions {sorted(unknown)} that this banger does "
            "not know: it was written by a newer banger; upgrade banger"
        )
    applied: list[int] = []
    for version, sql in sorted(migrations):
        if version in done:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _statements(sql):
                conn.execute(statement)
            conn.execute("INSERT INTO schema_migrations VALUES (?, ?)", (version, time.time()))
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        applied.append(version)
    return applied


def _statements(sql: str) -> list[str]:
    return [s.strip() for s in sql.split(";") if s.strip()]
