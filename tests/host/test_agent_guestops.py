"""banger's own calls into a guest (workspace push, file_sync, listening sockets) through
the real ``banger-agent`` on this host, driven by :mod:`banger.host.agent_guestops` over
a socketpair: what the VM e2e tests then prove in a guest."""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentconn import running_agent

from banger.host import agent_guestops
from banger.host.agent_client import AgentConnection
from banger.model.config import FileSync
from banger.model.errors import OperationFailed

pytestmark = pytest.mark.host


@pytest.fixture
def conn() -> Iterator[AgentConnection]:
    with running_agent("guestops") as c:
        yield c


def _tree(root: Path) -> Path:
    (root / "src").mkdir(parents=True)
    (root / "src" / "main.py").write_text("print('hi')\n")
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "run.sh").chmod(0o755)
    (root / "link").symlink_to("src/main.py")
    return root


def test_push_tree_replaces_the_directory_and_leaves_nothing_beside_it(
        conn: AgentConnection, tmp_path: Path) -> None:
    target = tmp_path / "guest" / "repo"
    target.mkdir(parents=True)
    (target / "stale.txt").write_text("gone after the push")
    agent_guestops.push_tree(conn, _tree(tmp_path / "host"), str(target))
    assert sorted(p.name for p in target.iterdir()) == ["link", "run.sh", "src"]
    assert (target / "src" / "main.py").read_text() == "print('hi')\n"
    assert os.readlink(target / "link") == "src/main.py"
    assert stat.S_IMODE((target / "run.sh").stat().st_mode) == 0o755
    assert os.listdir(tmp_path / "guest") == ["repo"], "no temporary sibling is left"


def test_push_tree_to_a_path_that_does_not_exist_yet(conn: AgentConnection,
                                                     tmp_path: Path) -> None:
    target = tmp_path / "guest" / "repo"
    (tmp_path / "guest").mkdir()
    agent_guestops.push_tree(conn, _tree(tmp_path / "host"), str(target))
    assert (target / "src" / "main.py").exists()
    assert os.listdir(tmp_path / "guest") == ["repo"]


def test_a_failed_push_keeps_the_old_tree(conn: AgentConnection, tmp_path: Path) -> None:
    target = tmp_path / "guest" / "repo"
    target.mkdir(parents=True)
    (target / "kept.txt").write_text("kept")
    tree = _tree(tmp_path / "host")
    # A socket cannot go into a tar: the stream fails part way through.
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(tree / "zz.sock"))
        with pytest.raises(OperationFailed, match=r"zz\.sock"):
            agent_guestops.push_tree(conn, tree, str(target))
    assert sorted(p.name for p in target.iterdir()) == ["kept.txt"]
    assert os.listdir(tmp_path / "guest") == ["repo"], "the half-made copy is removed"
    assert conn.ping(10) < 10, "the connection is still usable"


def test_sync_files_keeps_modes_and_warns_about_missing_host_files(
        conn: AgentConnection, tmp_path: Path) -> None:
    host = tmp_path / "host"
    host.mkdir()
    (host / "npmrc").write_text("token=x\n")
    (host / "npmrc").chmod(0o644)
    (host / "tool").write_text("#!/bin/sh\n")
    (host / "tool").chmod(0o755)
    guest = tmp_path / "guest"  # stands for the guest's /root (put at /, by full path)
    entries = [FileSync(host / "npmrc", f"{guest}/.npmrc", 0o600),
               FileSync(host / "tool", f"{guest}/bin/tool"),
               FileSync(host / "missing", f"{guest}/.missing")]
    warnings = agent_guestops.sync_files(conn, entries, {})
    assert warnings == [f"file_sync: {host / 'missing'} does not exist on the host: skipped"]
    assert (guest / ".npmrc").read_text() == "token=x\n"
    assert stat.S_IMODE((guest / ".npmrc").stat().st_mode) == 0o600
    assert stat.S_IMODE((guest / "bin" / "tool").stat().st_mode) == 0o755
    assert not (guest / ".missing").exists()


def test_sync_files_refuses_a_directory_naming_it(conn: AgentConnection,
                                                  tmp_path: Path) -> None:
    with pytest.raises(OperationFailed, match=f"{tmp_path}.*not a regular file"):
        agent_guestops.sync_files(conn, [FileSync(tmp_path, "/root/x")], {})


def test_listening_is_the_agents_answer(conn: AgentConnection) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        found = agent_guestops.listening(conn, 10)
    assert any(x.proto == "tcp" and x.port == port and x.address == "127.0.0.1"
               for x in found)


def _running(argv: list[str]) -> bool:
    want = "\0".join(argv).encode() + b"\0"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes() == want:
                return True
        except OSError:
            pass
    return False


def test_a_guest_command_that_hangs_is_killed_at_its_timeout(conn: AgentConnection) -> None:
    """A guest whose `mv` or `git` never ends: banger gives up and the command goes too
    (it would otherwise hold its chan and run on for ever)."""
    import time

    from banger.host.agent_records import AgentError

    argv = ["sleep", "3600.4242"]
    with pytest.raises(AgentError):
        agent_guestops.run(conn, argv, timeout=1.0)
    deadline = time.monotonic() + 20
    while _running(argv) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(argv)
    code, _ = agent_guestops.run(conn, ["true"])  # the connection still serves
    assert code == 0


def test_a_push_whose_swap_times_out_leaves_the_old_tree_in_place(
        conn: AgentConnection, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second `mv` (new tree into place) hangs and is given up: the old tree is
    moved back, nothing is left beside it."""
    from banger.host.agent_records import AgentTimeout

    target = tmp_path / "guest" / "repo"
    target.mkdir(parents=True)
    (target / "old.txt").write_text("kept")
    real = agent_guestops.run

    def run(c: AgentConnection, argv: list[str], **kw: float) -> tuple[int, str]:
        if argv[:2] == ["mv", "-T"] and argv[-1] == str(target) and "-new-" in argv[-2]:
            raise AgentTimeout("exec 3 (mv) did not end within 60 s")
        return real(c, argv, **kw)

    monkeypatch.setattr(agent_guestops, "run", run)
    with pytest.raises(Exception, match="did not end"):
        agent_guestops.push_tree(conn, _tree(tmp_path / "host"), str(target))
    assert (target / "old.txt").read_text() == "kept"
    assert os.listdir(tmp_path / "guest") == ["repo"]
