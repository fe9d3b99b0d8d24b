"""BANGER_KILLPOINT (a test hook): the daemon SIGKILLs itself right after the point named,
with what it did there already durable; unset, nothing is wrapped."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from banger.daemon import killpoint
from banger.store.db import Database
from banger.store.vms import OperationLog, VMRepository
from tests.fakes import fake_host

INSERT = """
import sys
from pathlib import Path
from banger.daemon import killpoint
from banger.model.vm import VM, VMSpec, VMState
from banger.store.db import Database
from tests.fakes import fake_host
db = Database(Path(sys.argv[1]))
host = fake_host(Path(sys.argv[1]).parent)[0]
repo, oplog, _ = killpoint.armed(sys.argv[2], db, host)
repo.insert(VM(id="abc123", name="box", spec=VMSpec(), state=VMState.CREATED,
               created_at=1.0, updated_at=1.0))
oplog.begin("op-1", "abc123", "start")
oplog.event("op-1", 0, "run", "preflight", None, None)
oplog.event("op-1", 1, "ok", "preflight", 0.1, None)
print("survived")
"""


@pytest.mark.parametrize(("point", "events"), [("created", 0), ("run:preflight", 1),
                                               ("ok:preflight", 2), ("ok:wait_agent", 2)])
def test_dies_right_after_the_point(tmp_path: Path, point: str, events: int) -> None:
    db_path = tmp_path / "state.db"
    proc = subprocess.run([sys.executable, "-c", INSERT, str(db_path), point],
                          capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).parents[2])
    reached = point != "ok:wait_agent"  # a real point this script never reaches
    assert proc.returncode == (-9 if reached else 0), proc.stderr
    assert ("survived" in proc.stdout) is not reached
    db = Database(db_path)
    assert VMRepository(db).get("abc123").name == "box"  # written before the kill
    n = len(db.query("SELECT * FROM operation_events"))
    assert n == events


def test_unset_wraps_nothing_and_a_bad_point_is_refused(tmp_path: Path) -> None:
    db = Database(tmp_path / "state.db")
    host = fake_host(tmp_path)[0]
    repo, oplog, same = killpoint.armed(None, db, host)
    assert type(repo) is VMRepository and type(oplog) is OperationLog and same is host
    with pytest.raises(SystemExit, match="BANGER_KILLPOINT='nowhere'"):
        killpoint.armed("nowhere", db, host)
    for misspelt in ("run:wait_sh", "done:wait_agent", "run:", ":wait_agent"):
        with pytest.raises(SystemExit, match="<event>:<stage>"):
            killpoint.armed(misspelt, db, host)
    killpoint.armed("run:wait_agent", db, host)  # a real one is armed


def test_a_failpoint_must_name_a_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Like a killpoint: a misspelt stage would never fail, and the test relying on it
    # would pass for the wrong reason.
    from banger.daemon.main import build_service
    from banger.model.layout import Layout

    layout = Layout.for_user({"BANGER_HOME": str(tmp_path / "home"), "HOME": str(tmp_path)})
    layout.state_dir.mkdir(parents=True)
    db = Database(tmp_path / "state.db")
    monkeypatch.setenv("BANGER_FAILPOINT", "qemu_lunch")
    with pytest.raises(SystemExit, match="BANGER_FAILPOINT='qemu_lunch' is not a stage"):
        build_service(layout, db)
    monkeypatch.setenv("BANGER_FAILPOINT", "wait_agent")
    assert build_service(layout, db).ctx.failpoint == "wait_agent"
