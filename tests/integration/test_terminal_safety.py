"""What a guest or a repo prints never reaches the terminal raw (issue 8): the real CLI
against the real daemon app, with a hostile guest (fake) and a hostile repo (real git)."""

from __future__ import annotations

import contextlib
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from banger.api.schema import Check, Doctor
from banger.cli.main import cli
from banger.client.client import Client
from banger.host.workspace_port import LocalWorkspace
from banger.ports import ListeningSocket
from tests.integration.conftest import Daemon

# OSC 52 (sets the clipboard), CSI clear screen, the C1 CSI (U+009B), BEL, a bare CR that
# would hide what came before it, and rich markup.
OSC52 = "\x1b]52;c;ZWNobyBwd25lZA==\x07"
HOSTILE = f"{OSC52}\x1b[2J\u009b31m\rfake\x7f[bold red]markup[/]"
RAW = ("\x1b", "\x07", "\u009b", "\x7f", "\r")


def banger(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def assert_clean(*outputs: str) -> None:
    for text in outputs:
        for c in RAW:
            assert c not in text, f"{c!r} reached the output raw: {text!r}"


def test_serial_log_escaped_and_raw_on_request(daemon: Daemon) -> None:
    assert banger("vm", "create", "--name", "box")[0] == 0
    serial = Path(daemon.client.show("box").serial_log)
    serial.write_text(f"Linux version 6.1\r\nlogin: {HOSTILE}\r\n")
    code, out, err = banger("vm", "logs", "box")
    assert code == 0
    assert_clean(out, err)
    assert "Linux version 6.1\nlogin: \\x1b]52;c;ZWNobyBwd25lZA==\\x07\\x1b[2J\\x9b31m\\rfake" \
        in out
    r = CliRunner().invoke(cli, ["vm", "logs", "box", "--raw"], catch_exceptions=False)
    # stdout_bytes: Result.stdout turns CRLF into LF.
    assert r.exit_code == 0 and r.stdout_bytes == serial.read_bytes()
    vmm_log = Path(daemon.client.show("box").dir) / "vmm.log"
    vmm_log.write_text(f"qemu: {OSC52}\n")
    code, out, err = banger("vm", "logs", "box", "--vmm")
    assert code == 0 and "qemu: \\x1b]52;" in out
    assert_clean(out, err)


def test_guest_process_names_in_vm_ports(daemon: Daemon) -> None:
    daemon.agent.sockets = [ListeningSocket("tcp", "0.0.0.0", 8080, f"web{HOSTILE}\nudp x")]
    assert banger("vm", "create", "--name", "web")[0] == 0
    code, out, err = banger("vm", "ports", "web")
    assert code == 0, err
    assert_clean(out, err)
    assert "web\\x1b]52;" in out and "[bold red]markup[/]" in out
    # The newline stays in its cell: no second row.
    assert len([line for line in out.splitlines() if line.strip()]) == 2


def test_guest_error_message_in_progress_and_error(daemon: Daemon) -> None:
    daemon.agent.hello_error = RuntimeError(f"the guest said: {HOSTILE}")
    code, out, err = banger("vm", "create", "--name", "bad")
    assert code == 1
    assert_clean(out, err)
    assert "the guest said: \\x1b]52;" in err and "[bold red]markup[/]" in err
    # The same error, stored, in `vm show` and `vm list`.
    code, out, err = banger("vm", "show", "bad")
    assert code == 0 and "the guest said: \\x1b]52;" in out
    assert_clean(out, err)


def test_dry_run_file_names_and_symlink_targets(daemon: Daemon, tmp_path: Path) -> None:
    daemon.service.host.workspace = LocalWorkspace()  # real git on a real repo
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / f"evil{OSC52}.txt").write_text("x")
    (repo / "link").symlink_to("target\x1b]52;c;cm0gLXJm\x07\u009b2J")
    subprocess.run(["git", "-C", str(repo), "add", "-A"], check=True)
    code, out, err = banger("vm", "run", "--dry-run", str(repo))
    assert code == 0, err
    assert_clean(out, err)
    assert "evil\\x1b]52;c;ZWNobyBwd25lZA==\\x07.txt" in out
    assert "link -> target\\x1b]52;c;cm0gLXJm\\x07\\x9b2J" in out


def test_workspace_export_escapes_on_a_terminal_and_pipes_bytes(
        daemon: Daemon, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    assert banger("vm", "run", "-d", "--name", "box", str(repo))[0] == 0
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text("#!/bin/sh\nprintf 'patch \\033]52;c;eA==\\007\\r\\n'\n"
                                 "printf 'guest says \\033[2J\\n' >&2\n")
    (bin_dir / "ssh").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    argv = [sys.executable, "-m", "banger.cli.main", "vm", "workspace", "export", "box"]
    # A pipe gets the patch's bytes (git apply needs them); stderr is escaped.
    res = subprocess.run(argv, env=env, capture_output=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout == b"patch \x1b]52;c;eA==\x07\r\n"
    assert res.stderr == b"guest says \\x1b[2J\n"
    # A terminal sees the patch escaped.
    leader, follower = pty.openpty()
    with os.fdopen(leader, "rb", buffering=0) as term:
        proc = subprocess.Popen(argv, env=env, stdout=follower, stderr=subprocess.PIPE)
        os.close(follower)
        assert proc.wait(60) == 0
        shown = b""
        with contextlib.suppress(OSError):  # EIO once the terminal's last writer is gone
            while chunk := term.read(4096):
                shown += chunk
    assert b"\x1b" not in shown and b"\x07" not in shown
    assert shown.replace(b"\r\n", b"\n") == b"patch \\x1b]52;c;eA==\\x07\n"


def test_doctor_rows(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Client, "doctor", lambda self: Doctor(checks=[
        Check(name="git", status="warn", detail=f"git said {HOSTILE}")]))
    code, out, err = banger("doctor")
    assert code == 0 and "git said \\x1b]52;" in out and "[bold red]markup[/]" in out
    assert_clean(out, err)
