"""Workspace mode on real VMs: `banger vm run ./repo` puts a real git checkout at /root/repo."""

from __future__ import annotations

import http.server
import json
import subprocess
import threading
from pathlib import Path
from typing import ClassVar

import pytest

from tests.e2e.conftest import Banger, assert_nothing_left

pytestmark = pytest.mark.e2e


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                          text=True).stdout


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    r = tmp_path / "proj"
    r.mkdir()
    git(r, "init", "-q", "-b", "main")
    git(r, "config", "user.name", "Ada Dev")
    git(r, "config", "user.email", "ada@example.invalid")
    (r / "README").write_text("hello\n")
    (r / "run.sh").write_text("#!/bin/sh\necho ran\n")
    (r / "run.sh").chmod(0o755)
    (r / "escape").symlink_to("/etc/passwd")
    (r / ".gitignore").write_text("*.log\n")
    git(r, "add", "-A")
    git(r, "commit", "-q", "-m", "first")
    (r / "README").write_text("hello, changed\n")  # uncommitted change comes along
    (r / "notes.txt").write_text("untracked\n")
    (r / "debug.log").write_text("ignored\n")
    return r


def test_run_repo_command_in_checkout(banger: Banger, repo: Path) -> None:
    dry = banger.run("vm", "run", "--dry-run", str(repo))
    assert "README" in dry.stdout and "notes.txt" not in dry.stdout
    proc = banger.run(
        "vm", "run", "--rm", str(repo), "--", "sh", "-c",
        "pwd; git status --porcelain; cat README; ./run.sh; readlink escape; "
        "test -e notes.txt || echo no-untracked; test -e debug.log || echo no-ignored; "
        "git config user.email; git branch --show-current; exit 5", check=False)
    assert proc.returncode == 5, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "/root/repo"
    assert " M README" in lines  # the same status as on the host
    assert "hello, changed" in lines and "ran" in lines
    assert "/etc/passwd" in lines, "a symlink out of the repo is copied as a link"
    assert "no-untracked" in lines and "no-ignored" in lines
    assert "ada@example.invalid" in lines and "main" in lines
    assert_nothing_left(banger)


def test_untracked_and_guest_branch(banger: Banger, repo: Path) -> None:
    proc = banger.run(
        "vm", "run", "--rm", "--include-untracked", "--branch", "feat", "--from", "main",
        str(repo), "--", "sh", "-c",
        "git branch --show-current; cat notes.txt; cat README; git status --porcelain")
    lines = proc.stdout.splitlines()
    assert lines[:3] == ["feat", "untracked", "hello"]  # --from main: the committed README
    assert "?? notes.txt" in lines
    assert "feat" not in git(repo, "branch"), "the branch exists only in the guest"
    assert_nothing_left(banger)


def test_bad_repo_refused_before_anything_is_created(banger: Banger, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    proc = banger.run("vm", "run", str(plain), "--", "true", check=False)
    assert proc.returncode == 1 and str(plain) in proc.stderr
    assert banger.run("vm", "list", "--json").stdout.strip() == "[]"


def test_exec_runs_in_the_workspace(banger: Banger, repo: Path) -> None:
    banger.run("vm", "run", "-d", "--name", "wx", str(repo))
    proc = banger.run("vm", "exec", "wx", "--", "sh", "-c", "pwd; exit 3", check=False)
    assert proc.returncode == 3 and proc.stdout.strip() == "/root/repo"
    other = banger.run("vm", "exec", "wx", "--guest-path", "/tmp", "--", "pwd")
    assert other.stdout.strip() == "/tmp"
    banger.run("vm", "create", "--name", "bare")
    # A VM without a workspace runs commands in /root.
    assert banger.run("vm", "exec", "bare", "--", "pwd").stdout == "/root\n"


def test_export_round_trips_and_touches_nothing(banger: Banger, repo: Path,
                                               tmp_path: Path) -> None:
    banger.run("vm", "run", "-d", "--name", "ex", "--include-untracked", str(repo))
    guest_changes = (
        "set -e; echo guest-commit > committed.txt; git add committed.txt; "
        "git -c user.name=g -c user.email=g@x commit -q -m 'in guest'; "
        "echo edited >> README; printf '\\000\\001\\002binary' > blob.bin; "
        "mkdir -p new/dir; echo deep > new/dir/file; rm run.sh; "
        "git status --porcelain > /tmp/before")
    banger.run("vm", "exec", "ex", "--", "sh", "-c", guest_changes)
    patch = subprocess.run(banger.argv("vm", "workspace", "export", "ex"), env=banger.env,
                           capture_output=True, timeout=120)
    assert patch.returncode == 0, patch.stderr
    # Non-mutating: the guest's status is what it was before the export.
    after = banger.run("vm", "exec", "ex", "--", "sh", "-c",
                       "git status --porcelain | diff /tmp/before - && echo same")
    assert after.stdout.strip() == "same"
    # The host applies it cleanly onto its own (uncommitted, untracked) state.
    (tmp_path / "p.patch").write_bytes(patch.stdout)
    git(repo, "apply", "--check", str(tmp_path / "p.patch"))
    git(repo, "apply", str(tmp_path / "p.patch"))
    assert (repo / "committed.txt").read_text() == "guest-commit\n"
    assert (repo / "README").read_text() == "hello, changed\nedited\n"
    assert (repo / "blob.bin").read_bytes() == b"\0\1\2binary"
    assert (repo / "new" / "dir" / "file").read_text() == "deep\n"
    assert not (repo / "run.sh").exists()
    assert (repo / "notes.txt").read_text() == "untracked\n"
    # Against an explicit base: the guest commit and the rest, relative to host HEAD.
    head = git(repo, "rev-parse", "HEAD").strip()
    again = subprocess.run(banger.argv("vm", "workspace", "export", "ex", "--base-commit",
                                       head), env=banger.env, capture_output=True,
                           timeout=120)
    assert again.returncode == 0 and b"notes.txt" in again.stdout


def test_prepare_resyncs_a_running_vm(banger: Banger, repo: Path) -> None:
    banger.run("vm", "create", "--name", "pr")
    (repo / "later.txt").write_text("added on the host\n")
    git(repo, "add", "later.txt")
    out = banger.run("vm", "workspace", "prepare", "pr", str(repo))
    assert "/root/repo" in out.stdout
    proc = banger.run("vm", "exec", "pr", "--", "sh", "-c",
                      "cat later.txt; git status --porcelain; stat -c %u .")
    lines = proc.stdout.splitlines()
    assert lines[0] == "added on the host"
    assert "A  later.txt" in lines and " M README" in lines and lines[-1] == "0"


def test_exec_warns_when_host_head_moved_and_auto_prepare_resyncs(banger: Banger,
                                                                  repo: Path) -> None:
    banger.run("vm", "run", "-d", "--name", "hm", str(repo))
    quiet = banger.run("vm", "exec", "hm", "--", "true")
    assert "HEAD moved" not in quiet.stderr
    (repo / "new.txt").write_text("committed later\n")
    git(repo, "add", "new.txt")
    git(repo, "commit", "-q", "-m", "second")
    warned = banger.run("vm", "exec", "hm", "--", "sh", "-c", "ls new.txt", check=False)
    assert warned.returncode != 0
    assert "HEAD moved" in warned.stderr and "--auto-prepare" in warned.stderr
    synced = banger.run("vm", "exec", "hm", "--auto-prepare", "--", "sh", "-c",
                        "cat new.txt; git log --format=%s -1")
    assert synced.stdout == "committed later\nsecond\n"
    after = banger.run("vm", "exec", "hm", "--", "true")
    assert "HEAD moved" not in after.stderr


def test_prepare_a_stopped_vm_lands_at_its_next_start(banger: Banger, repo: Path) -> None:
    banger.run("vm", "create", "--name", "ps")
    banger.run("vm", "ssh", "ps", "--", "sh", "-c", "echo guest-only > /root/keep.txt")
    banger.run("vm", "stop", "ps")
    (repo / "staged.txt").write_text("as prepared\n")
    git(repo, "add", "staged.txt")
    out = banger.run("vm", "workspace", "prepare", "ps", str(repo))
    assert "next starts" in out.stderr
    # What the host had at prepare time lands, not what it has at start time.
    (repo / "staged.txt").write_text("changed after prepare\n")
    started = banger.run("vm", "start", "ps")
    assert "workspace_sync" in started.stderr
    proc = banger.run("vm", "exec", "ps", "--", "sh", "-c",
                      "cat staged.txt; git status --porcelain; cat /root/keep.txt")
    lines = proc.stdout.splitlines()
    assert lines[0] == "as prepared"
    assert "A  staged.txt" in lines and " M README" in lines
    assert lines[-1] == "guest-only"  # the rest of the work disk is untouched
    # Applied once: a restart does not copy it again.
    banger.run("vm", "exec", "ps", "--", "sh", "-c", "echo guest edit > staged.txt")
    banger.run("vm", "restart", "ps")
    again = banger.run("vm", "exec", "ps", "--", "cat", "staged.txt")
    assert again.stdout == "guest edit\n"


@pytest.fixture
def tool_repo(repo: Path) -> Path:
    (repo / ".tool-versions").write_text("shellcheck 0.9.0\n")
    git(repo, "add", ".tool-versions")
    git(repo, "commit", "-q", "-m", "pin tools")
    return repo


def test_bootstrap_without_network_is_refused_up_front(banger: Banger, tool_repo: Path) -> None:
    proc = banger.run("vm", "run", "--name", "nb", str(tool_repo), "--", "true", check=False)
    assert proc.returncode != 0
    assert ".tool-versions" in proc.stderr and "--nat" in proc.stderr
    assert "--no-bootstrap" in proc.stderr
    assert json.loads(banger.run("vm", "list", "--json").stdout) == []
    # --no-bootstrap: the VM comes up offline and nothing is installed or attempted.
    out = banger.run("vm", "run", "--rm", "--no-bootstrap", str(tool_repo), "--", "sh", "-c",
                     "ls /root/.banger/bootstrap.log 2>&1; cat .tool-versions")
    assert "No such file" in out.stdout and "shellcheck 0.9.0" in out.stdout


class _Installer(http.server.BaseHTTPRequestHandler):
    """A stand-in for https://mise.run on the host's loopback: installs a fake `mise`
    that records how it was called."""

    SCRIPT = b"""#!/bin/sh
set -e
mkdir -p /root/.local/bin
cat > /root/.local/bin/mise <<'MISE'
#!/bin/sh
echo "$(pwd): mise $*" >> /root/.banger/mise-calls
if [ "$1" = exec ]; then shift 2; exec "$@"; fi
MISE
chmod +x /root/.local/bin/mise
echo "fake mise installed"
"""
    hits: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        _Installer.hits.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.SCRIPT)))
        self.end_headers()
        self.wfile.write(self.SCRIPT)

    def log_message(self, *args: object) -> None:
        pass


def test_bootstrap_with_nat_launches_the_installer_and_logs(banger: Banger,
                                                            tool_repo: Path) -> None:
    # The guest's network is opened (--nat) but pointed only at a server on the host's
    # loopback (10.0.2.2 in QEMU user networking).
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Installer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        config = banger.home / "config" / "config.toml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(f'[bootstrap]\ninstaller_url = "http://10.0.2.2:{port}/install.sh"\n')
        proc = banger.run("vm", "run", "-d", "--name", "bs", "--nat", str(tool_repo))
        assert "tool_bootstrap" in proc.stderr and "bootstrap.log" in proc.stderr
        script = ("for i in $(seq 1 120); do "
                  "grep -qv running /root/.banger/bootstrap.status 2>/dev/null && break; "
                  "sleep 0.5; done; cat /root/.banger/bootstrap.status; "
                  "cat /root/.banger/bootstrap.log; cat /root/.banger/mise-calls")
        out = banger.run("vm", "exec", "bs", "--", "sh", "-c", script).stdout
        assert out.splitlines()[0] == "ok", out
        assert f"installer http://10.0.2.2:{port}/install.sh" in out
        assert "fake mise installed" in out
        assert "/root/repo: mise install --yes" in out
        assert _Installer.hits == ["/install.sh"]
        # vm exec runs commands under the tool manager now that it is there.
        proc = banger.run("vm", "exec", "bs", "--", "sh", "-c", "echo in-tools; exit 3",
                          check=False)
        assert proc.returncode == 3 and proc.stdout == "in-tools\n"
        calls = banger.run("vm", "exec", "bs", "--", "cat", "/root/.banger/mise-calls")
        assert "/root/repo: mise exec -- sh -c echo in-tools; exit 3" in calls.stdout
    finally:
        server.shutdown()
        server.server_close()
